"""LR and weight-decay schedules: every decay style against its closed-form formula, the three
units of every length, monotonicity, checkpoint state and resume rules, the cooldown from a
checkpoint, weight decay through the param groups, every invalid combination (one line naming the
flag), and the `megatron-ext schedule` / `cooldown` commands. No trainer runs here (see
test_schedule_resume.py)."""
import csv
import math

import pytest
import torch

from conftest import TINY, error_lines, run_module
from megatron_ext import cli
from megatron_ext.plan import parse_args
from megatron_ext.schedules import SCHEDULES
from megatron_ext.schedules.common.scheduler import (LRSchedule, ParamScheduler, ScheduleResumeError,
                                              WeightDecaySchedule, build_schedule)

GB, SEQ, ITERS = 4, 32, 100
L = GB * ITERS  # the decay length in samples (= training length by default)
MAX, MIN = 1e-3, 1e-5
BASE = ["--mock-data", "--train-iters", str(ITERS), "--global-batch-size", str(GB), "--micro-batch-size", str(GB),
        "--seq-length", str(SEQ), "--lr", str(MAX)]


def make(*extra):
    args = parse_args(BASE + [str(e) for e in extra], world_size=1)
    return args, build_schedule(args)


def close(a, b):
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-18)


# ---------------------------------------------------------------------------------------------
# Closed forms, written from the formulas in docs/schedules.md (positions p in samples)
# ---------------------------------------------------------------------------------------------

def warm(p, w):
    return MAX * p / w


def ref_linear(p, w=40, mn=MIN):
    if p < w:
        return warm(p, w)
    return MAX - (MAX - mn) * min(1.0, (p - w) / (L - w))


def ref_cosine(p, w=40, mn=MIN):
    if p < w:
        return warm(p, w)
    x = min(1.0, (p - w) / (L - w))
    return mn + (MAX - mn) * (1 + math.cos(math.pi * x)) / 2


def ref_isqrt(p, w=40, mn=MIN):
    if w > 0 and p < w:
        return warm(p, w)
    if p > L:
        return mn
    w1 = max(w, 1)
    return max(mn, MAX * math.sqrt(w1 / max(p, w1)))


SHAPES = {"linear": lambda x: 1 - x, "1-sqrt": lambda x: 1 - math.sqrt(x),
          "cosine": lambda x: (1 + math.cos(math.pi * x)) / 2}


def ref_stable_cooldown(p, w, start, shape, mn=MIN, end=L):
    if p < w:
        return warm(p, w)
    if p <= start:
        return MAX
    if p >= end:
        return mn
    return mn + (MAX - mn) * SHAPES[shape]((p - start) / (end - start))


def ref_infinite(p, w, cd_end, anneal, c, kind, alpha=10.0, mn=MIN):
    if p < w:
        return warm(p, w)
    if p < cd_end:
        x = (p - w) / (cd_end - w)
        if kind == "cosine":
            return c + (MAX - c) * (1 + math.cos(math.pi * x)) / 2
        h = lambda t: 1 / math.sqrt(1 + alpha * t) - 1  # noqa: E731
        return MAX + (c - MAX) * h(x) / h(1)
    if anneal is None or p <= anneal:
        return c
    if p >= L:
        return mn
    return c * (mn / c) ** ((p - anneal) / (L - anneal))


