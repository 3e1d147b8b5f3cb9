"""The LR (and weight-decay) scheduler every decay style runs inside.

Positions are counted in SAMPLES, as Megatron-DeepSpeed does: an iteration that starts after
``consumed_samples`` uses ``lr(consumed_samples)``. Lengths given in iterations are multiplied by
the global batch, lengths in tokens divided by the sequence length, so the three units give the
same curve. Warmup is linear from 0 to ``--lr`` and comes first; the decay style owns everything
after it. The LR each param group gets is ``lr * group["lr_mult"]`` and its weight decay
``wd * group["wd_mult"]`` (parametrizations and hybrid optimizers set the multipliers; groups
without weight decay have ``wd_mult`` 0 and stay at zero under any weight-decay schedule).

A decay style is a ``DecayStyle`` subclass registered in ``SCHEDULES`` (one file each in this
package). ``__init__(args, span)`` reads its flags, resolves every length to samples and stores
the results as the attributes named in ``FIELDS``; those attributes (plus the span) are the whole
state saved in checkpoints, and ``from_state`` rebuilds the style from them without ``args``.
Settings the formulas cannot serve raise ``ValueError`` with one line naming the flag, from
``validate_args(args)`` or ``__init__``; ``build_schedule`` runs both at start-up.

Resuming (``ParamScheduler.load_state_dict``) follows Megatron's rules: by default the
checkpoint's schedule must equal the command line's (``ScheduleResumeError`` naming the first
differing field), ``--override-opt-param-scheduler`` takes the command line's,
``--use-checkpoint-opt-param-scheduler`` the checkpoint's, and ``--lr-cooldown-from-checkpoint R``
keeps the checkpoint's schedule up to the checkpoint and cools down from the LR it had there to
``--min-lr`` over the next R iterations.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Any, Dict, List, Optional, Tuple

from megatron_ext.argtypes import nonneg_float, fraction, nonneg_int, positive_int
from megatron_ext.checkpoint_layout import LATEST
from megatron_ext.schedules import SCHEDULES
from megatron_ext.registry import UnknownPluginError

# --------------------------------------------------------------------------------------------
# Cooldown shapes (WSD, constant-plus-cooldown, cooldown from a checkpoint)
# --------------------------------------------------------------------------------------------

COOLDOWN_SHAPES = ("1-sqrt", "linear", "cosine")
_SHAPE_ALIASES = {"1-sqrt": "1-sqrt", "minus-sqrt": "1-sqrt", "minus_sqrt": "1-sqrt", "linear": "linear",
                  "cosine": "cosine"}
DEFAULT_COOLDOWN_SHAPE = "1-sqrt"


def cooldown_shape(value: str) -> str:
    """``type=`` for ``--lr-wsd-decay-style``; ``minus_sqrt`` (Megatron-LM's name) means 1-sqrt."""
    try:
        return _SHAPE_ALIASES[value.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"invalid choice {value!r} (choose from {', '.join(COOLDOWN_SHAPES)})") from None


def cooldown_factor(shape: str, x: float) -> float:
    """Fraction of (start - floor) left at cooldown progress ``x`` in [0, 1]: 1 at 0, 0 at 1."""
    x = min(1.0, max(0.0, x))
    if shape == "linear":
        return 1.0 - x
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(x)
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * x))
    raise ValueError(f"unknown cooldown shape {shape!r} (choose from {', '.join(COOLDOWN_SHAPES)})")


class ScheduleResumeError(ValueError):
    """The checkpoint's schedule cannot be resumed as asked; the message is one line."""


# --------------------------------------------------------------------------------------------
# The curve
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ScheduleSpan:
    """Where the phases of a schedule are, in samples."""

    max_lr: float
    min_lr: float
    warmup: float  # warmup ends here
    decay_end: float  # the decay (counted from 0, warmup included) ends here
    train_end: float  # end of training

    def progress(self, position: float) -> float:
        """Fraction of the post-warmup decay done at ``position``, clamped to [0, 1]."""
        length = self.decay_end - self.warmup
        if length <= 0:
            return 1.0
        return min(1.0, max(0.0, (position - self.warmup) / length))


