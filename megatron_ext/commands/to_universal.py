"""``megatron-ext to-universal RUN_DIR | --input_folder CK/global_stepN [--output_folder OUT]``:
convert a checkpoint to DeepSpeed's universal format (loads at any data-parallel and
tensor-parallel size with ``--universal-checkpoint``); see megatron_ext/training/universal.py."""

PASS_THROUGH = True  # parsed by the converter's own parser


def add_parser(sub):
    sub.add_parser("to-universal", help="convert a checkpoint to DeepSpeed's universal format (any DP/TP size)",
                   add_help=False)


def run_argv(argv) -> int:
    from megatron_ext.training.universal import main

    return main(argv, prog="megatron-ext to-universal")
