"""Command line: ``peftcore info | demo | bench | finetune | predict``."""

from __future__ import annotations

import argparse
import sys

COMMANDS = ("info", "demo", "bench", "finetune", "predict")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="peftcore", description="peftcore command line")
    parser.add_argument("command", choices=COMMANDS, help="what to run")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        parser.error(f"unknown command {cmd!r}: choose {', '.join(COMMANDS)}")
    if cmd == "info":
        from .info import report

        print(report())
        return 0
    if cmd == "demo":
        from .demo import run

        return run(rest) or 0
    if cmd in ("finetune", "predict"):
        from .transfer import cli

        return (cli.finetune_main if cmd == "finetune" else cli.predict_main)(rest) or 0
    from .bench import main as bench_main

    return bench_main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
