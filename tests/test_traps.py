"""Nothing silent, nothing hung, nothing lost: the traps found by trying the project as its users
would (issue 14). Each test fails on the code before its fix."""
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY, _env, error_lines, make_hf_corpus, read_metrics, run_module, run_trainer
from megatron_ext.arguments import ArgumentsError, build_parser
from megatron_ext.plan import build_plan

STEPS = TINY + ["--train-iters", "4", "--global-batch-size", "2"]


@pytest.fixture(scope="module")
def small_corpora(tmp_path_factory):
    """Two prefixes of 350 documents each, weights 0.7/0.3 (the corpus sizes of the hang)."""
    root = tmp_path_factory.mktemp("small")
    a = make_hf_corpus(root / "a", documents=350)
    b = make_hf_corpus(root / "b", documents=350, tokenizer=a["tokenizer"])
    data_list = root / "list.txt"
    data_list.write_text(f"0.7 {a['prefix']} a\n0.3 {b['prefix']} b\n")
    return {"list": str(data_list), "tokenizer": a["tokenizer"], "prefix": a["prefix"]}


def _plan(argv, world=1):
    return build_plan(build_parser().parse_args(argv), world)


def _data(corpora):
    return ["--data-file-list", corpora["list"], "--tokenizer-type", "HFTokenizer", "--tokenizer-model",
            corpora["tokenizer"]]


# -- 1. a split with no documents: one line before any work, or not built when nobody reads it ------
def test_a_split_without_documents_is_one_line_naming_prefix_split_and_count(small_corpora):
    with pytest.raises(ArgumentsError) as e:
        _plan(STEPS + _data(small_corpora))  # default --split 969,30,1: the test split gets 0 of 350
    message = str(e.value)
    assert "the test split gets 0 of the 350 documents of" in message and small_corpora["prefix"] in message
    assert "--eval-iters 0" in message and "\n" not in message


def test_a_split_nobody_reads_is_not_built_and_the_run_trains(small_corpora, tmp_path):
    """In a fresh process with a timeout: megatron-core used to loop for ever here."""
    proc = run_trainer(STEPS + _data(small_corpora) + ["--eval-iters", "0", "--metrics-file", str(tmp_path / "m.jsonl")],
                       isolated=True, timeout=240)
    assert sorted(read_metrics(tmp_path / "m.jsonl")) == [1, 2, 3, 4], proc.stdout[-2000:]


def test_the_dry_run_and_sweep_validation_catch_the_empty_split(small_corpora, tmp_path):
    from test_launcher import launch

    proc = launch(dict(DATA_FILE_LIST=small_corpora["list"], TOKENIZER_MODEL=small_corpora["tokenizer"],
                       TRAIN_SPLIT="969", VAL_SPLIT="30", TEST_SPLIT="1", SAVE=str(tmp_path / "r")))
    assert proc.returncode == 2 and "the test split gets 0 of the 350 documents" in error_lines(proc.stderr)[0]
    proc = run_module("megatron_ext.cli", ["sweep", "--grid", "lr=1e-3,2e-3", "--out", str(tmp_path / "s"), "--dry-run",
                                           "--", *STEPS, *_data(small_corpora)])
    assert proc.returncode == 2 and "the test split gets 0 of the 350 documents" in proc.stderr


