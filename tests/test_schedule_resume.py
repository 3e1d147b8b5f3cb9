"""The schedule through the real trainer: its whole state in a real checkpoint, Megatron's resume
rules (must match / --override-opt-param-scheduler / --use-checkpoint-opt-param-scheduler, a
mismatch is one error line), and a constant-LR run cooled down from its checkpoint with the
command `megatron-ext cooldown` prints (LR continuous at the checkpoint, --min-lr at the end,
resumable after an interruption)."""
import math
import shlex

import torch

from conftest import TINY, error_lines, read_metrics, run_trainer
from megatron_ext import cli
from megatron_ext.plan import parse_args
from megatron_ext.schedules.common.scheduler import ParamScheduler

MAX, MIN, C = 1e-3, 1e-5, 5e-4
GB = 2  # TINY: micro batch 2, one rank
INFINITE = TINY + [
    "--mock-data", "--eval-iters", "0", "--lr-decay-style", "infinite-cosine", "--constant-lr", str(C),
    "--lr-cooldown-fraction", "0.25", "--lr-constant-fraction", "0.25", "--min-lr", str(MIN), "--lr-warmup-iters", "1",
    "--weight-decay-incr-style", "linear", "--start-weight-decay", "0", "--end-weight-decay", "0.1",
]


def client_state(path):
    return torch.load(path / "mp_rank_00_model_states.pt", weights_only=False)


def infinite_lr(p, L=16.0):
    """8 iterations x 2 samples: warmup 2, cooldown to 6, constant to 10, anneal to 16 (samples)."""
    if p < 2:
        return MAX * p / 2
    if p < 6:
        return C + (MAX - C) * (1 + math.cos(math.pi * (p - 2) / 4)) / 2
    if p <= 10:
        return C
    if p >= L:
        return MIN
    return C * (MIN / C) ** ((p - 10) / (L - 10))


def test_state_in_checkpoint_and_resume_rules(tmp_path):
    d = tmp_path / "run"
    cmd = INFINITE + ["--train-iters", "8", "--save", str(d), "--load", str(d)]
    run_trainer(cmd + ["--exit-interval", "4"])
    m = read_metrics(d / "metrics.jsonl")
    assert sorted(m) == [1, 2, 3, 4]
    for it in m:
        assert math.isclose(m[it]["learning_rate"], infinite_lr((it - 1) * GB), rel_tol=1e-12), it

    # the whole schedule state is in the checkpoint, as the scheduler built from the flags has it
    state = client_state(d / "global_step4")["lr_scheduler"]
    assert state["schedule"] == {
        "style": "infinite-cosine", "max_lr": MAX, "min_lr": MIN, "warmup": 2.0, "decay_end": 16.0,
        "train_end": 16.0, "constant_lr": C, "cooldown_end": 6.0, "anneal_start": 10.0, "cooldown": None}
    assert state["weight_decay"] == {"style": "linear", "start": 0.0, "end": 0.1, "length": 16.0}
    fresh = ParamScheduler.from_args(type("O", (), {"param_groups": []})(), parse_args(cmd, world_size=1))
    assert fresh.state_dict()["schedule"] == state["schedule"]

    # default rule: the command line must match the checkpoint; a mismatch is one line, no traceback
    bad = run_trainer(cmd + ["--constant-lr", "4e-4"], check=False)
    assert bad.returncode == 2
    lines = [l for l in error_lines(bad.stderr) if "error" in l.lower()]
    assert len(lines) == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert ("constant_lr (--constant-lr) is 0.0005 in the checkpoint but 0.0004 on the command line"
            in lines[0]), lines
    assert "iteration=" not in bad.stdout

    # --use-checkpoint-opt-param-scheduler: the checkpoint's curve goes on (past its end: --min-lr),
    # whatever the schedule flags say
    common = TINY + ["--mock-data", "--eval-iters", "0", "--lr-warmup-iters", "1", "--train-iters", "10",
                     "--lr-decay-style", "linear", "--load", str(d)]
    run_trainer(common + ["--save", str(tmp_path / "u"), "--use-checkpoint-opt_param-scheduler"])
    u = read_metrics(tmp_path / "u" / "metrics.jsonl")
    assert sorted(u) == list(range(5, 11))
    for it in u:
        assert math.isclose(u[it]["learning_rate"], infinite_lr((it - 1) * GB), rel_tol=1e-12), it
    assert u[9]["learning_rate"] == u[10]["learning_rate"] == MIN
    saved = client_state(tmp_path / "u" / "global_step10")["lr_scheduler"]
    assert saved["schedule"] == state["schedule"] and saved["weight_decay"] == state["weight_decay"]

    # --override-opt-param-scheduler: the command line's schedule from the checkpoint's position on
    run_trainer(common + ["--save", str(tmp_path / "o"), "--override-opt_param-scheduler"])
    o = read_metrics(tmp_path / "o" / "metrics.jsonl")
    assert sorted(o) == list(range(5, 11))
    for it in o:  # linear over 10 iterations x 2 samples, warmup 2 samples
        assert math.isclose(o[it]["learning_rate"], MAX * (1 - ((it - 1) * GB - 2) / 18), rel_tol=1e-12), it
    assert client_state(tmp_path / "o" / "global_step10")["lr_scheduler"]["schedule"]["style"] == "linear"


def test_cool_down_a_constant_lr_checkpoint(tmp_path, capsys):
    d = tmp_path / "const"
    run_trainer(TINY + ["--mock-data", "--eval-iters", "0", "--train-iters", "4", "--lr-decay-style", "constant",
                        "--lr-warmup-iters", "1", "--save", str(d)])
    assert cli.main(["cooldown", str(d), "--iters", "4", "--min-lr", str(MIN)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 4 and all(line.startswith("# ") for line in out[:-1]), out  # comments, then the command
    assert "iteration 5 uses lr 0.001" in out[1] and "iteration 8 uses lr 1e-05" in out[1], out
    words = shlex.split(out[-1])
    assert words[:3] == ["python", "-m", "megatron_ext.train"]
    flags = words[3:]
    assert flags[flags.index("--train-iters") + 1] == "8" and flags[flags.index("--lr-cooldown-from-checkpoint") + 1] == "4"

    first = run_trainer(flags + ["--exit-interval", "6"])  # interrupted after 2 cooldown iterations
    assert "start iteration       : 4" in first.stdout
    second = run_trainer(flags)  # the same command finishes the cooldown
    assert "start iteration       : 6" in second.stdout

    m = read_metrics(d / "metrics.jsonl")
    assert sorted(m) == list(range(1, 9))
    lr = {it: m[it]["learning_rate"] for it in m}
    assert lr[1] == 0.0 and lr[2] == lr[3] == lr[4] == MAX
    assert lr[5] == lr[4]  # continuous at the checkpoint
    for k, it in enumerate(range(5, 9)):  # 1-sqrt from MAX to MIN over iterations 5..8
        assert math.isclose(lr[it], MIN + (MAX - MIN) * (1 - math.sqrt(k / 3)), rel_tol=1e-12), it
    assert lr[8] == MIN  # ends at --min-lr
    assert all(lr[i] > lr[i + 1] for i in range(5, 8))  # strictly falling after it
    cd = client_state(d / "global_step8")["lr_scheduler"]["schedule"]["cooldown"]
    assert cd == {"start": 8.0, "length": 6.0, "start_lr": MAX, "end_lr": MIN, "shape": "1-sqrt", "iterations": 4}

    # the cooldown command refuses a checkpoint that is itself a cooldown
    assert cli.main(["cooldown", str(d), "--iters", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was written by a cooldown run" in err[0]
