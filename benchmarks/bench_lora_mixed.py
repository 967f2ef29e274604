#!/usr/bin/env python
"""Mixed-adapter LoRA serving benchmark: a thin script around ``peftcore bench lora-mixed``
(see benchmarks/README.md).

    python benchmarks/bench_lora_mixed.py --preset cpu
    python benchmarks/bench_lora_mixed.py --preset gpu --batch 128 --adapters 64 --merge
"""

import sys
from pathlib import Path

try:
    from peftcore.bench import main
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from peftcore.bench import main

if __name__ == "__main__":
    sys.exit(main(["lora-mixed", *sys.argv[1:]]))
