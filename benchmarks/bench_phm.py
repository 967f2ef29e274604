#!/usr/bin/env python
"""PHM linear (Compacter) benchmark: a thin script around ``peftcore bench phm`` (see benchmarks/README.md).

    python benchmarks/bench_phm.py --preset cpu
    python benchmarks/bench_phm.py --preset gpu --tokens 8192 --block 1
    python benchmarks/bench_phm.py --preset cpu --layers 768x24x768 --k 1,4
"""

import sys
from pathlib import Path

try:
    from peftcore.bench import main
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from peftcore.bench import main

if __name__ == "__main__":
    sys.exit(main(["phm", *sys.argv[1:]]))
