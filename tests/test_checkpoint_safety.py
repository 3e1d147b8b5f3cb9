"""Crash-safe checkpoints: SIGKILL at any point of a save leaves a loadable `latest`; --keep-last
keeps exactly N; SIGTERM/SIGUSR1 (--exit-signal-handler) saves and exits 0 on every rank."""
import os
import random
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from conftest import REPO, TINY, _env, free_port, run_trainer
from megatron_ext.checkpoint_layout import TRACKER_FILE
from megatron_ext.checkpoint_layout import read_latest as latest_tag
from megatron_ext.training.checkpointing import prune_checkpoints, publish_checkpoint

MOCK = ["--mock-data"]
# Runs that stop early (killed, signalled) and resume to a shorter --train-iters: the schedule's
# length is fixed, so the resumed command line matches the checkpoint's schedule.
LONG = ["--train-iters", "100000", "--lr-decay-iters", "100000"]
ITERATION = re.compile(r"iteration=\s*(\d+)/")


@pytest.fixture
def start_trainer():
    """Start trainers in the background (stdout+stderr to a log file), each in its own process
    group; whatever still runs when the test ends (a failed test) is killed with its children."""
    started = []

    def start(args, log, nproc=1):
        if nproc == 1:
            cmd = [sys.executable, "-m", "megatron_ext.train", *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(free_port()), "-m", "megatron_ext.train", *args]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=REPO,
                                    start_new_session=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:  # not reaped yet, so its process group id is still its own
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def iterations_from(text):
    return [int(m.group(1)) for m in ITERATION.finditer(text)]


def iterations(log):
    with open(log) as f:
        return iterations_from(f.read())


def wait_for_iteration(proc, log, at_least, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = iterations(log)
        if done and done[-1] >= at_least:
            return done
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited ({proc.returncode}) before iteration {at_least}:\n"
                                 + open(log).read()[-4000:])
        time.sleep(0.02)
    raise AssertionError(f"no iteration {at_least} within {timeout} s:\n" + open(log).read()[-4000:])


def hidden(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


def steps(folder):
    return sorted(int(n[len("global_step"):]) for n in os.listdir(folder) if re.fullmatch(r"global_step\d+", n))


def checkpoint_files(dp=1, stage=1):
    """The files of a ZeRO-1 (or ZeRO-3) checkpoint written by `dp` data-parallel ranks."""
    optim = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(dp)]
    if stage == 3:
        return [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(dp)] + optim
    return ["mp_rank_00_model_states.pt"] + optim


