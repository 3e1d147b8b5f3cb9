#!/usr/bin/env python
"""Convert a checkpoint to DeepSpeed's universal format (megatron-ext to-universal; DeepSpeed's flags).

    python tools/ds_to_universal.py --input_folder CK/global_stepN --output_folder CK/global_stepN_universal
    python tools/ds_to_universal.py CK          # the latest checkpoint of a run directory
"""
import os
import sys

# Run from a checkout without installing: the repository root holds the megatron_ext package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.commands.to_universal import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="ds_to_universal.py"))
