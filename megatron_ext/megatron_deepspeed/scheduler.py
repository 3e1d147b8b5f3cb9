"""Our LR (and weight-decay) schedule behind the fork's ``OptimizerParamScheduler`` protocol.

The fork and DeepSpeed drive a scheduler with ``step(increment)`` after each optimizer step
(``increment`` = samples of the iteration; DeepSpeed calls it from ``engine.step(lr_kwargs=...)``),
and DeepSpeed saves and restores it as the engine's ``lr_scheduler`` (``state_dict`` /
``load_state_dict``). Positions are counted in samples on both sides, so ``ForkScheduler`` keeps
the position (``num_steps``, the fork's name) and sets every group's LR and weight decay from our
``ParamScheduler`` at it: the LR an iteration trains with is the schedule at the samples consumed
before it, as in our trainer.

Resuming follows our rules (``--override-opt-param-scheduler`` / ``--use-checkpoint-opt-param-scheduler``
/ the default: the checkpoint's schedule must match the command line, one line naming the first
difference). A checkpoint written by the fork's own scheduler is read too: its fields (max/min LR,
warmup and decay lengths in samples, style, weight-decay schedule) become our schedule state; the
fork does not save the constant / cooldown / infinite-schedule lengths, which are then taken from
the command line.
"""
from __future__ import annotations

from typing import Any, Dict

from megatron_ext.megatron_deepspeed import project_api

STATE_KEY = "megatron_ext"


class ForkScheduler:
    def __init__(self, inner):
        self.inner = inner  # our ParamScheduler (or the LR finder's)
        self.num_steps = 0.0
        self.inner.step(0.0)

    @property
    def optimizer(self):
        return self.inner.optimizer

    @property
    def current_lr(self) -> float:
        return self.inner.current_lr

    def step(self, increment, token_num=None):
        """After an optimizer step: advance by ``increment`` samples and set the next iteration's LR.
        ``increment`` is required, as in the fork's scheduler: DeepSpeed's pipeline engine calls
        ``step()`` without it and, on the TypeError, again with the batch size."""
        self.num_steps += float(increment)
        self.inner.step(self.num_steps)

    def refresh(self) -> None:
        """Set the LR for the current position again (after the schedule itself changed)."""
        self.inner.step(self.num_steps)

    def state_dict(self) -> Dict[str, Any]:
        """Ours under ``megatron_ext``, and the fork's own fields beside it, so the fork without the
        plug-ins continues this checkpoint too (with a decay style it knows)."""
        try:
            ours = self.inner.state_dict()
        except AttributeError:  # the LR finder's sweep: a range test saves nothing
            return {"num_steps": self.num_steps}
        return fork_scheduler_state(ours, self.num_steps, None)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        ours = state.get(STATE_KEY)
        if ours is None:
            ours = from_fork_state(state, self.inner)
        self.num_steps = float(ours["position"])
        self.inner.load_state_dict(ours)


def from_fork_state(state: Dict[str, Any], inner) -> Dict[str, Any]:
    """Our schedule state from the fork's ``OptimizerParamScheduler.state_dict()``."""
    try:
        style = state.get("lr_decay_style", state.get("decay_style"))
        max_lr = state.get("max_lr", state.get("start_lr"))
        warmup = state.get("lr_warmup_steps", state.get("warmup_steps", state.get("warmup_iter")))
        decay_end = state.get("lr_decay_steps", state.get("decay_steps", state.get("end_iter")))
        position = state.get("num_steps", state.get("num_iters"))
        span = dict(style=style, max_lr=float(max_lr), min_lr=float(state["min_lr"]), warmup=float(warmup),
                    decay_end=float(decay_end), train_end=float(state.get("wd_incr_steps") or decay_end))
    except (KeyError, TypeError):
        raise project_api.schedule_resume_error()(
            "the checkpoint's LR schedule state is neither megatron_ext's nor Megatron-DeepSpeed's; pass "
            "--override-opt-param-scheduler to use the command line's schedule") from None
    if state.get("lr_decay_tokens") is not None or state.get("lr_warmup_tokens") is not None:
        raise project_api.schedule_resume_error()(
            "the checkpoint's Megatron-DeepSpeed schedule counts in tokens (--lr-decay-tokens); megatron_ext "
            "counts in samples: pass --override-opt-param-scheduler to continue with the command line's schedule")
    ours = inner.schedule.state()
    schedule = {**{k: v for k, v in ours.items() if k not in span}, **span}  # style fields: not saved by the fork
    if "start_wd" in state:
        wd_style = state.get("wd_incr_style", "constant")
        weight_decay = project_api.weight_decay_schedule_state(
            wd_style, state["start_wd"], state["end_wd"], None if wd_style == "constant" else state.get("wd_incr_steps"))
    else:
        weight_decay = inner.wd_schedule.state()
    return {"schedule": schedule, "weight_decay": weight_decay, "position": float(position)}


def fork_scheduler_state(ours: Dict[str, Any], position: int, tokens) -> Dict[str, Any]:
    """The fork's ``OptimizerParamScheduler`` fields for our schedule (and ours under ``megatron_ext``)."""
    s, wd = ours["schedule"], ours["weight_decay"]
    return {
        "max_lr": s["max_lr"], "min_lr": s["min_lr"], "lr_warmup_steps": s["warmup"], "lr_warmup_tokens": None,
        "num_steps": position, "num_tokens": int(tokens or 0), "lr_decay_style": s["style"],
        "lr_decay_steps": s["decay_end"], "lr_decay_tokens": None, "start_wd": wd["start"], "end_wd": wd["end"],
        "wd_incr_style": wd["style"], "wd_incr_steps": wd["length"] or s["train_end"],
        STATE_KEY: {**ours, "position": float(position)},
    }
