"""``python -m megatron_ext.train [flags]``: parse, validate (one-line errors before any work),
train."""
import sys


def main(argv=None) -> int:
    from megatron_ext.arguments import parse_args

    args = parse_args(argv)
    from megatron_ext.training.trainer import pretrain

    pretrain(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
