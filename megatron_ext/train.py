"""``python -m megatron_ext.train [flags]``: parse, validate (one-line errors before any work),
train."""
import os
import sys


def main(argv=None) -> int:
    from megatron_ext.arguments import parse_args

    args = parse_args(argv)
    from megatron_ext.schedules.scheduler import ScheduleResumeError
    from megatron_ext.training.checkpoint_loading import CheckpointLoadError
    from megatron_ext.training.trainer import pretrain

    try:
        pretrain(args)
    except (ScheduleResumeError, CheckpointLoadError) as e:  # a checkpoint that cannot be resumed as asked: one line, no traceback
        if os.environ.get("RANK", "0") == "0":  # every rank fails alike; one line is enough
            print(f"megatron_ext.train: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
