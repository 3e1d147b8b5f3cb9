#!/usr/bin/env python
"""``python3 mix_datasets.py --input 0.9 A.txt 0.1 B.txt > mix.txt`` from the repository root, as
the ALCF guide types it (the same tool as tools/mix_datasets.py and megatron-ext mix-datasets)."""
import os
import sys

# Run from a checkout without installing: this folder holds the megatron_ext package.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron_ext.data.mix_datasets import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