# (flags, closed form, phase boundaries in samples)
CASES = {
    "constant": (["--lr-decay-style", "constant", "--lr-warmup-iters", 10],
                 lambda p: warm(p, 40) if p < 40 else MAX, [40]),
    "linear": (["--lr-decay-style", "linear", "--lr-warmup-iters", 10, "--min-lr", MIN], ref_linear, [40, L]),
    "cosine": (["--lr-decay-style", "cosine", "--lr-warmup-iters", 10, "--min-lr", MIN], ref_cosine, [40, L]),
    "inverse-square-root": (["--lr-decay-style", "inverse-square-root", "--lr-warmup-iters", 10, "--min-lr", MIN],
                            ref_isqrt, [40, L]),
    "inverse-square-root-no-warmup": (["--lr-decay-style", "inverse-square-root", "--min-lr", MIN],
                                      lambda p: ref_isqrt(p, w=0), [1, L]),
    "constant-plus-cooldown": (["--lr-decay-style", "constant", "--lr_constant_plus_cooldown", "--lr-warmup-iters", 10,
                                "--min-lr", MIN],  # default cooldown fraction 0.05: the last 5% = 20 samples
                               lambda p: ref_stable_cooldown(p, 40, 380, "1-sqrt"), [40, 380, L]),
    "constant-plus-cooldown-frac": (["--lr-decay-style", "constant", "--lr_constant_plus_cooldown",
                                     "--lr_constant_plus_cooldown_frac", 0.25, "--lr-wsd-decay-style", "linear",
                                     "--lr-warmup-iters", 10, "--min-lr", MIN],
                                    lambda p: ref_stable_cooldown(p, 40, 300, "linear"), [40, 300, L]),
    "wsd": (["--lr-decay-style", "wsd", "--lr-warmup-iters", 10, "--min-lr", MIN],  # default: last 20%
            lambda p: ref_stable_cooldown(p, 40, 320, "1-sqrt"), [40, 320, L]),
    "wsd-linear": (["--lr-decay-style", "wsd", "--lr-wsd-decay-style", "linear", "--lr-wsd-decay-iters", 30,
                    "--lr-warmup-iters", 10, "--min-lr", MIN],
                   lambda p: ref_stable_cooldown(p, 40, 280, "linear"), [40, 280, L]),
    "wsd-cosine": (["--lr-decay-style", "wsd", "--lr-wsd-decay-style", "cosine", "--lr-wsd-decay-fraction", 0.5,
                    "--lr-warmup-iters", 10, "--min-lr", MIN, "--lr-decay-iters", 80],  # decay length 320 samples
                   lambda p: ref_stable_cooldown(p, 40, 160, "cosine", end=320), [40, 160, 320]),
    "infinite-cosine": (["--lr-decay-style", "infinite-cosine", "--constant-lr", 2e-4, "--lr-cooldown-fraction", 0.2,
                         "--lr-constant-fraction", 0.4, "--lr-warmup-iters", 10, "--min-lr", MIN],
                        lambda p: ref_infinite(p, 40, 120, 280, 2e-4, "cosine"), [40, 120, 280, L]),
    "infinite-inv-square-root": (["--lr-decay-style", "infinite-inv-square-root", "--constant-lr", 2e-4,
                                  "--lr-cooldown-fraction", 0.2, "--lr-constant-fraction", 0.4, "--timescale", 5,
                                  "--lr-warmup-iters", 10, "--min-lr", MIN],
                                 lambda p: ref_infinite(p, 40, 120, 280, 2e-4, "inv-sqrt", alpha=5.0), [40, 120, 280, L]),
    "infinite-cosine-no-anneal": (["--lr-decay-style", "infinite-cosine", "--constant-lr", 2e-4,
                                   "--lr-cooldown-fraction", 0.2, "--lr-warmup-iters", 10],  # min-lr 0 is fine here
                                  lambda p: ref_infinite(p, 40, 120, None, 2e-4, "cosine", mn=0.0), [40, 120]),
}