def assert_complete(folder, tag, dp=1, stage=1):
    files = checkpoint_files(dp, stage)
    assert sorted(os.listdir(os.path.join(folder, tag))) == sorted(files)
    for name in files:
        torch.load(os.path.join(folder, tag, name), map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------------------
# The save's steps on real directories


def make_checkpoint(folder, name, model_file=True, note=None):
    path = folder / name
    path.mkdir()
    if model_file:
        (path / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if note:
        (path / "note.txt").write_text(note)
    return path


def test_publish_replaces_a_checkpoint_of_the_same_iteration(tmp_path):
    make_checkpoint(tmp_path, "global_step5", note="old")
    (tmp_path / "latest").write_text("global_step5")
    make_checkpoint(tmp_path, ".incomplete.global_step5", note="new")
    publish_checkpoint(str(tmp_path), ".incomplete.global_step5", "global_step5", 5)
    assert (tmp_path / "global_step5" / "note.txt").read_text() == "new"
    assert (tmp_path / "latest").read_text() == "global_step5"
    assert (tmp_path / TRACKER_FILE).read_text() == "5"
    assert hidden(tmp_path) == []


def test_prune_keeps_latest_and_newest_and_never_touches_foreign_folders(tmp_path):
    for i in range(1, 7):
        make_checkpoint(tmp_path, f"global_step{i}")
    (tmp_path / "latest").write_text("global_step2")  # e.g. a --finetune run saving beside an older run
    make_checkpoint(tmp_path, "global_step3_universal")  # a conversion: not ours to delete
    make_checkpoint(tmp_path, "global_step7", model_file=False, note="made by hand")
    os.symlink(tmp_path / "global_step6", tmp_path / "global_step8")
    (tmp_path / "global_step9").write_text("a file")
    assert prune_checkpoints(str(tmp_path), 3) == ["global_step1", "global_step3", "global_step4"]
    assert sorted(os.listdir(tmp_path)) == ["global_step2", "global_step3_universal", "global_step5", "global_step6",
                                            "global_step7", "global_step8", "global_step9", "latest"]
    assert prune_checkpoints(str(tmp_path), 1) == ["global_step5", "global_step6"]
    assert sorted(os.listdir(tmp_path)) == ["global_step2", "global_step3_universal", "global_step7",
                                            "global_step8", "global_step9", "latest"]


# ---------------------------------------------------------------------------------------------
# Real training runs


def test_keep_last_keeps_exactly_n_and_clears_leftovers(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    make_checkpoint(ck, "global_step3", note="an earlier run's step 3: replaced, then pruned")
    make_checkpoint(ck, "global_step2_universal")
    make_checkpoint(ck, "global_step100", model_file=False, note="the user's")
    (ck / ".incomplete.global_step99").mkdir()  # a killed save
    (ck / ".incomplete.latest.abc").write_text("global_step99")
    (ck / ".discard.global_step1.1.2").mkdir()
    run_trainer(TINY + MOCK + ["--train-iters", "7", "--save", str(ck), "--save-interval", "1", "--keep-last", "3",
                               "--eval-iters", "0"])
    assert steps(ck) == [5, 6, 7, 100]
    assert os.path.isdir(ck / "global_step2_universal") and (ck / "global_step100" / "note.txt").exists()
    assert hidden(ck) == []
    assert latest_tag(str(ck)) == "global_step7" and (ck / TRACKER_FILE).read_text() == "7"
    for i in (5, 6, 7):
        assert_complete(ck, f"global_step{i}")


def test_keep_last_needs_save():
    proc = run_trainer(TINY + MOCK + ["--train-iters", "1", "--keep-last", "2"], check=False)
    assert proc.returncode == 2 and "--keep-last needs --save DIR" in proc.stderr


def at_rest(folder, keep, stage=1):
    """Between saves: nothing hidden, `latest` names the newest checkpoint and it is complete, at
    most `keep` checkpoints. Anything else means a save (or its pruning) is in progress."""
    tag, found = latest_tag(folder), steps(folder)
    return (not hidden(folder) and tag is not None and found[-1:] == [int(tag[len("global_step"):])]
            and len(found) <= keep
            and sorted(os.listdir(os.path.join(folder, tag))) == sorted(checkpoint_files(stage=stage)))


def freeze_inside_a_save(proc, folder, keep, rng, stage=1, timeout=60):
    """Stop the process (SIGSTOP) at random instants until it is caught inside a save; it stays
    stopped, so the kill that follows lands exactly there."""
    deadline, ps = time.time() + timeout, psutil.Process(proc.pid)
    while time.time() < deadline:
        time.sleep(rng.uniform(0, 0.01))
        proc.send_signal(signal.SIGSTOP)
        while ps.status() != psutil.STATUS_STOPPED:
            time.sleep(0.0002)
        if not at_rest(folder, keep, stage):
            return
        proc.send_signal(signal.SIGCONT)
    raise AssertionError(f"never caught inside a save in {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("stage,trials", [(1, 8), (3, 2)], ids=["zero1", "zero3"])
def test_sigkill_at_any_point_of_a_save_leaves_a_loadable_latest(stage, trials, tmp_path, start_trainer):
    """SIGKILLs (eight at ZeRO 1, two at ZeRO 3), each of a run that resumed from what the previous
    kill left (so every trial is also a real resume of that `latest`): half caught inside a save,
    half at random instants."""
    ck = str(tmp_path / "ck")
    keep = 2
    flags = TINY + MOCK + LONG + ["--save", ck, "--load", ck, "--save-interval", "1",
                                  "--keep-last", str(keep), "--eval-iters", "0", "--zero-stage", str(stage)]
    rng = random.Random(8)
    inside, latest_steps = 0, []
    for trial in range(trials):
        before = int(latest_tag(ck)[len("global_step"):]) if os.path.exists(os.path.join(ck, "latest")) else 0
        log = str(tmp_path / f"trial{trial}.log")
        proc = start_trainer(flags, log)
        # Past this run's first save: the previous kill's leftovers are cleared, `latest` exists.
        done = wait_for_iteration(proc, log, before + 2)
        assert done[0] == before + 1, f"trial {trial}: resumed at {done[0]}, latest was {before}"
        if trial % 2 == 0:
            freeze_inside_a_save(proc, ck, keep, rng, stage)
        else:  # anywhere: in a step, a save, the rename, `latest`, the pruning
            time.sleep(rng.uniform(0.01, 0.5))
        proc.kill()
        proc.wait()
        inside += not at_rest(ck, keep, stage)
        tag = latest_tag(ck)
        assert tag is not None, f"trial {trial}: no latest"
        assert_complete(ck, tag, stage=stage)
        latest_steps.append(int(tag[len("global_step"):]))
    assert latest_steps == sorted(latest_steps)
    assert inside >= trials // 2

    # The last state resumes and finishes cleanly; leftovers are gone and --keep-last holds.
    end = latest_steps[-1] + 2
    proc = run_trainer(flags + ["--train-iters", str(end)])  # the last --train-iters wins
    assert iterations_from(proc.stdout)[0] == latest_steps[-1] + 1
    assert hidden(ck) == [] and steps(ck) == [end - 1, end] and latest_tag(ck) == f"global_step{end}"


@pytest.mark.slow
def test_sigterm_saves_at_the_step_boundary_and_exits_zero(tmp_path, start_trainer):
    ck = str(tmp_path / "ck")
    log = str(tmp_path / "run.log")
    proc = start_trainer(TINY + MOCK + LONG + ["--save", ck, "--exit-signal-handler"], log)
    wait_for_iteration(proc, log, 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, open(log).read()[-3000:]
    text = open(log).read()
    last = iterations_from(text)[-1]
    assert f"received SIGTERM: every rank stops after iteration {last}, saves a checkpoint and exits" in text
    assert f"saved checkpoint {ck}/global_step{last}" in text
    assert "validation loss at iteration" not in text  # stopping: no final evaluation before the save
    assert latest_tag(ck) == f"global_step{last}" and open(os.path.join(ck, TRACKER_FILE)).read() == str(last)
    assert_complete(ck, f"global_step{last}")
    resumed = run_trainer(TINY + MOCK + LONG + ["--train-iters", str(last + 1), "--load", ck, "--eval-iters", "0"])
    assert iterations_from(resumed.stdout) == [last + 1]


@pytest.mark.slow
def test_signal_on_one_rank_stops_both_ranks_of_a_torchrun_dp2_run(tmp_path, start_trainer):
    ck = str(tmp_path / "ck")
    log = str(tmp_path / "run.log")
    proc = start_trainer(TINY + MOCK + LONG + ["--save", ck, "--exit-signal-handler"], log, nproc=2)
    wait_for_iteration(proc, log, 3)
    workers = {int(p.environ().get("RANK", -1)): p for p in psutil.Process(proc.pid).children()}
    workers[1].send_signal(signal.SIGUSR1)  # SLURM's --signal=USR1@T warning, reaching one rank only
    assert proc.wait(timeout=120) == 0, open(log).read()[-3000:]
    text = open(log).read()
    last = iterations_from(text)[-1]
    assert f"received SIGUSR1: every rank stops after iteration {last}" in text
    assert latest_tag(ck) == f"global_step{last}"
    assert_complete(ck, f"global_step{last}", dp=2)  # both ranks saved their ZeRO shard at the same iteration