# -- 9. data files checked against each other and the vocabulary ---------------------------------------
def test_a_truncated_index_and_foreign_token_ids_are_one_line(small_corpora, tmp_path, monkeypatch):
    import gc

    prefix = tmp_path / "cut_text_document"
    shutil.copy(small_corpora["prefix"] + ".bin", str(prefix) + ".bin")
    data = open(small_corpora["prefix"] + ".idx", "rb").read()
    (tmp_path / "cut_text_document.idx").write_bytes(data[: len(data) // 2])
    argv = STEPS + ["--data-path", str(prefix), "--tokenizer-type", "HFTokenizer", "--tokenizer-model",
                    small_corpora["tokenizer"], "--split", "1,0,0"]
    ignored = []  # what Python prints as "Exception ignored in: ..." (megatron-core's IndexedDataset.__del__)
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    with pytest.raises(ArgumentsError, match=r"cut_text_document\.idx: not a readable Megatron index"):
        _plan(argv)
    gc.collect()
    assert not ignored, [f"{u.object}: {u.exc_value!r}" for u in ignored]
    # the same data read with a 64-token vocabulary: its ids do not exist there
    with pytest.raises(ArgumentsError, match=r"holds token id \d+, but the tokenizer has 64 tokens"):
        _plan(STEPS + ["--data-path", small_corpora["prefix"], "--tokenizer-type", "NullTokenizer",
                       "--vocab-size", "64", "--split", "1,0,0"])


def test_a_batch_with_foreign_token_ids_stops_with_one_line(small_corpora):
    from megatron_ext.data.data_checks import DataFileError
    from megatron_ext.data.gpt_data import check_batch_tokens

    import torch

    check_batch_tokens({"tokens": torch.tensor([[0, 5, 63]])}, 64)
    with pytest.raises(DataFileError, match="holds token id 64, but the tokenizer has 64 tokens"):
        check_batch_tokens({"tokens": torch.tensor([[0, 64]])}, 64)


# -- 2. resuming onto a finished schedule says so ----------------------------------------------------
def test_resuming_a_finished_cosine_run_says_it_trains_at_min_lr(tmp_path):
    ck = tmp_path / "ck"
    base = TINY + ["--mock-data", "--global-batch-size", "2", "--save", str(ck), "--load", str(ck)]
    run_trainer(base + ["--train-iters", "4"])
    proc = run_trainer(base + ["--train-iters", "8", "--use-checkpoint-opt-param-scheduler"])
    assert "from the checkpoint (--use-checkpoint-opt-param-scheduler)" in proc.stdout
    assert "WARNING: iterations 5-8 (4 of the 4 this run trains) run at --min-lr 0" in proc.stdout
    assert "--override-opt-param-scheduler" in proc.stdout.split("WARNING:", 1)[1]
    # a run whose schedule is the command line's (a longer cosine) gets no warning
    proc = run_trainer(base + ["--train-iters", "12", "--override-opt-param-scheduler"])
    assert "from the command line (--override-opt-param-scheduler)" in proc.stdout and "WARNING" not in proc.stdout


# -- 3. continual pretraining safeguards ----------------------------------------------------------
def test_cpt_prints_the_checkpoint_lr_and_a_requeued_job_resumes_its_own_checkpoint(tmp_path):
    pre, cpt = tmp_path / "pre", tmp_path / "cpt"
    run_trainer(TINY + ["--mock-data", "--global-batch-size", "2", "--train-iters", "4", "--save", str(pre)])
    job = TINY + ["--mock-data", "--global-batch-size", "2", "--train-iters", "6", "--save-interval", "3",
                  "--load", str(pre), "--save", str(cpt), "--finetune"]
    first = run_trainer(job + ["--exit-interval", "3"])  # the job's walltime ends after iteration 3
    assert "continual pretraining from iteration 4: the checkpoint's LR there was" in first.stdout
    assert "had cooled down to" in first.stdout  # a cosine run to its end: LR at its minimum
    again = run_trainer(job)  # re-queued with the same command
    assert "already holds this run's checkpoint global_step3" in again.stdout
    assert "start iteration       : 3" in again.stdout and "continual pretraining" not in again.stdout
    over = run_trainer(job + ["--restart-from-load"])
    assert "start iteration       : 0" in over.stdout


def test_cooldown_of_a_cooled_checkpoint_warns(tmp_path):
    ck = tmp_path / "ck"
    run_trainer(TINY + ["--mock-data", "--global-batch-size", "2", "--train-iters", "4", "--save", str(ck),
                        "--lr-decay-style", "linear", "--min-lr", "1e-5"])
    proc = run_module("megatron_ext.cli", ["cooldown", str(ck), "--iters", "4"])
    assert "it looks cooled down" in proc.stderr


# -- 4. the LR finder stops on a diverged raw loss ---------------------------------------------------
def test_range_test_stops_when_the_raw_loss_explodes_before_the_smoothed_one():
    from megatron_ext.training.lr_finder import RangeTest

    t = RangeTest(1e-5, 10.0, 60, beta=0.98, stop_factor=4.0)
    losses = [6.0 - 0.002 * k for k in range(50)] + [15.7, 128.9]  # the 60-iteration sweep of the report
    for k, loss in enumerate(losses):
        reason = t.record(t.lr(k), loss)
    assert reason is not None and "loss 128.9 > 16 x best smoothed" in reason
    assert max(t.smoothed) < 4 * t.best  # the smoothed loss alone would have trained on


# -- 5. checkpoints reach the disk before `latest` names them ------------------------------------------
# Every writer of a checkpoint or export folder builds it in a hidden sibling and publishes it with
# fileio.publish_folder: each file and folder synced before the rename, the parent synced after it.
@pytest.fixture(scope="module")
def zero1_checkpoint(tmp_path_factory):
    ck = tmp_path_factory.mktemp("zero1") / "ck"
    run_trainer(STEPS + ["--mock-data", "--zero-stage", "1", "--train-iters", "2", "--save", str(ck),
                         "--save-interval", "2", "--eval-iters", "0"])
    return ck


def _save(tmp_path, _):
    from megatron_ext.training import checkpointing

    staged = tmp_path / ".incomplete.global_step3"
    (staged / "sub").mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "sub/x.pt"):
        (staged / name).write_bytes(b"x")
    checkpointing.publish_checkpoint(str(tmp_path), staged.name, "global_step3", 3)
    assert (tmp_path / "latest").read_text() == "global_step3"
    return tmp_path / "global_step3"


def _to_universal(tmp_path, ck):
    from megatron_ext.training.universal import convert

    convert(str(ck / "global_step2"), str(tmp_path / "global_step2_universal"))
    return tmp_path / "global_step2_universal"


def _convert(tmp_path, ck):
    from megatron_ext.megatron_deepspeed.checkpoints import convert

    convert(str(ck), str(tmp_path / "fork"))
    return tmp_path / "fork" / "global_step2_universal"


def _export_hf(tmp_path, ck):
    from megatron_ext.hf.export import ExportOptions, export

    export(ExportOptions(checkpoint=str(ck), out_dir=str(tmp_path / "hf"), no_tokenizer=True), say=lambda _: None)
    return tmp_path / "hf"


@pytest.mark.parametrize("writer", [
    pytest.param(_save, id="save"),
    pytest.param(_to_universal, id="to-universal", marks=pytest.mark.slow),
    pytest.param(_convert, id="convert", marks=pytest.mark.slow),
    pytest.param(_export_hf, id="export-hf", marks=pytest.mark.slow),
])
def test_every_writer_syncs_every_file_and_folder_before_the_rename(writer, tmp_path, monkeypatch, request):
    ck = request.getfixturevalue("zero1_checkpoint") if writer is not _save else None
    synced, real_fsync = [], os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))  # the path at the time of the sync
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    final = str(writer(tmp_path, ck))
    monkeypatch.undo()
    # synced under the staged copy's name: before the rename made it the final folder
    before = {path for path in synced if path != final and not path.startswith(final + os.sep)}
    name = os.path.basename(final)
    entries = [root for root, _, _ in os.walk(final)] + [os.path.join(r, f) for r, _, fs in os.walk(final) for f in fs]
    assert len(entries) > 2
    for entry in entries:
        rel = os.path.relpath(entry, final)
        suffix = name if rel == "." else f"{name}/{rel}"
        assert any(path.endswith(suffix) for path in before), f"{rel} was not synced before the rename"
    assert os.path.dirname(final) in synced  # the rename itself made durable


