"""``--lr-finder``: the range test in the real trainer (one process and two under torchrun), its
suggestion logic on synthetic curves with known answers, its files, its errors, the
``megatron-ext lr-finder`` command and the launcher pass-through."""
import csv
import importlib.util
import json
import math
import os

import numpy as np
import pytest

from conftest import TINY, error_lines, read_metrics, run_module, run_trainer, tree_digest
from megatron_ext.plan import parse_args
from megatron_ext.training.lr_finder import CSV_HEADER, LRFinder, RangeTest, resmooth, suggest, sweep_lr

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

# Global batch 4; a sweep of 1e-5 -> 100 over 60 iterations: AdamW diverges well before the end.
SWEEP = ["--mock-data", "--train-iters", "60", "--global-batch-size", "4", "--lr-finder",
         "--lr-finder-start", "1e-5", "--lr-finder-end", "100"]


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [[float(v) for v in r] for r in rows[1:]]


# ------------------------------------------------------------------------------------------
# Pure parts: the sweep, the smoothed loss, the stop rule, the suggestions
# ------------------------------------------------------------------------------------------


def test_sweep_reaches_both_ends_exponential_and_linear():
    lrs = [sweep_lr(k, 5, 1e-4, 1.0) for k in range(5)]
    assert lrs == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0], rel=1e-12)
    assert [sweep_lr(k, 5, 0.1, 0.5, "linear") for k in range(5)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])


def test_smoothed_loss_is_a_bias_corrected_ema_and_the_stop_rules():
    t = RangeTest(1e-3, 1.0, 100, beta=0.9, stop_factor=4)
    losses = [5.0, 3.0, 4.0]
    for loss in losses:
        assert t.record(0.1, loss) is None
    avg = 0.0
    for k, loss in enumerate(losses, 1):
        avg = 0.9 * avg + 0.1 * loss
        assert t.smoothed[k - 1] == pytest.approx(avg / (1 - 0.9 ** k))
    assert t.smoothed[0] == 5.0  # bias correction: the first point is the loss itself
    while t.stop_reason is None:
        t.record(0.1, 1000.0)
    assert t.stop_reason.startswith("diverged") and t.smoothed[-1] > 4 * t.best and t.smoothed[-2] <= 4 * t.best

    t = RangeTest(1e-3, 1.0, 100)
    t.record(1e-3, 2.0)
    assert t.record(2e-3, float("nan")).startswith("non-finite loss")
    t = RangeTest(1e-3, 1.0, 3)
    assert [t.record(t.lr(k), 1.0) for k in range(3)][-1].startswith("completed the sweep (3 iterations")


def curve(fn, n=121):
    lrs = np.logspace(-6, 0, n)
    return list(lrs), [fn(math.log10(lr)) for lr in lrs]


def test_steepest_descent_on_a_known_curve():
    # the loss falls fastest (against log lr) at lr 1e-3, then rises from lr 1e-1
    lrs, loss = curve(lambda x: 5 - math.tanh(2 * (x + 3)) + (max(x + 1, 0) * 10) ** 2)
    s = suggest(lrs, loss, 0, 0)
    assert s["steepest"] == pytest.approx(1e-3, rel=1e-9) and s["steepest_slope"] < 0
    assert s["points_used"] == 121 and s["note"] is None


def test_min_loss_over_ten_on_a_known_curve():
    lrs, loss = curve(lambda x: (x + 2) ** 2)
    s = suggest(lrs, loss, 12, 5)
    assert s["min_loss_lr"] == pytest.approx(1e-2, rel=1e-9)
    assert s["min_loss_div10"] == pytest.approx(1e-3, rel=1e-9) and s["min_smoothed_loss"] == pytest.approx(0, abs=1e-12)


def test_trimming_drops_the_start_and_the_end():
    # a cliff in the first 10% of the sweep and a crash in the last 5 points would win untrimmed
    lrs, loss = curve(lambda x: 5 - math.tanh(2 * (x + 3)) + (20 if x < -5.5 else 0))
    loss[-5:] = [-100.0] * 5
    untrimmed = suggest(lrs, loss, 0, 0)
    assert untrimmed["steepest"] != pytest.approx(1e-3) and untrimmed["min_loss_lr"] == lrs[-5]
    s = suggest(lrs, loss, 12, 5)
    assert s["steepest"] == pytest.approx(1e-3, rel=1e-9)
    assert s["min_loss_lr"] == lrs[-6] and s["points_used"] == 121 - 12 - 5


