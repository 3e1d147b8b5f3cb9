"""The real trainer (DeepSpeed engine + megatron-core GPT) on CPU: runs, resumes exactly, and
rejects bad input with one line before doing any work."""
import pytest

from conftest import TINY, error_lines, read_metrics, run_trainer


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path):
    common = TINY + ["--mock-data", "--train-iters", "6", "--lr-warmup-iters", "2", "--zero-stage", "1",
                     "--eval-interval", "3", "--eval-iters", "2"]
    full = tmp_path / "full"
    run_trainer(common + ["--save", str(full)])
    part = tmp_path / "part"
    resumable = common + ["--save", str(part), "--load", str(part), "--save-interval", "3"]
    first = run_trainer(resumable + ["--exit-interval", "3"])
    assert "start iteration       : 0" in first.stdout
    assert (part / "global_step3").is_dir()
    assert (part / "latest").read_text().strip() == "global_step3"
    assert (part / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    second = run_trainer(resumable)  # the same command continues the run
    assert "start iteration       : 3" in second.stdout

    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(part / "metrics.jsonl")
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for it in range(1, 7):
        assert a[it]["lm_loss"] == b[it]["lm_loss"], it  # fp32: bit-identical
        assert a[it]["learning_rate"] == b[it]["learning_rate"]
    va, vb = read_metrics(full / "metrics.jsonl", "validation"), read_metrics(part / "metrics.jsonl", "validation")
    assert va[6]["lm_loss"] == vb[6]["lm_loss"]


def test_checkpoint_client_state_has_what_universal_conversion_needs(tmp_path):
    import torch
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_VALUE

    run_trainer(TINY + ["--mock-data", "--train-iters", "2", "--save", str(tmp_path), "--vocab-size", "1000"])
    state = torch.load(tmp_path / "global_step2" / "mp_rank_00_model_states.pt", weights_only=False)
    assert state["iteration"] == 2 and state["consumed_samples"] == 4 and state["tokens"] == 4 * 64
    assert state["checkpoint_version"] == 3.0
    info = state["universal_checkpoint_info"]
    assert info["universal_checkpoint_version"] == UNIVERSAL_CHECKPOINT_VERSION_VALUE
    assert info["original_vocab_size"] == 1000 and info["padded_vocab_size"] == 1024
    assert state["args"]["train_iters"] == 2
    assert len(state["rng_state"]) == 1 and "torch" in state["rng_state"][0]
    assert state["lr_scheduler"]["schedule"]["style"] == "cosine"


def test_loss_falls_and_log_line_has_megatron_fields(tmp_path):
    proc = run_trainer(TINY + ["--mock-data", "--train-iters", "30", "--lr", "3e-3", "--micro-batch-size", "4",
                               "--metrics-file", str(tmp_path / "m.jsonl")])
    for field in ("iteration=", "consumed_samples=", "consumed_tokens=", "elapsed_time_per_iteration_ms=",
                  "learning_rate=", "global_batch_size=", "lm loss=", "grad_norm=", "tokens_per_second=", "TFLOPs="):
        assert field in proc.stdout
    for field in ("parameters", "world size", "data-parallel size", "tensor-parallel size", "micro batch",
                  "global batch", "tokens per step", "train iterations", "train tokens"):
        assert field in proc.stdout
    m = read_metrics(tmp_path / "m.jsonl")
    first = sum(m[i]["lm_loss"] for i in range(1, 4)) / 3
    last = sum(m[i]["lm_loss"] for i in range(28, 31)) / 3
    assert last < first - 0.3, (first, last)


@pytest.mark.parametrize("zero, extra", [(0, []), (2, []), (3, []), (1, ["--bf16"]), (2, ["--bf16"])])
def test_zero_stages_and_bf16_train(tmp_path, zero, extra):
    run_trainer(TINY + ["--mock-data", "--train-iters", "3", "--zero-stage", str(zero), *extra,
                        "--metrics-file", str(tmp_path / "m.jsonl")])
    m = read_metrics(tmp_path / "m.jsonl")
    assert sorted(m) == [1, 2, 3]
    assert all(0 < r["lm_loss"] < 10 and r["grad_norm"] == r["grad_norm"] for r in m.values())


def test_gradient_accumulation_matches_one_big_micro_batch(tmp_path):
    """4 samples as 1 micro-batch of 4 or 2 accumulated micro-batches of 2: same update."""
    base = TINY + ["--mock-data", "--train-iters", "3", "--global-batch-size", "4"]
    run_trainer(base + ["--micro-batch-size", "4", "--metrics-file", str(tmp_path / "a.jsonl")])
    run_trainer(base + ["--micro-batch-size", "2", "--metrics-file", str(tmp_path / "b.jsonl")])
    a, b = read_metrics(tmp_path / "a.jsonl"), read_metrics(tmp_path / "b.jsonl")
    for it in (1, 2, 3):
        assert b[it]["lm_loss"] == pytest.approx(a[it]["lm_loss"], rel=1e-5)


def test_clip_grad_is_passed_to_deepspeed(tmp_path):
    run_trainer(TINY + ["--mock-data", "--train-iters", "1", "--clip-grad", "0.25", "--save", str(tmp_path)])
    import json

    assert json.loads((tmp_path / "ds_config.json").read_text())["gradient_clipping"] == 0.25


def test_user_deepspeed_config_is_respected_and_batch_mismatch_rejected(tmp_path):
    import json

    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5}))
    out = tmp_path / "run"
    proc = run_trainer(TINY + ["--mock-data", "--train-iters", "1", "--deepspeed-config", str(cfg), "--save", str(out)])
    written = json.loads((out / "ds_config.json").read_text())
    assert written["zero_optimization"]["stage"] == 2 and written["gradient_clipping"] == 0.5
    assert "ZeRO stage            : 2" in proc.stdout
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": 7}))
    bad = run_trainer(TINY + ["--mock-data", "--train-iters", "1", "--deepspeed-config", str(cfg)], check=False)
    assert bad.returncode == 2
    assert "train_micro_batch_size_per_gpu=7 disagrees with the flags (2)" in error_lines(bad.stderr)[-1]


def _assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "iteration=" not in proc.stdout  # nothing was trained


def test_missing_data_file_is_reported_before_any_work(tmp_path):
    save = tmp_path / "ckpt"
    proc = run_trainer(TINY + ["--train-iters", "2", "--data-path", str(tmp_path / "nope_text_document"),
                               "--save", str(save)], check=False)
    _assert_one_line_error(proc, "nope_text_document")
    assert not save.exists()


def test_malformed_data_list_line_is_reported_with_file_and_line(tmp_path):
    lst = tmp_path / "data.txt"
    lst.write_text("# weights\n1.0 /some/prefix corpus\nnot-a-number /other/prefix corpus\n")
    proc = run_trainer(TINY + ["--train-iters", "2", "--data-file-list", str(lst)], check=False)
    _assert_one_line_error(proc, f"{lst}:3")


def test_missing_data_file_list_is_reported(tmp_path):
    proc = run_trainer(TINY + ["--train-iters", "2", "--data-file-list", str(tmp_path / "none.txt")], check=False)
    _assert_one_line_error(proc, "none.txt")
