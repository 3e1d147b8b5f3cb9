"""What a run is for: the trainer's loop asks its ``RunMode`` for the scheduler, the last
iteration, whether to stop after an iteration and whether to evaluate and save. ``Training`` is
the default; the LR finder (``training/lr_finder.py``) is another mode."""
from __future__ import annotations

import torch
from megatron_ext.schedules.common.scheduler import ParamScheduler


class RunMode:
    """What a run is for. ``Training`` is the default; the LR finder is another."""

    evaluates_and_saves = True

    def scheduler(self, optimizer, plan):
        raise NotImplementedError

    def begin(self, start: dict, skipped_steps: int) -> int:
        """Called once the checkpoint (if any) is loaded; returns the iteration to stop at."""
        raise NotImplementedError

    def after_iteration(self, lr: float, iteration_loss: torch.Tensor, engine) -> bool:
        """Called after every iteration with its summed micro-batch losses; True: stop now."""
        return False

    def finish(self) -> None:
        pass


class Training(RunMode):
    """Train to ``--train-iters`` on the flags' schedule, evaluating and saving as asked."""

    def __init__(self, plan):
        self.plan = plan

    def scheduler(self, optimizer, plan):

        return ParamScheduler.from_args(optimizer, plan.args, plan.schedule)

    def begin(self, start: dict, skipped_steps: int) -> int:
        return self.plan.args.train_iters
