#!/usr/bin/env python
"""Distillation-loss benchmarks: a thin script around ``peftcore bench distill`` and, with
``--fused``, ``peftcore bench fused-distill`` (see benchmarks/README.md).

    python benchmarks/bench_distill.py --preset cpu
    python benchmarks/bench_distill.py --preset gpu --vocab 128256 --merge
    python benchmarks/bench_distill.py --fused --preset cpu
"""

import sys
from pathlib import Path

try:
    from peftcore.bench import main
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from peftcore.bench import main

if __name__ == "__main__":
    args = sys.argv[1:]
    op = "fused-distill" if "--fused" in args else "distill"
    sys.exit(main([op, *[a for a in args if a != "--fused"]]))