def test_no_suggestion_without_points_or_descent():
    lrs, loss = curve(lambda x: x)  # rises everywhere
    s = suggest(lrs, loss, 0, 0)
    assert s["steepest"] is None and "never falls" in s["note"] and s["min_loss_lr"] == lrs[0]
    s = suggest(lrs[:10], loss[:10], 4, 5)
    assert s["steepest"] is None and s["min_loss_div10"] is None and "too few points" in s["note"]
    s = suggest([1e-3, 1e-2, 1e-1, 1.0], [3.0, 2.0, 1.0, float("nan")], 0, 0)  # the non-finite point is ignored
    assert s["points_used"] == 3 and s["min_loss_lr"] == 1e-1


def test_every_param_group_gets_the_sweep_times_its_lr_mult():
    args = parse_args(TINY + SWEEP + ["--lr-finder-iters", "11", "--lr-finder-end", "1"], world_size=1)
    groups = [{"lr_mult": 1.0, "wd_mult": 1.0}, {"lr_mult": 0.25, "wd_mult": 0.0}, {}]

    class Groups:  # the one thing ParamScheduler reads from an optimizer
        param_groups = groups

    finder = LRFinder(args)
    scheduler = finder.scheduler(Groups())
    finder.origin = 8.0  # a run resumed at 8 samples: the sweep starts there
    for k in (0, 5, 10):
        lr = scheduler.step(8.0 + k * args.global_batch_size)
        assert lr == pytest.approx(sweep_lr(k, 11, 1e-5, 1.0))
        assert [g["lr"] for g in groups] == pytest.approx([lr, 0.25 * lr, lr])
        assert [g["weight_decay"] for g in groups] == pytest.approx([args.weight_decay, 0.0, args.weight_decay])


