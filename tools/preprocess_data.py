#!/usr/bin/env python
"""Tokenize corpora into megatron-core indexed datasets; see megatron_ext/data/preprocess.py."""
import os
import sys

# Run from a checkout without installing: the repository root holds the megatron_ext package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
