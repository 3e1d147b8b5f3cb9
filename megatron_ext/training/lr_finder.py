"""``--lr-finder``: an LR range test (Smith, arXiv 1506.01186; the fastai LRFinder recipe) run by the
real trainer on the run's own model, data, optimizer and parallel layout.

Iteration k of N uses the learning rate ``start * (end / start) ** (k / (N - 1))`` (exponential,
the default) or ``start + (end - start) * k / (N - 1)`` (``--lr-finder-mode linear``) instead of the
LR schedule; it is applied to every param group times the group's ``lr_mult`` by the trainer's own
``ParamScheduler`` (so hybrid optimizers' matrix groups, muP multipliers... move with it). The loss
of each iteration, averaged over data-parallel ranks, is smoothed with a bias-corrected EMA
(``avg = beta * avg + (1 - beta) * loss``, reported ``avg / (1 - beta ** k)``). The test stops
early when the smoothed loss exceeds ``--lr-finder-stop-factor`` (f) times the best smoothed loss
so far, at the first non-finite loss, or when the raw loss diverges before the lagging smoothed
loss shows it: one raw loss above f^2 x the best smoothed loss, or three in a row above f x it. No evaluation runs and no checkpoint is written.

Suggestions, from the smoothed loss after dropping the first ``--lr-finder-skip-start`` (default
N // 10) and the last ``--lr-finder-skip-end`` (default 5) recorded points:

* ``steepest``: the LR where the smoothed loss falls fastest against log(LR) (central differences);
* ``min_loss_div10``: the LR of the lowest smoothed loss, divided by 10.

Output in ``<--save>/lr_finder/`` (``./lr_finder/`` without ``--save``): ``lr_finder.csv``
(``learning_rate,loss,smoothed_loss``, one row per iteration, written as it runs),
``lr_finder.json`` (suggestions, stop reason, settings) and ``lr_finder.png`` when matplotlib is
installed. ``megatron-ext lr-finder DIR`` recomputes the suggestions with other trimming.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence

from megatron_ext.argtypes import choice_ci, finite_float, nonneg_int, positive_int
from megatron_ext.training.run_mode import RunMode
from megatron_ext.platform.accelerator import current_device
from megatron_ext.plotting import pyplot
from megatron_ext.schedules.common.scheduler import ParamScheduler, build_weight_decay_schedule
from megatron_ext.training.loss import dp_mean
from megatron_ext.training.metrics import is_rank0, print_rank0

DIR_NAME = "lr_finder"
CSV_NAME = "lr_finder.csv"
JSON_NAME = "lr_finder.json"
PLOT_NAME = "lr_finder.png"
CSV_HEADER = ["learning_rate", "loss", "smoothed_loss"]
MODES = ("exponential", "linear")
MIN_POINTS = 3  # fewer points left after trimming give no suggestion
RAW_STOP_RUN = 3  # this many raw losses in a row above stop_factor x best also stop the sweep

# dest -> default of every finder flag except --lr-finder itself (a flag given without --lr-finder is an error)
DEFAULTS = {"lr_finder_start": 1e-7, "lr_finder_end": 10.0, "lr_finder_iters": None, "lr_finder_mode": "exponential",
            "lr_finder_beta": 0.98, "lr_finder_stop_factor": 4.0, "lr_finder_skip_start": None,
            "lr_finder_skip_end": 5}


# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------


def add_lr_finder_arguments(g) -> None:
    d = DEFAULTS
    g.add_argument("--lr-finder", action="store_true",
                   help="run an LR range test instead of training: sweep the LR, stop when the loss diverges, "
                        "write the curve and suggested LRs to <save>/lr_finder/ (no checkpoint is written)")
    g.add_argument("--lr-finder-start", type=finite_float, default=d["lr_finder_start"], help="first LR of the sweep")
    g.add_argument("--lr-finder-end", type=finite_float, default=d["lr_finder_end"], help="last LR of the sweep")
    g.add_argument("--lr-finder-iters", type=positive_int, default=d["lr_finder_iters"],
                   help="iterations of the sweep (default: the run's training iterations, --train-iters)")
    g.add_argument("--lr-finder-mode", type=choice_ci(*MODES), default=d["lr_finder_mode"],
                   help="LR spacing between start and end (exponential: evenly in log LR)")
    g.add_argument("--lr-finder-beta", type=finite_float, default=d["lr_finder_beta"],
                   help="EMA factor of the smoothed loss, in [0, 1) (0: no smoothing)")
    g.add_argument("--lr-finder-stop-factor", type=finite_float, default=d["lr_finder_stop_factor"],
                   help="stop once the smoothed loss exceeds this times the best smoothed loss (> 1)")
    g.add_argument("--lr-finder-skip-start", type=nonneg_int, default=d["lr_finder_skip_start"],
                   help="points dropped at the start before suggesting (default: sweep iterations // 10)")
    g.add_argument("--lr-finder-skip-end", type=nonneg_int, default=d["lr_finder_skip_end"],
                   help="points dropped at the end before suggesting")


def validate_lr_finder_args(args) -> None:
    """Raise ValueError (one line naming the flag) for finder settings that cannot work."""
    if not args.lr_finder:
        for dest, default in DEFAULTS.items():
            if getattr(args, dest) != default:
                raise ValueError(f"--{dest.replace('_', '-')} has no effect without --lr-finder")
        return
    start, end = args.lr_finder_start, args.lr_finder_end
    if start <= 0:
        raise ValueError(f"--lr-finder-start must be > 0, got {start:g}")
    if end <= start:
        raise ValueError(f"--lr-finder-end {end:g} must be larger than --lr-finder-start {start:g}")
    if args.lr_finder_iters is not None and args.lr_finder_iters < 2:
        raise ValueError(f"--lr-finder-iters must be at least 2 (a sweep has a start and an end), "
                         f"got {args.lr_finder_iters}")
    if args.lr_finder_iters is None and args.train_iters < 2:
        raise ValueError(f"--lr-finder sweeps over --train-iters iterations, which is {args.train_iters}: "
                         "give --lr-finder-iters (at least 2)")
    if not 0.0 <= args.lr_finder_beta < 1.0:
        raise ValueError(f"--lr-finder-beta must be in [0, 1), got {args.lr_finder_beta:g}")
    if args.lr_finder_stop_factor <= 1.0:
        raise ValueError(f"--lr-finder-stop-factor must be > 1, got {args.lr_finder_stop_factor:g}")
    if args.lr_cooldown_from_checkpoint is not None:
        raise ValueError("--lr-cooldown-from-checkpoint has no effect with --lr-finder (the sweep sets every LR)")
    if getattr(args, "schedulefree_warmup_steps", 0):
        raise ValueError(f"--schedulefree-warmup-steps {args.schedulefree_warmup_steps} would scale the first "
                         "iterations' LR below the sweep's; use 0 with --lr-finder")


# --------------------------------------------------------------------------------------------
# The sweep, the smoothed loss, the stop rule
# --------------------------------------------------------------------------------------------


def sweep_lr(k: int, iters: int, start: float, end: float, mode: str = "exponential") -> float:
    """LR of iteration ``k`` (0-based) of ``iters``: ``start`` at 0, ``end`` at ``iters - 1``."""
    x = min(max(k, 0), iters - 1) / (iters - 1) if iters > 1 else 0.0
    if mode == "linear":
        return start + (end - start) * x
    return start * (end / start) ** x


class RangeTest:
    """The recorded curve and the stop rule; pure Python, identical on every rank."""

    def __init__(self, start: float, end: float, iters: int, mode: str = "exponential", beta: float = 0.98,
                 stop_factor: float = 4.0):
        self.start, self.end, self.iters, self.mode = start, end, iters, mode
        self.beta, self.stop_factor = beta, stop_factor
        self.lrs: List[float] = []
        self.losses: List[float] = []
        self.smoothed: List[float] = []
        self.best = math.inf
        self.best_lr: Optional[float] = None
        self._avg = 0.0
        self._above = 0  # consecutive raw losses above stop_factor x the best smoothed loss
        self.stop_reason: Optional[str] = None

    def lr(self, k: int) -> float:
        return sweep_lr(k, self.iters, self.start, self.end, self.mode)

    def record(self, lr: float, loss: float) -> Optional[str]:
        """Add one iteration; returns the stop reason once the test is over, else None."""
        k = len(self.losses) + 1
        if math.isfinite(loss):
            self._avg = self.beta * self._avg + (1.0 - self.beta) * loss
            smooth = self._avg / (1.0 - self.beta ** k)
        else:
            smooth = math.nan
        self.lrs.append(lr)
        self.losses.append(loss)
        self.smoothed.append(smooth)
        if not math.isfinite(loss):
            self.stop_reason = f"non-finite loss ({loss}) at lr {lr:.4g} (iteration {k})"
        elif smooth < self.best:
            self.best, self.best_lr = smooth, lr
        elif smooth > self.stop_factor * self.best:
            self.stop_reason = (f"diverged at lr {lr:.4g} (iteration {k}): smoothed loss {smooth:.4g} > "
                                f"{self.stop_factor:g} x best {self.best:.4g}")
        # The smoothed loss lags the raw one by ~1/(1-beta) iterations: on a short sweep a raw loss
        # that has already exploded can keep the smoothed one under the factor to the end.
        if self.stop_reason is None and math.isfinite(loss) and math.isfinite(self.best):
            self._above = self._above + 1 if loss > self.stop_factor * self.best else 0
            if loss > self.stop_factor ** 2 * self.best or self._above >= RAW_STOP_RUN:
                self.stop_reason = (f"diverged at lr {lr:.4g} (iteration {k}): loss {loss:.4g} > "
                                    f"{self.stop_factor ** 2 if self._above < RAW_STOP_RUN else self.stop_factor:g} x "
                                    f"best smoothed {self.best:.4g}")
        if self.stop_reason is None and k >= self.iters:
            self.stop_reason = f"completed the sweep ({k} iterations, up to lr {lr:.4g})"
        return self.stop_reason


def resmooth(losses: Sequence[float], beta: float) -> List[float]:
    """The smoothed loss ``RangeTest`` would record for ``losses`` with another ``beta``."""
    t = RangeTest(1.0, 2.0, max(len(losses), 2), beta=beta, stop_factor=math.inf)
    for loss in losses:
        t.record(1.0, loss)
    return t.smoothed


# --------------------------------------------------------------------------------------------
# Suggestions (pure functions of the recorded curve)
# --------------------------------------------------------------------------------------------


def default_skip_start(iters: int) -> int:
    return iters // 10


def suggest(lrs: Sequence[float], smoothed: Sequence[float], skip_start: int, skip_end: int) -> Dict[str, Any]:
    """Suggested LRs from the smoothed loss after dropping ``skip_start`` points at the start and
    ``skip_end`` at the end (and any non-finite point): ``steepest`` (the most negative slope of
    smoothed loss against log LR, central differences) and ``min_loss_div10`` (the LR of the lowest
    smoothed loss / 10). A suggestion that cannot be made is None and ``note`` says why."""
    import numpy as np

    n = len(lrs)
    kept = [(lr, s) for lr, s in list(zip(lrs, smoothed))[skip_start:max(n - skip_end, 0)]
            if math.isfinite(s) and lr > 0]
    out: Dict[str, Any] = {"steepest": None, "min_loss_div10": None, "min_loss_lr": None, "min_smoothed_loss": None,
                           "steepest_slope": None, "points_used": len(kept), "skip_start": skip_start,
                           "skip_end": skip_end, "note": None}
    if len(kept) < MIN_POINTS:
        out["note"] = (f"too few points after trimming ({len(kept)} of {n} recorded, skip start {skip_start}, "
                       f"skip end {skip_end}; need {MIN_POINTS}): sweep more iterations or trim less "
                       "(megatron-ext lr-finder DIR --skip-start A --skip-end B)")
        return out
    lr = np.array([p[0] for p in kept], dtype=np.float64)
    sm = np.array([p[1] for p in kept], dtype=np.float64)
    i_min = int(np.argmin(sm))
    out["min_loss_lr"] = float(lr[i_min])
    out["min_smoothed_loss"] = float(sm[i_min])
    out["min_loss_div10"] = float(lr[i_min]) / 10.0
    slopes = np.gradient(sm, np.log(lr))
    i_steep = int(np.argmin(slopes))
    if slopes[i_steep] < 0:
        out["steepest"] = float(lr[i_steep])
        out["steepest_slope"] = float(slopes[i_steep])
    else:
        out["note"] = "the smoothed loss never falls in the trimmed range: no steepest-descent suggestion"
    return out


def format_suggestions(s: Dict[str, Any]) -> List[str]:
    lines = []
    if s["steepest"] is not None:
        lines.append(f"steepest descent of the smoothed loss: lr {s['steepest']:.3g}")
    if s["min_loss_div10"] is not None:
        lines.append(f"minimum smoothed loss {s['min_smoothed_loss']:.4g} at lr {s['min_loss_lr']:.3g}: "
                     f"lr {s['min_loss_div10']:.3g} (min / 10)")
    if s["note"]:
        lines.append(f"note: {s['note']}")
    return lines


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def output_dir(args) -> str:
    return os.path.abspath(os.path.join(args.save, DIR_NAME) if args.save else DIR_NAME)


def read_curve(path: str):
    """(lrs, losses, smoothed) from an ``lr_finder.csv``; ValueError (one line) if it is not one."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0]] != CSV_HEADER:
        raise ValueError(f"{path}: not an LR finder CSV (expected the header {','.join(CSV_HEADER)})")
    lrs, losses, smoothed = [], [], []
    for line, row in enumerate(rows[1:], start=2):
        try:
            lr, loss, smooth = (float(v) for v in row)
        except ValueError:
            raise ValueError(f"{path}, line {line}: expected 3 numbers, got {','.join(row)!r}") from None
        lrs.append(lr)
        losses.append(loss)
        smoothed.append(smooth)
    return lrs, losses, smoothed


