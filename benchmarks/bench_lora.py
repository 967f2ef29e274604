#!/usr/bin/env python
"""LoRA linear benchmark: a thin script around ``peftcore bench lora`` (see benchmarks/README.md).

    python benchmarks/bench_lora.py --preset cpu
    python benchmarks/bench_lora.py --preset gpu --tokens 8192 --in 4096 --out-features 4096 --r 16
"""

import sys
from pathlib import Path

try:
    from peftcore.bench import main
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from peftcore.bench import main

if __name__ == "__main__":
    sys.exit(main(["lora", *sys.argv[1:]]))