def points(boundaries):
    """Start, inside warmup, every boundary and its neighbours, mid-phases, last step, past the end."""
    pts = {0, 1, 2, 20, (ITERS - 1) * GB, L, L + GB, 2 * L, 10 * L}
    bs = [0] + sorted(boundaries)
    for b in boundaries:
        pts |= {b - 1, b, b + 1}
    for a, b in zip(bs, bs[1:]):
        pts |= {a + (b - a) / 3, (a + b) / 2, a + 2 * (b - a) / 3}
    return sorted(p for p in pts if p >= 0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_style_matches_its_closed_form(name):
    flags, ref, boundaries = CASES[name]
    _, s = make(*flags)
    for p in points(boundaries):
        assert close(s.lr(p), ref(p)), (name, p, s.lr(p), ref(p))
    # and at every step the trainer takes
    for k in range(ITERS + 5):
        assert close(s.lr(k * GB), ref(k * GB)), (name, k)


def test_phase_values_at_boundaries():
    """Spot values independent of the reference functions above."""
    _, s = make(*CASES["wsd"][0])
    assert s.lr(0) == 0 and close(s.lr(20), MAX / 2) and s.lr(40) == MAX and s.lr(320) == MAX
    assert close(s.lr(360), MIN + (MAX - MIN) * (1 - math.sqrt(0.5)))
    assert s.lr(L) == MIN and s.lr(5 * L) == MIN
    _, s = make(*CASES["infinite-cosine"][0])
    assert close(s.lr(80), (2e-4 + MAX) / 2) and close(s.lr(120), 2e-4) and close(s.lr(280), 2e-4)
    assert close(s.lr(340), math.sqrt(2e-4 * MIN)) and close(s.lr(L), MIN)  # geometric mean halfway
    _, s = make(*CASES["infinite-inv-square-root"][0])
    assert close(s.lr(40), MAX) and close(s.lr(120), 2e-4)
    _, s = make(*CASES["inverse-square-root"][0])
    assert close(s.lr(160), MAX / 2)  # sqrt(40 / 160)


def test_inverse_square_root_without_warmup_is_megatrons():
    """Megatron: warmup_steps = max(warmup, 1) sample, so with no warmup the LR falls from the first
    sample on: the step after k iterations gets lr / sqrt(k * global batch)."""
    _, s = make("--lr-decay-style", "inverse-square-root")
    assert s.lr(0) == MAX and s.lr(1) == MAX
    for k in (1, 2, 10, 99):
        assert close(s.lr(k * GB), MAX / math.sqrt(k * GB))
    assert s.lr(L + 1) == 0.0  # past the decay length: --min-lr (Megatron)


# ---------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------

UNIT_SETS = [
    ("warmup", [["--lr-warmup-iters", 10], ["--lr-warmup-samples", 40], ["--lr-warmup-tokens", 40 * SEQ],
                ["--lr-warmup-fraction", 0.1]]),
    ("decay", [["--lr-decay-iters", 80], ["--lr-decay-samples", 320], ["--lr-decay-tokens", 320 * SEQ]]),
    ("wsd", [["--lr-wsd-decay-iters", 25], ["--lr-wsd-decay-samples", 100], ["--lr-wsd-decay-tokens", 100 * SEQ],
             ["--lr-wsd-decay-fraction", 0.25]]),
]


UNIT_CASES = [(style, what, variants) for what, variants in UNIT_SETS
              for style in ("linear", "cosine", "inverse-square-root", "wsd", "infinite-cosine",
                            "infinite-inv-square-root", "constant")
              if what != "wsd" or style == "wsd"]


@pytest.mark.parametrize("style, what, variants", UNIT_CASES, ids=[f"{s}-{w}" for s, w, _ in UNIT_CASES])
def test_iters_samples_tokens_give_the_same_curve(style, what, variants):
    common = ["--lr-decay-style", style, "--min-lr", MIN]
    if style.startswith("infinite"):
        common += ["--constant-lr", 3e-4, "--lr-cooldown-fraction", 0.2, "--lr-constant-fraction", 0.3]
    if style == "constant":
        common += ["--lr-constant-plus-cooldown", "--lr-constant-plus-cooldown-frac", 0.3]
    curves = []
    for v in variants:
        extra = [] if what == "warmup" else ["--lr-warmup-iters", 5]
        _, s = make(*common, *extra, *v)
        curves.append([s.lr(k * GB) for k in range(ITERS + 10)])
    for c in curves[1:]:
        assert all(close(a, b) for a, b in zip(curves[0], c))
    assert len(set(curves[0])) > 3  # a real curve, not a constant


def test_training_length_in_iters_samples_or_tokens():
    lengths = (["--train-iters", ITERS], ["--train-samples", L], ["--train-tokens", L * SEQ])
    curves = []
    for flags in lengths:
        base = [b for b in BASE if b not in ("--train-iters", str(ITERS))]
        args = parse_args(base + [str(f) for f in flags] + ["--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.05"],
                          world_size=1)
        curves.append([build_schedule(args).lr(k * GB) for k in range(ITERS)])
    assert curves[0] == curves[1] == curves[2]


# ---------------------------------------------------------------------------------------------
# Shape properties
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_warmup_rises_then_the_lr_never_rises(name):
    flags, _, _ = CASES[name]
    _, s = make(*flags)
    w = s.span.warmup
    lrs = [s.lr(p) for p in range(0, 2 * L)]
    peak = int(math.ceil(w))
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b - 1e-18 for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    assert max(lrs) == MAX and min(lrs[peak:]) >= s.span.min_lr


@pytest.mark.parametrize("shape", ["1-sqrt", "linear", "cosine"])
def test_wsd_shapes_order(shape):
    """1-sqrt drops fastest at first, cosine slowest (same start and end)."""
    vals = {}
    for sh in ("1-sqrt", "linear", "cosine"):
        _, s = make("--lr-decay-style", "wsd", "--lr-wsd-decay-style", sh, "--min-lr", MIN)
        vals[sh] = s.lr(320 + 20)  # a quarter into the cooldown
    assert vals["1-sqrt"] < vals["linear"] < vals["cosine"]
    _, s = make("--lr-decay-style", "wsd", "--lr-wsd-decay-style", shape, "--min-lr", MIN)
    assert s.lr(320) == MAX and s.lr(L) == MIN


# ---------------------------------------------------------------------------------------------
# Invalid combinations: one line, naming the flag, at start-up
# ---------------------------------------------------------------------------------------------

INF = ["--lr-decay-style", "infinite-cosine"]
INVALID = [
    (INF + ["--lr-cooldown-fraction", "0.1"], "--lr-decay-style infinite-cosine needs --constant-lr"),
    (INF + ["--constant-lr", "2e-3", "--lr-cooldown-fraction", "0.1"], "--constant-lr 0.002 must be in (--min-lr 0, --lr 0.001]"),
    (INF + ["--constant-lr", "0", "--lr-cooldown-fraction", "0.1"], "--constant-lr 0 must be in (--min-lr 0"),
    (INF + ["--constant-lr", "1e-5", "--min-lr", "1e-5", "--lr-cooldown-fraction", "0.1"], "--constant-lr 1e-05 must be in"),
    (INF + ["--constant-lr", "1e-4"], "needs --lr-cooldown-fraction"),
    (INF + ["--constant-lr", "1e-4", "--lr-cooldown-fraction", "0.1", "--lr-constant-fraction", "0.5"],
     "--min-lr must be > 0 for the final anneal of infinite-cosine"),
    (["--lr-decay-style", "infinite-inv-square-root", "--constant-lr", "1e-4", "--lr-cooldown-fraction", "0.1",
      "--lr-constant-fraction", "0.5"], "--min-lr must be > 0 for the final anneal of infinite-inv-square-root"),
    (INF + ["--constant-lr", "1e-4", "--min-lr", "1e-6", "--lr-warmup-fraction", "0.3", "--lr-cooldown-fraction", "0.5",
            "--lr-constant-fraction", "0.3"], "--lr-constant-fraction 0.3: warmup + cooldown + constant"),
    (INF + ["--constant-lr", "1e-4", "--lr-warmup-fraction", "0.6", "--lr-cooldown-fraction", "0.5"],
     "--lr-cooldown-fraction 0.5: warmup + cooldown"),
    (INF + ["--constant-lr", "1e-4", "--lr-cooldown-fraction", "1.5"], "argument --lr-cooldown-fraction: must be in [0, 1]"),
    (["--lr-decay-style", "infinite-inv-square-root", "--constant-lr", "1e-4", "--lr-cooldown-fraction", "0.1",
      "--timescale", "0"], "--timescale must be > 0"),
    (INF + ["--constant-lr", "1e-4", "--lr-cooldown-fraction", "0.1", "--timescale", "3"],
     "--timescale has no effect with --lr-decay-style infinite-cosine"),
    (["--lr-decay-style", "cosine", "--constant-lr", "1e-4"], "--constant-lr has no effect with --lr-decay-style cosine"),
    (["--lr-decay-style", "linear", "--lr_constant_plus_cooldown"],
     "--lr-constant-plus-cooldown has no effect with --lr-decay-style linear"),
    (["--lr-decay-style", "constant", "--lr_constant_plus_cooldown_frac", "0.1"],
     "--lr-constant-plus-cooldown-frac has no effect without --lr-constant-plus-cooldown"),
    (["--lr-decay-style", "constant", "--lr_constant_plus_cooldown", "--lr_constant_plus_cooldown_frac", "0"],
     "--lr-constant-plus-cooldown-frac must be > 0"),
    (["--lr-decay-style", "constant", "--lr_constant_plus_cooldown", "--lr_constant_plus_cooldown_frac", "0.6",
      "--lr-warmup-fraction", "0.5"], "--lr-constant-plus-cooldown-frac 0.6: the cooldown"),
    (["--lr-decay-style", "wsd", "--lr-wsd-decay-fraction", "0.1", "--lr-wsd-decay-iters", "5"],
     "give one of --lr-wsd-decay-fraction/-iters/-samples/-tokens"),
    (["--lr-decay-style", "wsd", "--lr-wsd-decay-fraction", "0"], "--lr-wsd-decay-fraction must be > 0"),
    (["--lr-decay-style", "wsd", "--lr-warmup-iters", "50", "--lr-wsd-decay-iters", "60"],
     "--lr-wsd-decay-iters: the cooldown (240 samples) and the warmup (200 samples) do not fit"),
    (["--lr-decay-style", "cosine", "--lr-wsd-decay-style", "linear"], "--lr-wsd-decay-style has no effect"),
    (["--lr-decay-style", "wsd", "--lr-wsd-decay-style", "exponential"], "argument --lr-wsd-decay-style: invalid choice"),
    (["--lr-decay-style", "cosine", "--lr-wsd-decay-iters", "5"], "--lr-wsd-decay-iters has no effect with --lr-decay-style cosine"),
    (["--start-weight-decay", "0.1"], "--start-weight-decay needs --weight-decay-incr-style linear or cosine"),
    (["--end-weight-decay", "0.1"], "--end-weight-decay needs --weight-decay-incr-style linear or cosine"),
    (["--weight-decay-incr-style", "linear", "--start-weight-decay", "0"], "--weight-decay-incr-style linear needs --end-weight-decay"),
    (["--weight-decay-incr-style", "cosine", "--end-weight-decay", "0.1"], "--weight-decay-incr-style cosine needs --start-weight-decay"),
    (["--weight-decay-incr-style", "exp"], "argument --weight-decay-incr-style: invalid choice"),
    (["--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"],
     "give --override-opt-param-scheduler or --use-checkpoint-opt-param-scheduler, not both"),
    (["--lr-cooldown-from-checkpoint", "5"], "--lr-cooldown-from-checkpoint needs --load DIR"),
    (["--lr-cooldown-from-checkpoint", "1", "--load", "x"], "--lr-cooldown-from-checkpoint 1: give at least 2 iterations"),
    (["--lr-cooldown-from-checkpoint", "5", "--load", "x", "--override-opt-param-scheduler"],
     "--lr-cooldown-from-checkpoint keeps the checkpoint's schedule"),
    (["--lr-cooldown-from-checkpoint", "5", "--load", "x", "--finetune"],
     "--lr-cooldown-from-checkpoint continues the checkpoint's schedule; it cannot be combined with --finetune"),
    (["--lr-cooldown-from-checkpoint", "5", "--load", "/nonexistent/dir"],
     "--lr-cooldown-from-checkpoint: no checkpoint to cool down in --load /nonexistent/dir"),
    (["--min-lr", "2e-3"], "--min-lr 0.002 is larger than --lr 0.001"),
    (["--lr-decay-iters", "5", "--lr-decay-samples", "20"], "give one of --lr-decay-iters/-samples/-tokens"),
]


@pytest.mark.parametrize("argv, message", INVALID, ids=[m for _, m in INVALID])
def test_invalid_combinations_fail_at_start_up_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(BASE + argv, world_size=1)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert "--" in err[0].split("error:", 1)[1]  # names a flag


def test_invalid_schedule_stops_the_trainer_before_any_work():
    proc = run_module("megatron_ext.train", TINY + ["--mock-data", "--train-iters", "10", "--lr-decay-style",
                                                    "infinite-cosine", "--constant-lr", "1e-4",
                                                    "--lr-cooldown-fraction", "0.2", "--lr-constant-fraction", "0.2"])
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "--min-lr must be > 0" in lines[0], proc.stderr
    assert "iteration=" not in proc.stdout and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# Weight decay
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
def test_weight_decay_schedule_formulas(style):
    extra = ["--weight-decay", "0.05"] if style == "constant" else \
        ["--weight-decay-incr-style", style, "--start-weight-decay", "0.02", "--end-weight-decay", "0.1"]
    args, _ = make(*extra)
    sched = ParamScheduler.from_args(_Groups(), args)
    for p in (0, 1, 100, 200, 399, 400, 401, 4000):
        want = 0.05 if style == "constant" else (
            0.1 if p > L else 0.02 + 0.08 * (p / L if style == "linear" else (1 + math.cos(math.pi * (1 - p / L))) / 2))
        sched.step(p)
        assert close(sched.weight_decay, want), (p, sched.weight_decay, want)


class _Groups:
    def __init__(self):
        self.param_groups = [{"lr_mult": 1.0, "wd_mult": 1.0}]


class _TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(16, 8)
        self.layernorm = torch.nn.LayerNorm(8)
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.linear(self.layernorm(self.embedding(x))).sum()


def test_weight_decay_schedule_reaches_groups_through_their_multipliers():
    from megatron_ext.optimizers import OPTIMIZERS
    from megatron_ext.optimizers.common.param_groups import build_param_groups

    args, _ = make("--lr-decay-style", "linear", "--weight-decay-incr-style", "linear",
                   "--start-weight-decay", "0.0", "--end-weight-decay", "0.2", "--optimizer", "adamw")
    model = _TinyModel()
    groups = build_param_groups(model, lambda role: {"lr_mult": 3.0, "wd_mult": 0.5} if role == "hidden" else {})
    optimizer = OPTIMIZERS.get("adamw").obj(groups, args)
    sched = ParamScheduler.from_args(optimizer, args)
    roles = {g["role"]: g for g in optimizer.param_groups}
    assert {"embedding", "hidden", "norm", "bias"} <= set(roles)
    for p in (0, 200, 400):
        lr = sched.step(p)
        wd = 0.2 * p / L
        assert close(roles["embedding"]["lr"], lr) and close(roles["embedding"]["weight_decay"], wd)
        assert close(roles["hidden"]["lr"], 3 * lr) and close(roles["hidden"]["weight_decay"], 0.5 * wd)
        assert roles["norm"]["weight_decay"] == 0.0 and roles["bias"]["weight_decay"] == 0.0
        assert close(roles["norm"]["lr"], lr)
        model(torch.tensor([1, 2])).backward()
        optimizer.step()  # the real optimizer takes the values
        optimizer.zero_grad()
    assert roles["hidden"]["weight_decay"] == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------
# Checkpoint state and resume rules
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_state_has_every_length_and_rebuilds_the_same_curve(name):
    flags, _, _ = CASES[name]
    args, s = make(*flags, "--weight-decay-incr-style", "cosine", "--start-weight-decay", "0.01",
                   "--end-weight-decay", "0.1")
    sched = ParamScheduler.from_args(_Groups(), args)
    state = sched.state_dict()
    st = state["schedule"]
    for key in ("style", "max_lr", "min_lr", "warmup", "decay_end", "train_end", "cooldown"):
        assert key in st
    assert set(type(s.style).FIELDS) <= set(st)
    if name.startswith("infinite"):
        assert st["constant_lr"] == 2e-4 and st["cooldown_end"] == 120
    if name.startswith("wsd") or name.startswith("constant-plus"):
        assert st["cooldown_start"] > st["warmup"] and st["cooldown_shape"] in ("1-sqrt", "linear", "cosine")
    assert state["weight_decay"] == {"style": "cosine", "start": 0.01, "end": 0.1, "length": float(L)}
    torch.save(state, "/dev/null")  # plain Python values only
    rebuilt = LRSchedule.from_state(st)
    assert [rebuilt.lr(p) for p in range(0, 2 * L, 3)] == [s.lr(p) for p in range(0, 2 * L, 3)]
    wd = WeightDecaySchedule.from_state(state["weight_decay"])
    assert [wd.wd(p) for p in range(0, 2 * L, 7)] == [sched.wd_schedule.wd(p) for p in range(0, 2 * L, 7)]


def _resume(saved_flags, new_flags, position=200):
    args, _ = make(*saved_flags)
    state = {**ParamScheduler.from_args(_Groups(), args).state_dict(), "position": position}
    args2, _ = make(*new_flags)
    sched = ParamScheduler.from_args(_Groups(), args2)
    sched.load_state_dict(state)
    return sched


WSD = ["--lr-decay-style", "wsd", "--lr-warmup-iters", "10", "--min-lr", str(MIN)]


def test_resume_with_the_same_flags_continues():
    sched = _resume(WSD, WSD, position=360)
    assert sched.position == 360 and close(sched.current_lr, ref_stable_cooldown(360, 40, 320, "1-sqrt"))


@pytest.mark.parametrize("change, field", [
    (["--lr", "2e-3"], "max_lr (--lr) is 0.001 in the checkpoint but 0.002 on the command line"),
    (["--min-lr", "2e-5"], "min_lr (--min-lr) is 1e-05 in the checkpoint but 2e-05"),
    (["--lr-warmup-iters", "20"], "warmup (--lr-warmup-fraction/-iters/-samples/-tokens) is 40 samples in the checkpoint but 80 samples"),
    (["--lr-wsd-decay-fraction", "0.3"], "cooldown_start (--lr-wsd-decay-fraction/-iters/-samples/-tokens) is 320 samples"),
    (["--lr-wsd-decay-style", "linear"], "cooldown_shape (--lr-wsd-decay-style) is 1-sqrt in the checkpoint but linear"),
    (["--lr-decay-iters", "90"], "decay_end (--lr-decay-iters/-samples/-tokens or --train-iters) is 400 samples"),
    (["--lr-decay-style", "cosine"], "style (--lr-decay-style) is wsd in the checkpoint but cosine"),
    (["--weight-decay", "0.1"], "weight-decay schedule differs from the command line: start"),
])
def test_resume_with_different_flags_names_the_field(change, field):
    new = WSD + change
    with pytest.raises(ScheduleResumeError) as e:
        _resume(WSD, new)
    msg = str(e.value)
    assert "\n" not in msg and field in msg, msg
    assert "--override-opt-param-scheduler" in msg and "--use-checkpoint-opt-param-scheduler" in msg


def test_override_takes_the_command_line_and_use_checkpoint_takes_the_checkpoint():
    new = ["--lr-decay-style", "cosine", "--lr", "2e-3", "--lr-warmup-iters", "10"]
    sched = _resume(WSD, new + ["--override-opt-param-scheduler"], position=200)
    assert sched.schedule.style_name == "cosine" and sched.schedule.span.max_lr == 2e-3
    assert close(sched.current_lr, 1e-3 * (1 + math.cos(math.pi * 160 / 360)))  # 2e-3 * (1+cos)/2
    sched = _resume(WSD, new + ["--use-checkpoint-opt-param-scheduler"], position=360)
    assert sched.schedule.style_name == "wsd" and sched.schedule.span.max_lr == MAX
    assert close(sched.current_lr, ref_stable_cooldown(360, 40, 320, "1-sqrt"))


def test_extending_a_constant_run_needs_no_override():
    """The constant curve does not depend on the training length: more --train-iters resumes as is."""
    sched = _resume(["--lr-decay-style", "constant", "--lr-warmup-iters", "10"],
                    ["--lr-decay-style", "constant", "--lr-warmup-iters", "10", "--train-iters", "300"], position=380)
    assert sched.current_lr == MAX
    with pytest.raises(ScheduleResumeError, match="decay_end"):  # but a cosine run's length is its curve
        _resume(["--lr-decay-style", "cosine"], ["--lr-decay-style", "cosine", "--train-iters", "300"])


# ---------------------------------------------------------------------------------------------
# Cooldown from a checkpoint
# ---------------------------------------------------------------------------------------------

def _cooldown_state(tmp_path, saved_flags, position):
    (tmp_path / "latest").write_text("global_step1")  # build_schedule checks --load has a checkpoint
    args, _ = make(*saved_flags)
    return {**ParamScheduler.from_args(_Groups(), args).state_dict(), "position": position}


@pytest.mark.parametrize("shape", ["1-sqrt", "linear", "cosine"])
def test_cooldown_from_checkpoint_is_continuous_and_ends_at_min_lr(tmp_path, shape):
    const = ["--lr-decay-style", "constant", "--lr-warmup-iters", "10"]
    state = _cooldown_state(tmp_path, const, position=60 * GB)
    args, _ = make(*const, "--load", tmp_path, "--train-iters", 70, "--lr-cooldown-from-checkpoint", 10,
                   "--min-lr", MIN, "--lr-wsd-decay-style", shape)
    sched = ParamScheduler.from_args(_Groups(), args)
    sched.load_state_dict(state)
    s = sched.schedule
    assert close(sched.current_lr, MAX)  # iteration 61 (step 60) keeps the checkpoint's LR
    for k in range(10):  # steps 60..69 = iterations 61..70
        assert close(s.lr((60 + k) * GB), MIN + (MAX - MIN) * SHAPES[shape](k / 9)), k
    assert s.lr(69 * GB) == MIN and s.lr(200 * GB) == MIN  # the last iteration uses --min-lr
    assert s.lr(59 * GB) == MAX and s.lr(0) == 0  # before the checkpoint: the checkpoint's schedule
    cd = sched.state_dict()["schedule"]["cooldown"]
    assert cd == {"start": 240.0, "length": 36.0, "start_lr": MAX, "end_lr": MIN, "shape": shape, "iterations": 10}


def test_cooldown_from_a_wsd_stable_or_decaying_checkpoint(tmp_path):
    state = _cooldown_state(tmp_path, ["--lr-decay-style", "cosine", "--lr-warmup-iters", "10"], position=50 * GB)
    args, s0 = make("--lr-decay-style", "cosine", "--lr-warmup-iters", 10)
    args, _ = make("--load", tmp_path, "--train-iters", 60, "--lr-cooldown-from-checkpoint", 10, "--min-lr", 0,
                   "--lr-decay-style", "wsd")  # the command line's own schedule flags do not matter
    sched = ParamScheduler.from_args(_Groups(), args)
    sched.load_state_dict(state)
    assert close(sched.current_lr, s0.lr(200)) and sched.schedule.lr(59 * GB) == 0.0
    assert sched.schedule.style_name == "cosine"  # the checkpoint's schedule up to the checkpoint


def test_an_interrupted_cooldown_resumes_with_the_same_command(tmp_path):
    const = ["--lr-decay-style", "constant", "--lr-warmup-iters", "10"]
    state = _cooldown_state(tmp_path, const, position=60 * GB)
    cmd = [*const, "--load", tmp_path, "--train-iters", 70, "--lr-cooldown-from-checkpoint", 10, "--min-lr", MIN]
    args, _ = make(*cmd)
    first = ParamScheduler.from_args(_Groups(), args)
    first.load_state_dict(state)
    first.step(64 * GB)
    saved = {**first.state_dict(), "position": 65 * GB}  # a checkpoint at iteration 65
    again = ParamScheduler.from_args(_Groups(), make(*cmd)[0])
    again.load_state_dict(saved)
    assert [again.schedule.lr(k * GB) for k in range(80)] == [first.schedule.lr(k * GB) for k in range(80)]
    # a different cooldown request on a cooling checkpoint is refused ...
    other = ParamScheduler.from_args(_Groups(), make(*cmd[:-4], "--lr-cooldown-from-checkpoint", 5, "--min-lr", MIN)[0])
    with pytest.raises(ScheduleResumeError, match="already in a cooldown .* over 10 iterations"):
        other.load_state_dict(saved)
    # ... and so is resuming it without the flag (default rule: must match)
    plain = ParamScheduler.from_args(_Groups(), make(*const, "--train-iters", 70, "--min-lr", MIN)[0])
    with pytest.raises(ScheduleResumeError, match="cooldown .--lr-cooldown-from-checkpoint. is .* add --lr-cooldown-from-checkpoint 10"):
        plain.load_state_dict(saved)


@pytest.mark.parametrize("train_iters, min_lr, message", [
    (65, MIN, "--train-iters 65 ends before the cooldown does: the checkpoint is at iteration 60, so "
              "--lr-cooldown-from-checkpoint 10 needs --train-iters 70"),
    (70, 5e-4, None),
])
def test_cooldown_that_cannot_be_served_is_refused(tmp_path, train_iters, min_lr, message):
    state = _cooldown_state(tmp_path, ["--lr-decay-style", "linear", "--min-lr", "0"], position=60 * GB)
    args, _ = make("--lr-decay-style", "linear", "--load", tmp_path, "--train-iters", train_iters,
                   "--lr-cooldown-from-checkpoint", 10, "--min-lr", min_lr)
    sched = ParamScheduler.from_args(_Groups(), args)
    with pytest.raises(ScheduleResumeError) as e:
        sched.load_state_dict(state)
    assert "\n" not in str(e.value)
    assert (message or "is already below --min-lr 0.0005; nothing to cool down") in str(e.value)


def test_the_scheduler_prints_nothing(capsys, tmp_path):
    for name in sorted(CASES):
        args, _ = make(*CASES[name][0])
        sched = ParamScheduler.from_args(_Groups(), args)
        for k in range(ITERS):
            sched.step(k * GB)
        sched.load_state_dict({**sched.state_dict(), "position": 8})
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


# ---------------------------------------------------------------------------------------------
# megatron-ext schedule
# ---------------------------------------------------------------------------------------------

def _table(out):
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0].isdigit():
            rows[int(parts[0])] = (int(parts[1]), int(parts[2]), float(parts[3]), float(parts[4]))
    return rows