class DecayStyle:
    """Base class of decay-style plug-ins: the LR at any position after warmup.

    ``FIELDS`` maps each attribute that (with the span) defines the curve to the flag(s) that set
    it; ``__init__`` sets them (lengths resolved to samples) and they are saved in checkpoints.
    """

    FIELDS: Dict[str, str] = {}
    USES_DECAY_END = True  # False when the curve does not depend on the decay length

    def __init__(self, args, span: ScheduleSpan):
        self.span = span

    def lr(self, position: float) -> float:
        raise NotImplementedError

    def state(self) -> Dict[str, Any]:
        """Style-specific settings that define the curve (saved in checkpoints)."""
        return {name: getattr(self, name) for name in self.FIELDS}

    @classmethod
    def from_state(cls, span: ScheduleSpan, state: Dict[str, Any]) -> "DecayStyle":
        """Rebuild from ``state()`` (a checkpoint) without the command line."""
        self = cls.__new__(cls)
        self.span = span
        for name in cls.FIELDS:
            if name not in state:
                raise ScheduleResumeError(
                    f"the checkpoint's LR schedule state has no '{name}' for style '{state.get('style')}'; "
                    "pass --override-opt-param-scheduler to use the command line's schedule")
            setattr(self, name, state[name])
        return self

    def phases(self) -> List[Tuple[str, float]]:
        """(label, position in samples) of the boundaries after warmup, for display."""
        return [("decay end", self.span.decay_end)] if self.USES_DECAY_END else []

    @staticmethod
    def validate_args(args) -> None:
        """Raise ValueError (one line naming the flag) for settings this style cannot serve."""


@dataclasses.dataclass
class CheckpointCooldown:
    """``--lr-cooldown-from-checkpoint``: from ``start`` (the checkpoint's position) the LR goes
    from ``start_lr`` to ``end_lr`` with ``shape``, reaching ``end_lr`` at ``start + length``
    (the position of the last cooldown iteration) and staying there."""

    start: float
    length: float
    start_lr: float
    end_lr: float
    shape: str
    iterations: int  # R, as given

    def lr(self, position: float) -> float:
        x = (position - self.start) / self.length if self.length > 0 else 1.0
        return self.end_lr + (self.start_lr - self.end_lr) * cooldown_factor(self.shape, x)


_SAMPLE_FIELDS = {"warmup", "decay_end", "train_end", "cooldown_start", "cooldown_end", "anneal_start", "length"}
_SPAN_HINTS = {
    "style": "--lr-decay-style",
    "max_lr": "--lr",
    "min_lr": "--min-lr",
    "warmup": "--lr-warmup-fraction/-iters/-samples/-tokens",
    "decay_end": "--lr-decay-iters/-samples/-tokens or --train-iters",
    "cooldown": "--lr-cooldown-from-checkpoint",
}


class LRSchedule:
    """Warmup followed by a decay style (and possibly a cooldown from a checkpoint); a pure
    function of the position in samples."""

    def __init__(self, span: ScheduleSpan, style_name: str, style: DecayStyle,
                 cooldown: Optional[CheckpointCooldown] = None):
        self.span = span
        self.style_name = style_name
        self.style = style
        self.cooldown = cooldown

    def lr(self, position: float) -> float:
        if self.cooldown is not None and position >= self.cooldown.start:
            return self.cooldown.lr(position)
        s = self.span
        if s.warmup > 0 and position < s.warmup:
            return s.max_lr * max(position, 0.0) / s.warmup
        return self.style.lr(position)

    def phases(self) -> List[Tuple[str, float]]:
        out = [("warmup end", self.span.warmup)] if self.span.warmup > 0 else []
        out += self.style.phases()
        if self.cooldown is not None:
            c = self.cooldown
            out = [p for p in out if p[1] < c.start]
            out += [(f"cooldown from checkpoint (lr {c.start_lr:g}, {c.shape})", c.start),
                    (f"cooldown end (lr {c.end_lr:g})", c.start + c.length)]
        return out

    def state(self) -> Dict[str, Any]:
        return {
            "style": self.style_name,
            **dataclasses.asdict(self.span),
            **self.style.state(),
            "cooldown": dataclasses.asdict(self.cooldown) if self.cooldown is not None else None,
        }

    @classmethod
    def from_state(cls, state: Dict[str, Any]) -> "LRSchedule":

        try:
            plugin = SCHEDULES.get(state["style"])
            span = ScheduleSpan(**{f.name: state[f.name] for f in dataclasses.fields(ScheduleSpan)})
        except UnknownPluginError as e:
            raise ScheduleResumeError(
                f"the checkpoint's LR schedule is not available here ({e}); "
                "pass --override-opt-param-scheduler to use the command line's schedule") from None
        except KeyError as e:
            raise ScheduleResumeError(
                f"the checkpoint's LR schedule state is incomplete ({e}); "
                "pass --override-opt-param-scheduler to use the command line's schedule") from None
        cooldown = state.get("cooldown")
        return cls(span, plugin.name, plugin.obj.from_state(span, state),
                   CheckpointCooldown(**cooldown) if cooldown else None)

    def curve_state(self) -> Dict[str, Any]:
        """The fields that decide the curve (compared on resume)."""
        state = self.state()
        state.pop("train_end")
        if not self.style.USES_DECAY_END:
            state.pop("decay_end")
        return state

    def hint(self, field: str) -> str:
        return _SPAN_HINTS.get(field) or type(self.style).FIELDS.get(field, "")


