"""``megatron-ext train [flags]``: the trainer, same flags as ``python -m megatron_ext.train``."""

PASS_THROUGH = True  # everything after the command name goes to the trainer's own parser


def add_parser(sub):
    sub.add_parser("train", help="train (same flags as python -m megatron_ext.train)", add_help=False)


def run_argv(argv) -> int:
    from megatron_ext.train import main

    return main(argv)