def plot(path: str, lrs, losses, smoothed, suggestions: Dict[str, Any], title: str) -> bool:
    """Write the curve with the suggestions marked; False when matplotlib is not installed."""

    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(lrs, losses, color="tab:blue", alpha=0.3, label="loss")
    ax.plot(lrs, smoothed, color="tab:blue", label="smoothed loss")
    n, a, b = len(lrs), suggestions["skip_start"], suggestions["skip_end"]
    if n and (a or b):  # grey out the points the suggestions ignore
        if a:
            ax.axvspan(lrs[0], lrs[min(a, n - 1)], color="grey", alpha=0.15, lw=0)
        if b:
            ax.axvspan(lrs[max(n - b - 1, 0)], lrs[-1], color="grey", alpha=0.15, lw=0, label="trimmed")
    for key, color, label in (("steepest", "tab:red", "steepest descent"), ("min_loss_div10", "tab:green", "min / 10")):
        if suggestions[key] is not None:
            ax.axvline(suggestions[key], color=color, linestyle="--", label=f"{label}: {suggestions[key]:.3g}")
    finite = [s for s in smoothed if math.isfinite(s)]
    if finite:  # keep the divergence from flattening the interesting part
        low, first = min(finite + [v for v in losses if math.isfinite(v)]), finite[0]
        span = max(first - low, 0.05 * abs(first), 1e-3)
        ax.set_ylim(low - 0.1 * span, first + 0.5 * span)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