@dataclasses.dataclass
class WeightDecaySchedule:
    """Megatron's weight-decay increment: from ``start`` to ``end`` over ``length`` samples (the
    training length), ``constant`` (start == end), ``linear`` or ``cosine``; ``end`` after it."""

    style: str
    start: float
    end: float
    length: Optional[float]  # None for constant

    HINTS = {"style": "--weight-decay-incr-style", "start": "--start-weight-decay (or --weight-decay)",
             "end": "--end-weight-decay (or --weight-decay)", "length": "--train-iters"}

    def wd(self, position: float) -> float:
        if self.style == "constant" or not self.length or position > self.length:
            return self.end
        ratio = max(0.0, position) / self.length
        if self.style == "linear":
            coeff = ratio
        elif self.style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * (1.0 - ratio)) + 1.0)
        else:
            raise ValueError(f"unknown --weight-decay-incr-style {self.style!r}")
        return self.start + coeff * (self.end - self.start)

    def state(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state) -> "WeightDecaySchedule":
        if isinstance(state, (int, float)):  # a bare number: constant weight decay
            return cls("constant", float(state), float(state), None)
        try:
            return cls(state["style"], state["start"], state["end"], state["length"])
        except (KeyError, TypeError):
            raise ScheduleResumeError(
                "the checkpoint's weight-decay schedule state is incomplete; "
                "pass --override-opt-param-scheduler to use the command line's") from None


# --------------------------------------------------------------------------------------------
# From the command line
# --------------------------------------------------------------------------------------------


def to_samples(args, iters=None, samples=None, tokens=None) -> Optional[float]:
    """A length given in iterations, samples or tokens, in samples (None if none given)."""
    if iters:
        return float(iters * args.global_batch_size)
    if samples:
        return float(samples)
    if tokens:
        return tokens / args.seq_length
    return None


_samples = to_samples  # the name used before


def one_of(args, prefix: str, units=("iters", "samples", "tokens")) -> List[str]:
    """The units among ``--{prefix}-iters/-samples/-tokens`` that were given."""
    return [u for u in units if getattr(args, f"{prefix.replace('-', '_')}_{u}", None)]


def build_weight_decay_schedule(args) -> WeightDecaySchedule:
    style = getattr(args, "weight_decay_incr_style", "constant") or "constant"
    start = getattr(args, "start_weight_decay", None)
    end = getattr(args, "end_weight_decay", None)
    if style == "constant":
        for flag, value in (("--start-weight-decay", start), ("--end-weight-decay", end)):
            if value is not None:
                raise ValueError(f"{flag} needs --weight-decay-incr-style linear or cosine "
                                 f"(constant uses --weight-decay {args.weight_decay:g})")
        return WeightDecaySchedule("constant", args.weight_decay, args.weight_decay, None)
    for flag, value in (("--start-weight-decay", start), ("--end-weight-decay", end)):
        if value is None:
            raise ValueError(f"--weight-decay-incr-style {style} needs {flag}")
    return WeightDecaySchedule(style, float(start), float(end), float(args.train_iters * args.global_batch_size))