def test_schedule_command_prints_what_the_trainer_uses(capsys, tmp_path):
    flags = ["--train-iters", "40", "--global-batch-size", "8", "--micro-batch-size", "2", "--seq-length", "16",
             "--lr", "1e-3", "--lr-decay-style", "wsd", "--lr-warmup-iters", "4", "--min-lr", "1e-5",
             "--weight-decay-incr-style", "linear", "--start-weight-decay", "0", "--end-weight-decay", "0.1"]
    assert cli.main(["schedule", *flags, "--world-size", "2", "--csv", str(tmp_path / "s.csv")]) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert sorted(rows) == list(range(40))
    args = parse_args(flags + ["--mock-data"], world_size=2)
    assert args.gradient_accumulation_steps == 2
    s = build_schedule(args)
    for k, (samples, tokens, lr, wd) in rows.items():
        assert samples == 8 * k and tokens == 8 * 16 * k
        assert lr == pytest.approx(s.lr(8 * k), rel=1e-6, abs=1e-12)
        assert wd == pytest.approx(0.1 * k / 40, rel=1e-6, abs=1e-12)
    assert "cooldown start: 256 samples = 32 iterations" in out
    with open(tmp_path / "s.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 40 and float(table[35]["learning_rate"]) == s.lr(35 * 8)  # full precision


def test_schedule_command_chosen_steps_and_every(capsys):
    flags = ["--train-iters", "1000", "--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.01"]
    assert cli.main(["schedule", *flags, "--steps", "0,10,500,999,1500"]) == 0
    rows = _table(capsys.readouterr().out)
    assert sorted(rows) == [0, 10, 500, 999, 1500]
    assert rows[0][2] == 0 and rows[10][2] == pytest.approx(3e-4) and rows[1500][2] == 0
    assert rows[500][2] == pytest.approx(3e-4 * (1 + math.cos(math.pi * 490 / 990)) / 2, rel=1e-6)
    assert cli.main(["schedule", *flags, "--every", "300"]) == 0
    assert sorted(_table(capsys.readouterr().out)) == [0, 300, 600, 900, 999]
    assert cli.main(["schedule", *flags]) == 0
    out = capsys.readouterr().out
    assert len(_table(out)) == 101 and "101 of 1000 steps shown" in out


def test_schedule_command_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["schedule", "--train-iters", "10", "--steps", "1,x"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--steps: invalid step 'x'" in err[0]
    with pytest.raises(SystemExit) as e:
        cli.main(["schedule", "--train-iters", "10", "--lr-decay-style", "infinite-cosine", "--constant-lr", "1e-4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "needs --lr-cooldown-fraction" in err[0]


def test_schedule_command_plot(tmp_path, capsys):
    png = tmp_path / "lr.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit) as e:
            cli.main(["schedule", "--train-iters", "50", "--plot", str(png)])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "--plot needs matplotlib" in err[0]
        assert not png.exists()
        return
    assert cli.main(["schedule", "--train-iters", "50", "--lr-decay-style", "wsd", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_style_is_a_registered_plugin():
    assert {"constant", "linear", "cosine", "inverse-square-root", "wsd", "infinite-cosine",
            "infinite-inv-square-root"} <= set(SCHEDULES.names())
    assert SCHEDULES.get("infinite_cosine").name == "infinite-cosine"
    assert {"--constant-lr", "--lr-cooldown-fraction", "--lr-constant-fraction", "--timescale"} <= set(
        SCHEDULES.get("infinite-inv-square-root").flag_names())
    assert "--lr-constant-plus-cooldown-frac" in SCHEDULES.get("constant").flag_names()