# In the trainer
# --------------------------------------------------------------------------------------------


class _SweepSchedule:
    """What ``ParamScheduler`` asks a schedule for: the LR at a position (in samples)."""

    def __init__(self, finder: "LRFinder"):
        self.finder = finder

    def lr(self, position: float) -> float:
        f = self.finder
        return f.test.lr(round((position - f.origin) / f.args.global_batch_size))


class LRFinder(RunMode):
    """``--lr-finder`` as the trainer's run mode: ``scheduler`` replaces the LR schedule by the
    sweep, ``begin`` (after any ``--load``) says where the sweep ends, ``after_iteration`` records
    each iteration and applies the stop rule, ``finish`` writes the results (rank 0) and the log
    summary. No evaluation and no checkpoint."""

    evaluates_and_saves = False

    def __init__(self, args):
        self.args = args
        self.iters = args.lr_finder_iters or args.train_iters
        self.test = RangeTest(args.lr_finder_start, args.lr_finder_end, self.iters, args.lr_finder_mode,
                              args.lr_finder_beta, args.lr_finder_stop_factor)
        self.skip_start = args.lr_finder_skip_start
        if self.skip_start is None:
            self.skip_start = default_skip_start(self.iters)
        self.skip_end = args.lr_finder_skip_end
        self.dir = output_dir(args)
        self.origin = 0.0
        self.start_iteration = 0
        self.skipped_iterations: List[int] = []
        self._skipped_before = 0
        self._csv = None

    def scheduler(self, optimizer, plan=None):
        """The trainer's ``ParamScheduler`` (every group gets lr x lr_mult, the run's weight decay)
        driven by the sweep; a loaded checkpoint's schedule is not checked against it."""

        return ParamScheduler(optimizer, _SweepSchedule(self), build_weight_decay_schedule(self.args), resume="override")

    def begin(self, start: dict, skipped_steps: int = 0) -> int:
        """The sweep starts at the start iteration (0, or a loaded checkpoint's) and the run ends
        with it: returns ``iteration + iters``."""

        iteration, consumed = start["iteration"], start["consumed_samples"]
        self.origin, self.start_iteration = float(consumed), iteration
        self._skipped_before = skipped_steps
        if is_rank0():
            os.makedirs(self.dir, exist_ok=True)
            for name in (JSON_NAME, PLOT_NAME):  # results of an earlier test here would not match the new CSV
                if os.path.exists(os.path.join(self.dir, name)):
                    os.remove(os.path.join(self.dir, name))
            self._csv = open(os.path.join(self.dir, CSV_NAME), "w", newline="")
            csv.writer(self._csv).writerow(CSV_HEADER)
        a = self.args
        print_rank0(f"LR finder: {self.iters} iterations, lr {a.lr_finder_start:g} -> {a.lr_finder_end:g} "
                    f"({a.lr_finder_mode}), stop when the smoothed loss (beta {a.lr_finder_beta:g}) exceeds "
                    f"{a.lr_finder_stop_factor:g} x its best; the LR schedule is not used, no evaluation, no "
                    f"checkpoint; results in {self.dir}")
        return iteration + self.iters

    def record(self, lr: float, loss: float, skipped_steps: int = 0) -> bool:
        """Add the data-parallel mean loss of the iteration just run at ``lr``; True: stop now.
        ``skipped_steps`` is the engine's running count (fp16 overflow skips)."""
        import torch

        if skipped_steps - self._skipped_before > len(self.skipped_iterations):
            self.skipped_iterations.append(len(self.test.losses) + 1)
        stop = self.test.record(lr, loss) is not None
        if self._csv is not None:
            csv.writer(self._csv).writerow([repr(lr), repr(loss), repr(self.test.smoothed[-1])])
            self._csv.flush()  # an interrupted test still leaves its curve
        # Every rank computed the same decision from the same all-reduced loss; agreeing on it
        # costs one scalar and can never leave a rank waiting in the next iteration.
        flag = torch.tensor([1.0 if stop else 0.0], device=current_device())
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def after_iteration(self, lr: float, iteration_loss, engine) -> bool:
        """The trainer's hook: the data-parallel mean of the iteration's loss goes to ``record``."""

        return self.record(lr, dp_mean(iteration_loss), engine.skipped_steps)

    def finish(self) -> Dict[str, Any]:

        t = self.test
        if t.stop_reason is None:  # ended by other means (e.g. another rank's decision)
            t.stop_reason = f"interrupted after {len(t.losses)} of {self.iters} iterations"
        s = suggest(t.lrs, t.smoothed, self.skip_start, self.skip_end)
        a = self.args
        result = {
            "suggestions": {k: s[k] for k in ("steepest", "min_loss_div10")},
            "details": s,
            "stop_reason": t.stop_reason,
            "stopped_early": len(t.losses) < self.iters,
            "iterations_run": len(t.losses),
            "iterations_planned": self.iters,
            "best_smoothed_loss": t.best if math.isfinite(t.best) else None,
            "lr_at_best_smoothed_loss": t.best_lr,
            "last_lr": t.lrs[-1] if t.lrs else None,
            "skipped_iterations": self.skipped_iterations,
            "settings": {
                "start": a.lr_finder_start, "end": a.lr_finder_end, "iters": self.iters, "mode": a.lr_finder_mode,
                "beta": a.lr_finder_beta, "stop_factor": a.lr_finder_stop_factor, "skip_start": self.skip_start,
                "skip_end": self.skip_end, "optimizer": a.optimizer, "global_batch_size": a.global_batch_size,
                "seq_length": a.seq_length, "data_parallel_size": a.data_parallel_size,
                "tensor_model_parallel_size": a.tensor_model_parallel_size, "zero_stage": a.zero_stage,
                "precision": "bf16" if a.bf16 else "fp16" if a.fp16 else "fp32", "start_iteration": self.start_iteration,
                "load": a.load,
            },
            "files": {"csv": os.path.join(self.dir, CSV_NAME), "json": os.path.join(self.dir, JSON_NAME),
                      "plot": None},
        }
        if is_rank0():
            if self._csv is not None:
                self._csv.close()
                self._csv = None
            png = os.path.join(self.dir, PLOT_NAME)
            title = f"LR range test: {a.optimizer}, global batch {a.global_batch_size}, {len(t.losses)} iterations"
            if plot(png, t.lrs, t.losses, t.smoothed, s, title):
                result["files"]["plot"] = png
            with open(result["files"]["json"], "w") as f:
                json.dump(result, f, indent=2)
                f.write("\n")
        print_rank0(f"LR finder: {len(t.losses)}/{self.iters} iterations: {t.stop_reason}")
        if self.skipped_iterations:
            print_rank0(f"LR finder: {len(self.skipped_iterations)} iterations skipped their update "
                        f"(fp16 overflow): {self.skipped_iterations[:10]}")
        for line in format_suggestions(s):
            print_rank0(f"LR finder: {line}")
        plot_note = result["files"]["plot"] or "no plot (matplotlib is not installed)"
        print_rank0(f"LR finder: wrote {result['files']['csv']}, {result['files']['json']}, {plot_note}")
        return result