def build_schedule(args) -> LRSchedule:
    """The schedule the flags describe; raises ValueError (one line) if they cannot be served."""
    if args.min_lr > args.lr:
        raise ValueError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    train_end = float(args.train_iters * args.global_batch_size)
    given = one_of(args, "lr-decay")
    if len(given) > 1:
        raise ValueError(f"give one of --lr-decay-iters/-samples/-tokens, not {' and '.join(given)}")
    decay_end = to_samples(args, args.lr_decay_iters, args.lr_decay_samples, args.lr_decay_tokens) or train_end

    warm = one_of(args, "lr-warmup")
    if args.lr_warmup_fraction is not None and warm:
        raise ValueError(f"give --lr-warmup-fraction or --lr-warmup-{warm[0]}, not both")
    if len(warm) > 1:
        raise ValueError(f"give one of --lr-warmup-iters/-samples/-tokens, not {' and '.join(warm)}")
    if args.lr_warmup_fraction is not None:
        warmup = args.lr_warmup_fraction * decay_end
    else:
        warmup = to_samples(args, args.lr_warmup_iters, args.lr_warmup_samples, args.lr_warmup_tokens) or 0.0
    if warmup > decay_end:
        raise ValueError(
            f"warmup ({warmup:g} samples) is longer than the decay length ({decay_end:g} samples)"
        )
    _validate_resume_flags(args)
    span = ScheduleSpan(args.lr, args.min_lr, warmup, decay_end, train_end)
    plugin = SCHEDULES.get(args.lr_decay_style)  # checked by the run plan (SCHEDULES.check)
    schedule = LRSchedule(span, plugin.name, plugin.obj(args, span))
    if getattr(args, "lr_wsd_decay_style", None) is not None and not _uses_cooldown_shape(schedule, args):
        raise ValueError(
            "--lr-wsd-decay-style has no effect here: it shapes --lr-decay-style wsd, "
            "--lr-constant-plus-cooldown and --lr-cooldown-from-checkpoint")
    build_weight_decay_schedule(args)  # validates the weight-decay flags
    return schedule


def _uses_cooldown_shape(schedule: LRSchedule, args) -> bool:
    return (getattr(schedule.style, "cooldown_shape", None) is not None
            or getattr(args, "lr_cooldown_from_checkpoint", None) is not None)


def _validate_resume_flags(args) -> None:
    override = getattr(args, "override_opt_param_scheduler", False)
    use_ckpt = getattr(args, "use_checkpoint_opt_param_scheduler", False)
    if override and use_ckpt:
        raise ValueError("give --override-opt-param-scheduler or --use-checkpoint-opt-param-scheduler, not both")
    r = getattr(args, "lr_cooldown_from_checkpoint", None)
    if r is None:
        return
    if r < 2:
        raise ValueError(f"--lr-cooldown-from-checkpoint {r}: give at least 2 iterations "
                         "(the first keeps the checkpoint's LR, the last uses --min-lr)")
    if not getattr(args, "load", None):
        raise ValueError("--lr-cooldown-from-checkpoint needs --load DIR (the checkpoint to cool down)")
    if getattr(args, "finetune", False):
        raise ValueError("--lr-cooldown-from-checkpoint continues the checkpoint's schedule; it cannot be "
                         "combined with --finetune (which starts a fresh one)")
    if override:
        raise ValueError("--lr-cooldown-from-checkpoint keeps the checkpoint's schedule up to the checkpoint; "
                         "it cannot be combined with --override-opt-param-scheduler")
    if not os.path.isfile(os.path.join(args.load, LATEST)):
        raise ValueError(f"--lr-cooldown-from-checkpoint: no checkpoint to cool down in --load {args.load} "
                         f"(no '{LATEST}' file)")


def add_resume_arguments(g) -> None:
    g.add_argument("--override-opt-param-scheduler", action="store_true",
                   help="on resume, take the LR/weight-decay schedule from the command line, not the checkpoint")
    g.add_argument("--use-checkpoint-opt-param-scheduler", action="store_true",
                   help="on resume, take the LR/weight-decay schedule from the checkpoint (command-line "
                        "schedule flags are then ignored); default: they must match")