@pytest.mark.parametrize("extra, message", [
    (["--lr-finder-start", "0"], "--lr-finder-start must be > 0"),
    (["--lr-finder-start", "1", "--lr-finder-end", "0.5"], "--lr-finder-end 0.5 must be larger than --lr-finder-start 1"),
    (["--lr-finder-iters", "1"], "--lr-finder-iters must be at least 2"),
    (["--lr-finder-iters", "0"], "argument --lr-finder-iters: must be a positive integer"),
    (["--lr-finder-beta", "1"], "--lr-finder-beta must be in [0, 1)"),
    (["--lr-finder-stop-factor", "1"], "--lr-finder-stop-factor must be > 1"),
    (["--lr-finder-mode", "cubic"], "argument --lr-finder-mode: invalid choice 'cubic'"),
    (["--optimizer", "adamwschedulefree", "--schedulefree-warmup-steps", "5"], "--schedulefree-warmup-steps 5"),
])
def test_bad_finder_flags_are_one_line(extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(TINY + SWEEP + extra, world_size=1)
    assert e.value.code == 2
    err = [l for l in capsys.readouterr().err.strip().splitlines() if l.strip()]
    assert len(err) == 1 and message in err[0], err


def test_finder_flag_without_lr_finder_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(TINY + ["--mock-data", "--train-iters", "5", "--lr-finder-end", "3"], world_size=1)
    assert "--lr-finder-end has no effect without --lr-finder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# The real trainer
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dp1(tmp_path_factory):
    save = tmp_path_factory.mktemp("dp1") / "run"
    proc = run_trainer(TINY + SWEEP + ["--micro-batch-size", "4", "--save", str(save), "--save-interval", "5"])
    return save, proc


def test_range_test_stops_on_divergence_and_suggests_inside_the_sweep(dp1):
    save, proc = dp1
    out = save / "lr_finder"
    header, rows = read_csv(out / "lr_finder.csv")
    result = json.loads((out / "lr_finder.json").read_text())
    assert header == CSV_HEADER
    n = result["iterations_run"]
    assert len(rows) == n and 10 < n < 60 and result["stopped_early"]
    assert result["stop_reason"].startswith("diverged") and result["iterations_planned"] == 60
    lrs = [r[0] for r in rows]
    assert lrs == pytest.approx([sweep_lr(k, 60, 1e-5, 100) for k in range(n)], rel=1e-12)
    assert lrs[-1] > 1.0  # it stopped because the LR got large, not at random
    # the smoothed column is the bias-corrected EMA of the loss column, and the stop rule held
    t = RangeTest(1e-5, 100, 60)
    for lr, loss, _ in rows:
        t.record(lr, loss)
    assert [r[2] for r in rows] == pytest.approx(t.smoothed, rel=1e-12) and t.stop_reason == result["stop_reason"]
    sug = result["suggestions"]
    for key in ("steepest", "min_loss_div10"):
        assert 1e-5 < sug[key] < lrs[-1], key
    assert sug["steepest"] < result["details"]["min_loss_lr"]
    assert sug == {k: v for k, v in suggest(lrs, [r[2] for r in rows], 6, 5).items() if k in sug}
    assert result["settings"]["skip_start"] == 6 and result["settings"]["data_parallel_size"] == 1
    # the finder's loss is the trainer's logged loss at the LR it logged
    m = read_metrics(save / "metrics.jsonl")
    assert sorted(m) == list(range(1, n + 1))
    assert [m[i]["learning_rate"] for i in m] == pytest.approx(lrs, rel=1e-12)
    assert [m[i]["lm_loss"] for i in m] == pytest.approx([r[1] for r in rows], rel=1e-12)
    # log summary; no checkpoint and no evaluation despite --save/--save-interval
    assert f"LR finder: {n}/60 iterations: diverged" in proc.stdout
    assert "LR finder: steepest descent of the smoothed loss: lr" in proc.stdout
    assert not (save / "latest").exists() and not (save / "latest_checkpointed_iteration.txt").exists()
    assert not [p for p in os.listdir(save) if p.startswith("global_step")]
    assert "validation loss" not in proc.stdout and "saved checkpoint" not in proc.stdout
    if HAVE_MATPLOTLIB:
        assert (out / "lr_finder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert result["files"]["plot"] == str(out / "lr_finder.png")
    else:
        assert result["files"]["plot"] is None and "no plot (matplotlib is not installed)" in proc.stdout


@pytest.mark.slow
def test_two_data_parallel_ranks_give_the_same_curve(dp1, tmp_path):
    save1, _ = dp1
    save2 = tmp_path / "run"
    proc = run_trainer(TINY + SWEEP + ["--micro-batch-size", "2", "--zero-stage", "1", "--save", str(save2)], nproc=2)
    assert "data-parallel size    : 2" in proc.stdout
    _, one = read_csv(save1 / "lr_finder" / "lr_finder.csv")
    _, two = read_csv(save2 / "lr_finder" / "lr_finder.csv")
    r1 = json.loads((save1 / "lr_finder" / "lr_finder.json").read_text())
    r2 = json.loads((save2 / "lr_finder" / "lr_finder.json").read_text())
    # the same curve up to the best smoothed loss (measured: within 2e-7); past it the loss
    # diverges and amplifies the rounding of a different reduction order
    calm = [k for k, r in enumerate(one) if r[0] <= r1["lr_at_best_smoothed_loss"]]
    assert len(calm) > 20 and len(two) >= len(calm)
    for k in calm:
        assert two[k][0] == one[k][0]
        assert two[k][1] == pytest.approx(one[k][1], rel=1e-5), k
        assert two[k][2] == pytest.approx(one[k][2], rel=1e-5), k
    assert r2["lr_at_best_smoothed_loss"] == r1["lr_at_best_smoothed_loss"]
    assert r2["suggestions"]["min_loss_div10"] == r1["suggestions"]["min_loss_div10"]
    assert r2["settings"]["data_parallel_size"] == 2 and r2["stop_reason"].startswith("diverged")


def test_muon_runs_the_range_test(tmp_path):
    save = tmp_path / "run"
    run_trainer(TINY + SWEEP + ["--micro-batch-size", "4", "--optimizer", "muon", "--save", str(save)])
    result = json.loads((save / "lr_finder" / "lr_finder.json").read_text())
    assert result["stopped_early"] and result["suggestions"]["steepest"] is not None
    assert result["settings"]["optimizer"] == "muon"


def test_from_a_checkpoint_leaves_it_untouched(tmp_path):
    """--load: the sweep starts from the checkpoint (its first loss is the loss the resumed run
    would log next) and nothing under the checkpoint directory changes."""
    ck = tmp_path / "ck"
    flags = TINY + ["--mock-data", "--train-iters", "4", "--micro-batch-size", "4"]
    full = tmp_path / "full.jsonl"
    run_trainer(flags + ["--metrics-file", str(full)])
    run_trainer(flags + ["--save", str(ck), "--save-interval", "3", "--exit-interval", "3"])

    before = tree_digest(ck)
    out = tmp_path / "finder"
    run_trainer(flags + ["--load", str(ck), "--save", str(out), "--lr-finder", "--lr-finder-iters", "8",
                         "--lr-finder-end", "1e-2"])
    assert tree_digest(ck) == before
    result = json.loads((out / "lr_finder" / "lr_finder.json").read_text())
    assert result["settings"]["start_iteration"] == 3 and result["iterations_run"] == 8
    _, rows = read_csv(out / "lr_finder" / "lr_finder.csv")
    assert rows[0][1] == pytest.approx(read_metrics(full)[4]["lm_loss"], rel=1e-6)


# ------------------------------------------------------------------------------------------
# megatron-ext lr-finder, and the launcher
# ------------------------------------------------------------------------------------------


def test_command_recomputes_suggestions_with_other_trimming(dp1, tmp_path):
    save, _ = dp1
    result = json.loads((save / "lr_finder" / "lr_finder.json").read_text())
    proc = run_module("megatron_ext.cli", ["lr-finder", str(save), "--json"], check=True)
    again = json.loads(proc.stdout)
    assert {k: again[k] for k in ("steepest", "min_loss_div10")} == result["suggestions"]
    assert (again["skip_start"], again["skip_end"]) == (6, 5)
    _, rows = read_csv(save / "lr_finder" / "lr_finder.csv")
    lrs, smoothed = [r[0] for r in rows], [r[2] for r in rows]
    proc = run_module("megatron_ext.cli", ["lr-finder", str(save / "lr_finder" / "lr_finder.csv"),
                                           "--skip-start", "0", "--skip-end", "0"], check=True)
    expected = suggest(lrs, smoothed, 0, 0)
    assert "# trimmed: first 0, last 0 points" in proc.stdout
    assert f"steepest descent of the smoothed loss: lr {expected['steepest']:.3g}" in proc.stdout
    assert f"lr {expected['min_loss_div10']:.3g} (min / 10)" in proc.stdout

    # --beta re-smooths the raw loss column: the run's own beta gives the run's suggestions back
    losses = [r[1] for r in rows]
    same = json.loads(run_module("megatron_ext.cli", ["lr-finder", str(save), "--beta", "0.98", "--json"],
                                 check=True).stdout)
    assert {k: same[k] for k in ("steepest", "min_loss_div10")} == result["suggestions"]
    other = json.loads(run_module("megatron_ext.cli", ["lr-finder", str(save), "--beta", "0.5", "--json"],
                                  check=True).stdout)
    assert other == suggest(lrs, resmooth(losses, 0.5), 6, 5)

    plot = tmp_path / "curve.png"
    proc = run_module("megatron_ext.cli", ["lr-finder", str(save), "--plot", str(plot)])
    if HAVE_MATPLOTLIB:
        assert proc.returncode == 0 and plot.read_bytes()[:4] == b"\x89PNG"
    else:
        assert proc.returncode == 2 and "--plot needs matplotlib" in proc.stderr and not plot.exists()

    for path in (tmp_path / "nowhere", save / "ds_config.json"):
        proc = run_module("megatron_ext.cli", ["lr-finder", str(path)])
        lines = error_lines(proc.stderr)
        assert proc.returncode == 2 and len(lines) == 1 and str(path) in lines[0], proc.stderr


def test_launcher_passes_lr_finder_through(tmp_path):
    from test_launcher import launch, resolved

    args, command, _ = resolved(launch(dict(SAVE=str(tmp_path / "r"), TRAIN_ITERS="100"),
                                       extra=["--lr-finder", "--lr-finder-end", "1"]))
    assert args.lr_finder and args.lr_finder_end == 1.0 and args.train_iters == 100
    assert command[-3:] == ["--lr-finder", "--lr-finder-end", "1"]
