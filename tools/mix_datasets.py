#!/usr/bin/env python
"""Mix data file lists with weights; see megatron_ext/data/mix_datasets.py."""
import os
import sys

# Run from a checkout without installing: the repository root holds the megatron_ext package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.data.mix_datasets import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