def add_schedule_arguments(g) -> None:
    """The LR flags every decay style shares (a style's own flags live in its plug-in file)."""
    g.add_argument("--lr", type=nonneg_float, default=3e-4)
    g.add_argument("--min-lr", type=nonneg_float, default=0.0)
    g.add_argument("--lr-decay-style", type=SCHEDULES.argument_type, default="cosine",
                   help=f"one of: {', '.join(SCHEDULES.names())}")
    g.add_argument("--lr-decay-iters", type=positive_int, default=None,
                   help="decay length (warmup included); default: the training length")
    g.add_argument("--lr-decay-samples", type=positive_int, default=None)
    g.add_argument("--lr-decay-tokens", type=positive_int, default=None)
    g.add_argument("--lr-warmup-fraction", type=fraction, default=None,
                   help="warmup as a fraction of the decay length")
    g.add_argument("--lr-warmup-iters", type=nonneg_int, default=0)
    g.add_argument("--lr-warmup-samples", type=nonneg_int, default=0)
    g.add_argument("--lr-warmup-tokens", type=nonneg_int, default=None)
    g.add_argument("--lr-wsd-decay-style", type=cooldown_shape, default=None, metavar="{1-sqrt,linear,cosine}",
                   help="shape of the cooldown of --lr-decay-style wsd, --lr-constant-plus-cooldown and "
                        f"--lr-cooldown-from-checkpoint (default {DEFAULT_COOLDOWN_SHAPE})")
    g.add_argument("--lr-cooldown-from-checkpoint", type=positive_int, default=None, metavar="R",
                   help="resume --load's checkpoint (at iteration S) and cool down over the next R iterations: "
                        "iteration S+1 keeps the LR the checkpoint's schedule gives there, iteration S+R uses "
                        "--min-lr; needs --train-iters >= S+R (see `megatron-ext cooldown`)")
    g.add_argument("--weight-decay-incr-style", choices=["constant", "linear", "cosine"], default="constant",
                   help="weight decay from --start-weight-decay to --end-weight-decay over the training "
                        "length (constant: --weight-decay throughout)")
    g.add_argument("--start-weight-decay", type=nonneg_float, default=None)
    g.add_argument("--end-weight-decay", type=nonneg_float, default=None)
    add_resume_arguments(g)


# --------------------------------------------------------------------------------------------
# Applying it to an optimizer; checkpoint state and resume rules
# --------------------------------------------------------------------------------------------


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
        return False
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _show(field: str, value) -> str:
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, dict):
        text = ", ".join(f"{k}={_show(k, v)}" for k, v in value.items())
        return "{" + text + "}"
    else:
        text = str(value)
    return f"{text} samples" if field in _SAMPLE_FIELDS and isinstance(value, (int, float)) else text