# -- 6. known third-party noise is not printed; real messages are -------------------------------------
def test_startup_has_no_known_harmless_warnings(tmp_path):
    proc = run_trainer(STEPS + ["--mock-data"], isolated=True)
    for noise in ("Transformer Engine and Apex are not installed", "full scope is deprecated",
                  "Setting accelerator to CPU", "Apex is not installed"):
        assert noise not in proc.stderr + proc.stdout, noise
    from megatron_ext.platform import known_warnings

    assert all(why for *_, why in known_warnings.PYTHON_WARNINGS + known_warnings.LOG_RECORDS)


# -- 7 / 8. preprocessing a folder, help and progress -------------------------------------------------
def test_preprocessing_a_folder_takes_what_reads_as_text_and_reports_the_rest(tmp_path, hf_corpus):
    folder = tmp_path / "docs"
    (folder / "img").mkdir(parents=True)
    (folder / "guide.md").write_text("the model trains on data\n\nand learns\n")
    (folder / "img" / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    (folder / "img" / "curve.jsonl").write_text('{"lr": 1e-3, "loss": 5.0}\n')
    proc = run_module("megatron_ext.cli", ["preprocess", "--input", str(folder), "--text-split-lines",
                                           "--tokenizer-type", "HFTokenizer", "--tokenizer-model",
                                           hf_corpus["tokenizer"], "--output-prefix", str(tmp_path / "out" / "docs")])
    assert proc.returncode == 0, proc.stderr
    assert "skipped 2 file(s) found in folders" in proc.stderr
    assert "plot.png (binary)" in proc.stderr and "curve.jsonl (no 'text' text (--json-keys))" in proc.stderr
    assert (tmp_path / "out" / "docs_text_document.bin").exists()
    # an explicitly named file is always an input: its problem is an error
    bad = run_module("megatron_ext.cli", ["preprocess", "--input", str(folder / "img" / "curve.jsonl"),
                                          "--tokenizer-type", "HFTokenizer", "--tokenizer-model",
                                          hf_corpus["tokenizer"], "--output-prefix", str(tmp_path / "o2" / "x")])
    assert bad.returncode == 2 and "no key 'text'" in bad.stderr


def test_help_of_the_launcher_and_the_preprocessing_module_exit_zero():
    from test_launcher import launch

    proc = launch(dict(), extra=["--help"])
    assert proc.returncode == 0 and "TRAIN_ITERS (TRAIN_ITER)" in proc.stdout and "--lr-decay-style" in proc.stdout
    assert "tiny" in proc.stdout.split("MODEL_ARCH presets", 1)[1]
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.data.preprocess", "--help"], capture_output=True,
                          text=True, env=_env(), cwd=REPO, timeout=60)
    assert proc.returncode == 0 and "--output-prefix" in proc.stdout


