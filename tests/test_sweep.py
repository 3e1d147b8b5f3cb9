"""``megatron-ext sweep``: a grid of the tiny model trained for real (one trainer process per
variant), a variant that diverges and one that fails at run time, an interrupted sweep resumed, the
combined outputs and the recommendation; keys and commands checked before anything runs; dry runs,
YAML configs, job scripts; the selection rule and instability flags on hand-made results."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY, _env, error_lines

from megatron_ext.commands.sweep import run_argv
from megatron_ext.sweeps.recommend import instability, recommend
from megatron_ext.sweeps.spec import expand, parse_grid, variant_name

SWEEP = [sys.executable, "-m", "megatron_ext.cli", "sweep"]
BASE = TINY + ["--mock-data"]


def _load(path):
    with open(path) as f:
        return json.load(f)


def _commands(stdout):
    return [l for l in stdout.splitlines() if l and not l.startswith("#")]


# --- selection rule and instability flags on hand-made results -------------------------------

def _made(name, lr, val, train_curve, status="finished", acc=None):
    return {"name": name, "values": {"lr": lr}, "status": status, "final_val_loss": val,
            "final_train_loss": train_curve[-1][1] if math.isfinite(train_curve[-1][1]) else None,
            "final_val_accuracy": acc,
            "instability": instability(train_curve, [(train_curve[-1][0], val if val is not None else math.nan)])}


def test_recommendation_picks_lowest_final_val_loss_and_flags_unstable():
    results = [
        _made("a", "1e-4", 5.0, [(1, 7.0), (2, 6.0), (3, 5.5)], acc=0.30),
        # a spike (6.5 > 1.25 x 5.0) but it recovers: eligible, flagged
        _made("b", "3e-4", 4.2, [(1, 7.0), (2, 5.0), (3, 6.5), (4, 4.5)], acc=0.35),
        _made("c", "1e-3", 4.5, [(1, 7.0), (2, 5.0), (3, 4.4)], acc=0.41),
        # lowest validation loss, but its train loss ends above where it started: diverged, never picked
        _made("d", "3e-3", 3.9, [(1, 6.0), (2, 5.9), (3, 7.5)], acc=0.50),
        _made("e", "1e-2", None, [(1, 7.0), (2, math.nan)], status="failed"),
    ]
    results[-1]["error"] = ["non-finite train loss (nan) at iteration 2: stopped by the sweep"]
    rec = recommend(results, "val_loss", ["lr"])
    assert rec["best"]["name"] == "b" and rec["best"]["final_val_loss"] == 4.2
    assert rec["runner_up"]["name"] == "c" and rec["runner_up"]["difference"] == pytest.approx(0.3)
    assert [r["name"] for r in rec["ranking"]] == ["b", "c", "a"]
    assert "lowest final validation loss" in rec["rule"]
    unstable = {u["name"]: u for u in rec["unstable"]}
    assert set(unstable) == {"b", "d", "e"}
    assert not unstable["b"]["diverged"] and unstable["b"]["spikes"][0]["iteration"] == 3
    assert unstable["d"]["diverged"] and "above the first" in unstable["d"]["divergence"]
    assert unstable["e"]["diverged"] and "iteration 2" in unstable["e"]["divergence"]
    assert [f["name"] for f in rec["failed"]] == ["e"]
    assert any("spikes" in n for n in rec["notes"])
    # another rule, and a best value at the end of the grid is pointed out
    rec = recommend(results, "val_accuracy", ["lr"])
    assert rec["best"]["name"] == "c"  # d has a higher accuracy but diverged
    rec = recommend(results[:3], "train_loss", ["lr"])
    assert rec["best"]["name"] == "c"
    assert rec["notes"] == ["lr=1e-3 is the largest lr tried: the optimum may lie above it"]
    rec = recommend([results[-1]], "val_loss", ["lr"])
    assert rec["best"] is None and rec["notes"]


def test_instability_thresholds():
    assert instability([(1, 7.0), (2, 6.0), (3, 5.0)], [(3, 5.1)]) == {
        "diverged": False, "divergence": None, "spikes": [], "spike_threshold": 0.25, "max_loss_rise": 0.0}
    flags = instability([(1, 7.0), (2, 6.0)], [(2, math.inf)])
    assert flags["diverged"] and "validation" in flags["divergence"]
    below = [(1, 6.0), (2, 5.0), (3, 6.2), (4, 4.0)]  # 6.2 < 1.25 x 5.0
    assert instability(below, [])["spikes"] == []
    spikes = instability(below, [], spike_threshold=0.2)["spikes"]
    assert [(s["iteration"], s["peak_loss"], s["running_min"]) for s in spikes] == [(3, 6.2, 5.0)]
    # consecutive points above the line are one spike, reported at its peak
    spikes = instability([(1, 6.0), (2, 4.0), (3, 5.5), (4, 6.0), (5, 3.9), (6, 5.0)], [])["spikes"]
    assert [(s["iteration"], s["peak_iteration"], s["peak_loss"]) for s in spikes] == [(3, 4, 6.0), (6, 6, 5.0)]


def test_grid_list_expansion_and_names():
    grid = parse_grid(["lr=1e-4,3e-4", "--num-experts=4,8"])
    assert grid == {"lr": ["1e-4", "3e-4"], "num_experts": ["4", "8"]}
    variants = expand(grid, [{"lr": "1e-3"}, {"lr": "1e-4", "num_experts": "4"}])
    assert len(variants) == 5 and variants[0] == {"lr": "1e-4", "num_experts": "4"}
    assert variant_name(variants[0]) == "lr=1e-4,num_experts=4"
    odd = [variant_name({"load": "/ckpt/a b"}), variant_name({"load": "/ckpt/a_b"})]
    assert all("/" not in n and " " not in n for n in odd) and odd[0] != odd[1]


# --- checks before anything runs; dry runs; YAML; job scripts ------------------------------------

def test_bad_key_or_value_fails_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "sweep"
    proc = subprocess.run(SWEEP + ["--grid", "lr=1e-3", "lrr=1e-4", "--steps", "2", "--out", str(out), "--", *BASE],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "'lrr'" in lines[0] and "did you mean 'lr'" in lines[0], proc.stderr
    assert not out.exists()
    # a bad value in the last variant stops the sweep before the first variant runs
    assert run_argv(["--grid", "lr=1e-3,abc", "--steps", "2", "--out", str(out), "--", *BASE]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "variant lr=abc" in err and "--lr" in err
    assert run_argv(["--grid", "metrics_file=a,b", "--steps", "2", "--out", str(out), "--", *BASE]) == 2
    assert "cannot be swept" in capsys.readouterr().err
    assert not out.exists()


def test_dry_run_prints_commands_and_yaml_config_gives_the_same(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["--grid", "lr=1e-3,3e-3", "init_method_std=0.01,0.05", "--steps", "4", "--eval-interval", "2",
            "--out", str(out), "--dry-run", "--", *BASE]
    assert run_argv(argv) == 0
    printed = capsys.readouterr().out
    commands = _commands(printed)
    assert len(commands) == 4 and not out.exists()
    for cmd, (lr, std) in zip(commands, [("1e-3", "0.01"), ("1e-3", "0.05"), ("3e-3", "0.01"), ("3e-3", "0.05")]):
        assert cmd.endswith(f"--train-iters 4 --eval-interval 2 --lr {lr} --init-method-std {std} "
                            f"--metrics-file {out}/lr={lr},init_method_std={std}/metrics.jsonl")
    cfg = tmp_path / "sweep.yaml"
    flags = "\n".join(f"    - '{f}'" for f in BASE)
    cfg.write_text(f"# the same sweep as a file\nout: {out}\nsteps: 4\neval_interval: 2\n"
                   f"base:\n  flags:\n{flags}\ngrid:\n  lr: [1e-3, 3e-3]\n  init_method_std: [0.01, 0.05]\n")
    assert run_argv(["--config", str(cfg), "--dry-run"]) == 0
    assert capsys.readouterr().out == printed  # same commands, same keys
    # the command line wins over the file: another value list for one key
    assert run_argv(["--config", str(cfg), "--grid", "lr=1e-4", "--dry-run"]) == 0
    assert len(_commands(capsys.readouterr().out)) == 2
    cfg.write_text("out: x\ngrdi: {lr: [1]}\n")
    assert run_argv(["--config", str(cfg)]) == 2
    assert "unknown setting 'grdi' (did you mean 'grid'?)" in capsys.readouterr().err


def test_launcher_mode_checks_variables(tmp_path, capsys, monkeypatch):
    for var in ("DATA_FILE_LIST", "LR", "MODEL_ARCH", "TRAIN_ITERS", "SAVE", "LOAD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MODEL_ARCH", "tiny")
    out = tmp_path / "sweep"
    assert run_argv(["--launcher", "--grid", "LR=1e-3,3e-3", "--steps", "5", "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    commands = _commands(printed)
    assert len(commands) == 2 and commands[0].startswith("MODEL_ARCH=tiny LR=1e-3 ")
    assert "-m megatron_ext.launcher --train-iters 5" in commands[0]
    assert "#   the launcher runs:" in printed and "--lr 3e-3" in printed  # what the launcher resolved, as typed
    assert run_argv(["--launcher", "--grid", "LR_DECAY=cosine", "--out", str(out), "--dry-run"]) == 2
    assert "'LR_DECAY' is not a variable train_alcf.sh reads (did you mean 'LR_DECAY_STYLE'?)" in capsys.readouterr().err
    assert run_argv(["--launcher", "--grid", "LR=abc", "--out", str(out), "--dry-run"]) == 2
    assert "LR='abc' is not a number" in capsys.readouterr().err


def test_job_scripts_submission_and_changed_definition(tmp_path, capsys):
    out = tmp_path / "sweep"
    common = ["--grid", "lr=1e-3,3e-3", "--steps", "4", "--out", str(out)]
    assert run_argv(common + ["--jobs-script", "pbs", "--queue", "debug", "--account", "proj", "--walltime",
                              "00:30:00", "--job-option", "-l filesystems=home", "--", *BASE]) == 0
    capsys.readouterr()
    job = (out / "lr=1e-3" / "job.sh").read_text()
    for line in ("#PBS -l walltime=00:30:00", "#PBS -q debug", "#PBS -A proj", "#PBS -l filesystems=home",
                 f"-m megatron_ext.sweeps.runner {out}/lr=1e-3"):
        assert line in job
    assert subprocess.run(["bash", "-n", str(out / "lr=1e-3" / "job.sh")]).returncode == 0
    assert not (out / "lr=1e-3" / "result.json").exists()  # written, not submitted
    # submitted (here with `true`, which queues nothing): recorded, and not submitted twice
    assert run_argv(common + ["--jobs-script", "sh", "--submit", "true", "--", *BASE]) == 0
    assert _load(out / "lr=3e-3" / "result.json")["status"] == "submitted"
    capsys.readouterr()
    assert run_argv(common + ["--dry-run", "--", *BASE]) == 0
    assert printed_count(capsys.readouterr().out, "skipped, submitted as a job") == 2
    # a submission that fails leaves the variant as it was
    assert run_argv(common + ["--jobs-script", "sh", "--submit", "false", "--retry", "--", *BASE]) == 1
    assert "submitting failed" in capsys.readouterr().err
    assert _load(out / "lr=3e-3" / "result.json")["status"] == "submitted"
    # another base launch is another variant: the old directory is kept aside, not reused
    assert run_argv(common + ["--jobs-script", "sh", "--", *BASE, "--weight-decay", "0.05"]) == 0
    assert "definition changed" in capsys.readouterr().out
    assert len(os.listdir(out / ".replaced")) == 2
    assert not (out / "lr=3e-3" / "result.json").exists()


def printed_count(text, phrase):
    return sum(1 for l in text.splitlines() if phrase in l)


# --- the real thing --------------------------------------------------------------------------------

def _wait_for_status(path, status, proc, timeout=600):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended early ({proc.returncode})")
        try:
            if _load(path).get("status") == status:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{path} never said {status}")


@pytest.mark.slow
def test_sweep_trains_survives_failures_resumes_and_recommends(tmp_path, capsys):
    incomplete = tmp_path / "incomplete_checkpoint"  # 'latest' names a checkpoint that is not there
    incomplete.mkdir()
    (incomplete / "latest").write_text("global_step5\n")
    out = tmp_path / "sweep"
    flags = "\n".join(f"    - '{f}'" for f in BASE)
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(
        f"out: {out}\nsteps: 6\neval_interval: 3\nbase:\n  flags:\n{flags}\n"
        "grid:\n  lr: [1e-3, 3e-3]\n  init_method_std: [0.01, 0.05]\n"
        "variants:\n"
        "  - {lr: 1e9}                 # parses, then its loss turns NaN: stopped, failed\n"
        f"  - 'load={incomplete}'       # parses, then the trainer exits 2 at run time\n")
    cmd = SWEEP + ["--config", str(cfg)]
    grid = ["lr=1e-3,init_method_std=0.01", "lr=1e-3,init_method_std=0.05",
            "lr=3e-3,init_method_std=0.01", "lr=3e-3,init_method_std=0.05"]
    nan_variant = "lr=1e9"
    load_variant = variant_name({"load": str(incomplete)})

    # interrupted (Ctrl-C) while the second variant runs
    with open(tmp_path / "first.log", "w") as log:
        # SIGINT as a terminal gives it: a test run started in the background of a non-interactive
        # shell inherits SIGINT ignored, and Python keeps an ignored SIGINT ignored
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            _wait_for_status(out / grid[1] / "result.json", "running", proc)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(120) == 130, (tmp_path / "first.log").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    first = _load(out / grid[0] / "result.json")
    assert first["status"] == "finished" and first["run_count"] == 1
    assert _load(out / grid[1] / "result.json")["status"] == "interrupted"
    assert not (out / grid[2] / "result.json").exists()
    first_mtime = os.path.getmtime(out / grid[0] / "result.json")

    # the same command resumes: the finished variant is skipped, the interrupted one runs again
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{grid[0]}: skipped (finished)" in proc.stdout
    assert os.path.getmtime(out / grid[0] / "result.json") == first_mtime
    results = {n: _load(out / n / "result.json") for n in grid + [nan_variant, load_variant]}
    assert results[grid[1]]["run_count"] == 2 and results[grid[1]]["status"] == "finished"
    for name in grid:
        r = results[name]
        assert r["status"] == "finished" and r["iterations"] == 6, r
        assert [p[0] for p in r["curves"]["val_loss"]] == [3, 6]
        assert [p[0] for p in r["curves"]["train_loss"]] == list(range(1, 7))
        assert r["final_val_ppl"] == pytest.approx(math.exp(r["final_val_loss"]), rel=1e-6)
        assert r["tokens_per_second"] > 0 and r["best_val_loss"] <= r["final_val_loss"]
        assert (out / name / "train.log").exists() and (out / name / "command.sh").exists()
        with open(out / name / "metrics.jsonl") as f:
            last_val = [json.loads(l) for l in f if '"validation"' in l][-1]
        assert r["final_val_loss"] == last_val["lm_loss"] and r["final_val_accuracy"] == last_val.get("accuracy")
    nan = results[nan_variant]
    # failed whether the sweep stopped it at the NaN or it ended first (6 iterations go fast)
    assert nan["status"] == "failed" and "non-finite train loss (nan) at iteration" in nan["error"][-1]
    assert nan["instability"]["diverged"]
    broken = results[load_variant]
    assert broken["status"] == "failed" and broken["returncode"] == 2
    assert "missing or incomplete" in broken["error"][-1]

    combined = _load(out / "results.json")
    assert [v["name"] for v in combined["variants"]] == grid + [nan_variant, load_variant]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["finished"] * 4 + ["failed"] * 2
    assert rows[0]["lr"] == "1e-3" and rows[0]["init_method_std"] == "0.01" and rows[-1]["load"] == str(incomplete)
    for png in ("val_loss.png", "train_loss.png", "final_val_loss_vs_lr.png", "final_val_loss_vs_init_method_std.png"):
        assert (out / png).stat().st_size > 1000, png
    rec = _load(out / "recommendation.json")
    eligible = [results[n] for n in grid if not results[n]["instability"]["diverged"]]
    assert eligible, "no grid variant trained stably"
    best = min(eligible, key=lambda r: r["final_val_loss"])
    assert rec["best"]["name"] == best["name"] and rec["best"]["final_val_loss"] == best["final_val_loss"]
    assert {f["name"] for f in rec["failed"]} == {nan_variant, load_variant}
    assert nan_variant in {u["name"] for u in rec["unstable"] if u["diverged"]}
    assert "recommendation: " + best["name"] in proc.stdout

    # once more: nothing runs
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0 and "0 to run" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert all(_load(out / n / "result.json")["run_count"] == results[n]["run_count"] for n in results)

    # --collect with another rule
    assert run_argv(["--collect", str(out), "--select", "train_loss"]) == 0
    rec = _load(out / "recommendation.json")
    assert rec["best"]["name"] == min(eligible, key=lambda r: r["final_train_loss"])["name"]
    assert "final train loss" in rec["rule"]


def test_a_sweep_inside_a_process_group_starts_its_variants_as_jobs_of_their_own(tmp_path, capsys, monkeypatch):
    """From a torchrun worker, or a notebook that started a process group, the group's RANK and
    rendezvous are in the environment and its MASTER_PORT is in use: a variant that inherited them
    could not listen there (EADDRINUSE, what made the expert-grid test fail after in-process runs)."""
    import socket

    from megatron_ext.sweeps.runner import variant_environment

    with socket.socket() as held:  # the group's rendezvous port, in use
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                            ("MASTER_PORT", port)):
            monkeypatch.setenv(name, value)
        out = tmp_path / "sweep"
        assert run_argv(["--grid", "lr=1e-3", "--steps", "2", "--out", str(out), "--", *BASE]) == 0, \
            capsys.readouterr().out
    assert json.loads((out / "lr=1e-3" / "result.json").read_text())["status"] == "finished"
    # a MASTER_PORT of its own (no job around the sweep) is the user's choice and reaches the variants
    assert variant_environment({"MASTER_PORT": "29600", "PATH": "/bin"}) == {"MASTER_PORT": "29600", "PATH": "/bin"}