class ParamScheduler:
    """Applies an LRSchedule and a weight-decay schedule to an optimizer's param groups.

    ``resume`` is ``"match"`` (default: a checkpoint's schedule must equal this one),
    ``"override"`` (keep this one) or ``"checkpoint"`` (take the checkpoint's);
    ``cooldown_iterations``/``global_batch_size`` ask for a cooldown from the checkpoint.
    """

    def __init__(self, optimizer, schedule: LRSchedule, weight_decay=None, *, resume: str = "match",
                 cooldown_iterations: Optional[int] = None, cooldown_shape: Optional[str] = None,
                 global_batch_size: Optional[int] = None):
        self.optimizer = optimizer
        self.schedule = schedule
        if weight_decay is None:
            weight_decay = 0.0
        if not isinstance(weight_decay, WeightDecaySchedule):
            weight_decay = WeightDecaySchedule("constant", float(weight_decay), float(weight_decay), None)
        self.wd_schedule = weight_decay
        if resume not in ("match", "override", "checkpoint"):
            raise ValueError(f"resume must be match, override or checkpoint, got {resume!r}")
        self.resume = resume
        self.cooldown_iterations = cooldown_iterations
        self.cooldown_shape = cooldown_shape or DEFAULT_COOLDOWN_SHAPE
        self.global_batch_size = global_batch_size
        if cooldown_iterations is not None and not global_batch_size:
            raise ValueError("a cooldown from the checkpoint needs the global batch size")
        self.position = 0.0
        self.current_lr = schedule.lr(0.0)
        self.current_wd = self.wd_schedule.wd(0.0)
        self.source = "the command line"  # where the schedule that runs came from (said at start-up)

    @classmethod
    def from_args(cls, optimizer, args, schedule: Optional[LRSchedule] = None) -> "ParamScheduler":
        """What the trainer uses: the schedules and resume rules the flags describe (``schedule``:
        the one the run plan already built from them)."""
        if getattr(args, "override_opt_param_scheduler", False):
            resume = "override"
        elif getattr(args, "use_checkpoint_opt_param_scheduler", False):
            resume = "checkpoint"
        else:
            resume = "match"
        return cls(optimizer, schedule or build_schedule(args), build_weight_decay_schedule(args), resume=resume,
                   cooldown_iterations=getattr(args, "lr_cooldown_from_checkpoint", None),
                   cooldown_shape=getattr(args, "lr_wsd_decay_style", None),
                   global_batch_size=args.global_batch_size)

    @property
    def weight_decay(self) -> float:
        return self.current_wd

    def step(self, position: float) -> float:
        """Set every group's LR and weight decay for the iteration starting at ``position``."""
        self.position = position
        lr = self.current_lr = self.schedule.lr(position)
        wd = self.current_wd = self.wd_schedule.wd(position)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = wd * group.get("wd_mult", 1.0)
        return lr

    def state_dict(self) -> Dict[str, Any]:
        """Everything that defines both curves, and the position of the last ``step`` (on load,
        ``load_checkpoint`` passes the checkpoint's consumed samples instead)."""
        return {"schedule": self.schedule.state(), "weight_decay": self.wd_schedule.state(),
                "position": self.position}

    # -- resuming ---------------------------------------------------------------------------
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume at ``state["position"]`` following the resume rules (see the class doc)."""
        position = float(state["position"])
        if self.cooldown_iterations is not None:
            self._start_or_continue_cooldown(state, position)
            self.source = f"the checkpoint, cooled down from it (--lr-cooldown-from-checkpoint {self.cooldown_iterations})"
        elif self.resume == "checkpoint":
            self.schedule = LRSchedule.from_state(state["schedule"])
            self.wd_schedule = WeightDecaySchedule.from_state(state["weight_decay"])
            self.source = "the checkpoint (--use-checkpoint-opt-param-scheduler)"
        elif self.resume == "match":
            self._check_matches(state)
            self.source = "the command line (equal to the checkpoint's)"
        else:
            self.source = "the command line (--override-opt-param-scheduler)"
        self.step(position)

    # -- what runs ------------------------------------------------------------------------------
    def describe(self) -> str:
        """The schedule that runs, in iterations, and where it came from (the start-up block); ''
        for a curve that is not an LRSchedule (the LR finder's sweep says what it is itself)."""
        if not isinstance(self.schedule, LRSchedule):
            return ""
        s, gb = self.schedule, float(self.global_batch_size or 1)
        phases = ", ".join(f"{label} at iteration {pos / gb:g}" for label, pos in s.phases())
        return (f"{s.style_name} (lr {s.span.max_lr:g}, min {s.span.min_lr:g}{'; ' + phases if phases else ''}) "
                f"from {self.source}")

    def at_min_lr(self, first_iteration: int, end_iteration: int, samples: int = 2000) -> Optional[int]:
        """The first iteration of ``[first_iteration, end_iteration)`` from which every iteration runs
        at --min-lr (None: none does). Checked on at most ``samples`` iterations."""
        gb = float(self.global_batch_size or 1)
        floor = self.schedule.span.min_lr + 1e-12 * max(self.schedule.span.max_lr, 1e-30)
        n = end_iteration - first_iteration
        if n <= 0:
            return None
        stride = max(1, n // samples)
        iterations = list(range(first_iteration, end_iteration, stride))
        if iterations[-1] != end_iteration - 1:
            iterations.append(end_iteration - 1)
        first = None
        for it in iterations:
            if self.schedule.lr(it * gb) <= floor:
                first = it if first is None else first
            else:
                first = None
        return first

    def resume_warnings(self, start_iteration: int, end_iteration: int) -> List[str]:
        """What a resumed run should be told before it trains: iterations it will spend at --min-lr,
        a schedule that ends before --train-iters, with the flags that do what was probably meant."""
        if start_iteration <= 0 or end_iteration <= start_iteration or not isinstance(self.schedule, LRSchedule):
            return []
        gb = float(self.global_batch_size or 1)
        s = self.schedule
        out = []
        first = self.at_min_lr(start_iteration, end_iteration)
        schedule_end = s.span.train_end / gb
        fixes = ("--override-opt-param-scheduler (with a longer --lr-decay-iters or --train-iters: the command "
                 "line's curve, whose LR at this iteration may jump), --lr-cooldown-from-checkpoint R (cool a "
                 "constant/WSD run down from here), or load with --finetune and re-warm (continual pretraining)")
        if first is not None:
            n = end_iteration - first
            out.append(f"WARNING: iterations {first + 1}-{end_iteration} ({n} of the {end_iteration - start_iteration} "
                       f"this run trains) run at --min-lr {s.span.min_lr:g}: the schedule from {self.source} has "
                       f"decayed by then; to train on at a useful LR use {fixes}")
        elif schedule_end < end_iteration - 1e-9:
            out.append(f"WARNING: the schedule from {self.source} was made for {schedule_end:g} iterations and this "
                       f"run trains to {end_iteration}; its curve past iteration {schedule_end:g} is what the "
                       f"style gives there (check with megatron-ext schedule); see {fixes}")
        return out

    def _check_matches(self, state) -> None:
        theirs = LRSchedule.from_state(state["schedule"])
        ours = self.schedule
        mine, saved = ours.curve_state(), theirs.curve_state()
        hints = {}
        if saved["style"] != mine["style"]:
            diffs = ["style"]
        else:
            diffs = [k for k in list(mine) + [k for k in saved if k not in mine]
                     if not _same(mine.get(k), saved.get(k))]
            diffs.sort(key=lambda k: k != "cooldown")  # the most telling difference first
        for k in diffs:
            hints[k] = ours.hint(k)
        what = "LR schedule"
        if not diffs:
            wd_theirs = WeightDecaySchedule.from_state(state["weight_decay"]).state()
            wd_mine = self.wd_schedule.state()
            diffs = [k for k in wd_mine if not _same(wd_mine[k], wd_theirs.get(k))]
            mine, saved, what = wd_mine, wd_theirs, "weight-decay schedule"
            hints = {k: WeightDecaySchedule.HINTS.get(k, "") for k in diffs}
        if not diffs:
            return
        k = diffs[0]
        flag = f" ({hints[k]})" if hints.get(k) else ""
        more = f" (and {len(diffs) - 1} more: {', '.join(diffs[1:])})" if len(diffs) > 1 else ""
        if k == "cooldown" and saved.get(k):
            advice = (f"add --lr-cooldown-from-checkpoint {saved[k]['iterations']} to continue the cooldown, "
                      "or pass --use-checkpoint-opt-param-scheduler / --override-opt-param-scheduler")
        else:
            advice = ("pass --override-opt-param-scheduler to use the command line's or "
                      "--use-checkpoint-opt-param-scheduler to keep the checkpoint's")
        raise ScheduleResumeError(
            f"the checkpoint's {what} differs from the command line: {k}{flag} is "
            f"{_show(k, saved.get(k))} in the checkpoint but {_show(k, mine.get(k))} on the command line"
            f"{more}; {advice}")

    def _start_or_continue_cooldown(self, state, position: float) -> None:
        gb = self.global_batch_size
        r = self.cooldown_iterations
        base = LRSchedule.from_state(state["schedule"])
        self.wd_schedule = WeightDecaySchedule.from_state(state["weight_decay"])
        end_lr = self.schedule.span.min_lr
        train_end = self.schedule.span.train_end
        if base.cooldown is not None:
            c = base.cooldown
            if c.iterations == r and _same(c.end_lr, end_lr) and c.shape == self.cooldown_shape:
                self.schedule = base  # an interrupted cooldown run, resumed by the same command
                base.span.train_end = train_end
                return
            raise ScheduleResumeError(
                f"--lr-cooldown-from-checkpoint {r}: the checkpoint is already in a cooldown from sample "
                f"{c.start:g} over {c.iterations} iterations ({c.shape}, to {c.end_lr:g}); resume it with "
                f"--lr-cooldown-from-checkpoint {c.iterations} --min-lr {c.end_lr:g} --lr-wsd-decay-style "
                f"{c.shape}, or pass --override-opt-param-scheduler for a new schedule")
        if position + r * gb > train_end + 1e-9:
            it = position / gb
            s = f"{it:.0f}" if float(it).is_integer() else f"{it:g}"
            raise ScheduleResumeError(
                f"--train-iters {train_end / gb:g} ends before the cooldown does: the checkpoint is at iteration "
                f"{s}, so --lr-cooldown-from-checkpoint {r} needs --train-iters {position / gb + r:g}")
        start_lr = base.lr(position)
        if start_lr < end_lr:
            raise ScheduleResumeError(
                f"--lr-cooldown-from-checkpoint: the LR at the checkpoint ({start_lr:g}) is already below "
                f"--min-lr {end_lr:g}; nothing to cool down")
        base.cooldown = CheckpointCooldown(position, (r - 1) * float(gb), start_lr, end_lr, self.cooldown_shape, r)
        base.span.train_end = train_end
        self.schedule = base
