"""``python -m megatron_ext.train [flags]``: parse, validate (one-line errors before any work),
train."""
import os
import sys
from megatron_ext.checkpoint_layout import CheckpointFileError
from megatron_ext.data.data_checks import DataFileError
from megatron_ext.plan import parse_plan
from megatron_ext.planning import launch_problem
from megatron_ext.platform.known_warnings import silence_known_warnings
from megatron_ext.schedules.common.scheduler import ScheduleResumeError
from megatron_ext.training.checkpoint_loading import CheckpointLoadError
from megatron_ext.training.signals import StartupInterrupted, interruptible_startup
from megatron_ext.training.trainer import pretrain


def main(argv=None) -> int:
    """The process entry point: ``run``, then leave torch.distributed."""

    silence_known_warnings()

    try:
        with interruptible_startup():
            return run(argv)
    except StartupInterrupted as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"megatron_ext.train: received {e} while starting (before the first iteration): nothing was "
                  "trained or saved; exiting", file=sys.stderr, flush=True)
        return 0
    finally:
        close_process_group()


def run(argv=None) -> int:
    """Plan and train in this process (the process group stays open: tests run many in one)."""

    plan = parse_plan(argv)

    problem = launch_problem(plan)  # a run whose memory estimate exceeds the device: one line, before any work
    if problem is not None:
        if os.environ.get("RANK", "0") == "0":
            print(f"megatron_ext.train: error: {problem}", file=sys.stderr, flush=True)
        return 2

    try:
        pretrain(plan)
    except (ScheduleResumeError, CheckpointLoadError, CheckpointFileError, DataFileError) as e:  # a checkpoint that cannot be resumed as asked: one line, no traceback
        if os.environ.get("RANK", "0") == "0":  # every rank fails alike; one line is enough
            print(f"megatron_ext.train: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


def close_process_group() -> None:
    """Leave torch.distributed before the interpreter exits: a process group still open at exit
    can abort the process ("terminate called without an active exception") after a good run."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
