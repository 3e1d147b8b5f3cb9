"""``megatron-ext mix-datasets --inputs W1 LIST1 W2 LIST2 ... [--output FILE]``: mix data file
lists (same code as ``tools/mix_datasets.py``; see ``megatron_ext/data/mix_datasets.py``)."""
import argparse

from megatron_ext.argtypes import one_line_errors

PROG = "megatron-ext mix-datasets"


def add_parser(sub):
    from megatron_ext.data import mix_datasets

    p = sub.add_parser("mix-datasets", help="mix data file lists with weights (continual-pretraining replay)",
                       description=mix_datasets.__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    one_line_errors(p, PROG)
    mix_datasets.add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from megatron_ext.data.mix_datasets import run as mix

    return mix(args, prog=PROG)