# -- 9. bad inputs that used to reach a traceback -----------------------------------------------------
def test_a_truncated_model_states_file_is_one_line(tmp_path):
    ck = tmp_path / "ck"
    run_trainer(STEPS + ["--mock-data", "--save", str(ck)])
    states = ck / "global_step4" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])
    proc = run_trainer(STEPS + ["--mock-data", "--load", str(ck), "--train-iters", "6"], check=False)
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "mp_rank_00_model_states.pt: cannot read" in lines[0] and "Traceback" not in proc.stderr


def test_output_prefix_under_a_file_and_a_negative_exponent_lr_are_one_line(tmp_path, hf_corpus, capsys):
    (tmp_path / "afile").write_text("x")
    proc = run_module("megatron_ext.cli", ["preprocess", "--input", hf_corpus["data_list"], "--tokenizer-type",
                                           "HFTokenizer", "--tokenizer-model", hf_corpus["tokenizer"],
                                           "--output-prefix", str(tmp_path / "afile" / "x")])
    assert proc.returncode == 2 and f"{tmp_path / 'afile'} is a file, not a folder" in proc.stderr
    with pytest.raises(SystemExit):
        build_parser().parse_args(STEPS + ["--mock-data", "--lr", "-1e-3"])
    assert "argument --lr: must be >= 0, got '-1e-3'" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_while_starting_exits_cleanly_with_one_line(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "megatron_ext.train", *STEPS, "--mock-data"], env=_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.5)  # importing torch, DeepSpeed and megatron-core: the run is starting
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "received SIGTERM while starting (before the first iteration): nothing was trained or saved" in err
    assert "iteration=" not in out


@pytest.mark.parametrize("make, flags, message", [
    (lambda t: (t / "f").write_text("x"), ["--load", "{t}/f"], "--load {t}/f is a file, not a checkpoint directory"),
    (lambda t: (t / "empty").mkdir(), ["--load", "{t}/empty", "--finetune"],
     "--finetune: --load {t}/empty holds no checkpoint"),
    (lambda t: (t / "f").write_text("x"), ["--save", "{t}/f"], "--save {t}/f is a file, not a directory"),
    (lambda t: (t / "d").mkdir(), ["--metrics-file", "{t}/d"], "--metrics-file {t}/d is a directory, not a file"),
])
def test_paths_that_cannot_work_are_one_line_before_any_work(tmp_path, make, flags, message):
    make(tmp_path)
    with pytest.raises(ArgumentsError, match=re.escape(message.format(t=tmp_path))):
        _plan(STEPS + ["--mock-data"] + [f.format(t=tmp_path) for f in flags])


def test_the_command_line_tool_errors_are_one_line():
    for argv in (["list", "--bogus"], ["nosuchcommand"]):
        proc = run_module("megatron_ext.cli", argv)
        assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1, proc.stderr
