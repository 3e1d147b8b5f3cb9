"""ZeRO 3 checkpoints through the real trainer, with one rank and with two (torchrun on gloo): a run
stopped at iteration 4 and started again with the same command continues with the uninterrupted
run's losses exactly, and ``--keep-last`` prunes ZeRO 3 folders (both failed before: the layout
knew only ``mp_rank_*_model_states.pt``); ``to-universal`` converts a ZeRO 3 checkpoint that a ZeRO 1
run resumes with the same losses; ``export-hf`` reads it (transformers' logits within 1e-4 of ours).
SIGKILL during a ZeRO 3 save: tests/test_checkpoint_safety.py."""
import json
import os
import re

import pytest
import torch

from conftest import TINY, assert_same_run, error_lines, read_metrics, run_module, run_trainer

pytestmark = pytest.mark.slow

RUN = ["--mock-data", "--train-iters", "6", "--lr-decay-iters", "6", "--eval-iters", "0"]
SAVES = ["--save-interval", "2", "--keep-last", "2"]


def steps(folder):
    return sorted(int(n[len("global_step"):]) for n in os.listdir(folder) if re.fullmatch(r"global_step\d+", n))


def flags(nproc, stage=3):
    return TINY + RUN + ["--zero-stage", str(stage), "--global-batch-size", str(2 * nproc)]


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def whole(request, tmp_path_factory):
    """The uninterrupted ZeRO 3 run of 6 iterations (checkpoints at 2, 4, 6; --keep-last 2)."""
    nproc = request.param
    save = tmp_path_factory.mktemp(f"zero3_{nproc}") / "whole"
    run_trainer(flags(nproc) + SAVES + ["--save", str(save)], nproc=nproc)
    return nproc, save, read_metrics(save / "metrics.jsonl")


def test_a_stopped_run_resumes_with_the_uninterrupted_losses_and_keep_last_prunes(whole, tmp_path):
    nproc, save, reference = whole
    assert steps(save) == [4, 6]  # global_step2 pruned
    assert sorted(os.listdir(save / "global_step6")) == sorted(
        f"zero_pp_rank_{dp}_mp_rank_00_{kind}_states.pt" for dp in range(nproc) for kind in ("model", "optim"))

    part = tmp_path / "part"
    command = flags(nproc) + SAVES + ["--save", str(part), "--load", str(part)]
    run_trainer(command + ["--exit-interval", "4"], nproc=nproc)
    assert steps(part) == [2, 4] and (part / "latest").read_text() == "global_step4"
    resumed = run_trainer(command, nproc=nproc)  # the same command again
    assert "iteration=       5/" in resumed.stdout and "iteration=       1/" not in resumed.stdout
    assert steps(part) == [4, 6]
    got = read_metrics(part / "metrics.jsonl")
    assert sorted(got) == list(range(1, 7))
    assert_same_run(got, reference, range(1, 7), rel=0, fields=("lm_loss", "learning_rate", "consumed_samples"))


def test_what_a_zero3_checkpoint_cannot_load_at_is_one_line(whole):
    nproc, save, _ = whole
    cases = [(["--zero-stage", "1"], "saved with ZeRO 3, this run uses ZeRO 1 (their file layouts differ); convert "
                                     f"it with 'megatron-ext to-universal {save}'")]
    if nproc == 2:  # one process
        cases.append((["--zero-stage", "3"], "saved at data-parallel size 2 with ZeRO 3"))
    else:  # the whole shapes (param_shapes) against the partitioned model's (ds_shape)
        cases.append((["--zero-stage", "3", "--ffn-hidden-size", "96"], "first mismatch "
                      "decoder.layers.0.mlp.linear_fc1.weight: shape (384, 64) in the checkpoint, (192, 64) in the model"))
    for extra, culprit in cases:
        proc = run_trainer(flags(nproc) + ["--load", str(save), "--no-load-optim"] + extra, check=False)
        lines = error_lines(proc.stderr)
        assert proc.returncode == 2 and len(lines) == 1 and culprit in lines[0], proc.stderr[-2000:]


def test_to_universal_then_zero1_resumes_with_the_same_losses(whole, tmp_path):
    nproc, save, reference = whole
    out = tmp_path / "uni" / "global_step4_universal"
    (tmp_path / "uni").mkdir()
    proc = run_module("megatron_ext.cli", ["to-universal", "--input_folder", str(save / "global_step4"),
                                           "--output_folder", str(out)], check=True)
    assert f"DP={nproc}, ZeRO 3" in proc.stdout
    # what DeepSpeed's ZeRO 1/2 universal loader reads: mp_rank_XX model states, dicts of whole
    # tensors (the vocabulary unpadded and marked), Adam's step
    assert sorted(os.listdir(out)) == ["mp_rank_00_model_states.pt", "universal_conversion.json", "zero"]
    fc1 = out / "zero" / "decoder.layers.0.mlp.linear_fc1.weight"
    assert sorted(os.listdir(fc1)) == ["exp_avg.pt", "exp_avg_sq.pt", "fp32.pt", "step.pt"]
    assert torch.load(fc1 / "fp32.pt", weights_only=False)["param"].shape == (384, 64)
    assert int(torch.load(fc1 / "step.pt", weights_only=False)) == 4
    assert json.loads((out / "universal_conversion.json").read_text())["zero_stage"] == 3
    assert_same_weights(out, save / "global_step4")

    resumed = tmp_path / "resumed.jsonl"
    run_trainer(flags(nproc, stage=1) + ["--load", str(tmp_path / "uni"), "--universal-checkpoint",
                                         "--metrics-file", str(resumed)])  # one process, ZeRO 1
    got = read_metrics(resumed)
    assert sorted(got) == [5, 6]
    assert_same_run(got, reference, [5, 6], rel=1e-5, fields=("lm_loss", "learning_rate", "consumed_samples"))


def assert_same_weights(universal, native):
    """Every fp32 tensor of the universal checkpoint equals the native ZeRO 3 checkpoint's (read
    through DeepSpeed's zero_to_fp32, vocabulary rows cut to the tokenizer's)."""
    from megatron_ext.hf import checkpoint_reader

    ours, theirs = checkpoint_reader.read(str(universal)), checkpoint_reader.read(str(native))
    assert "universal" in ours.source and "ZeRO-3" in theirs.source and sorted(ours.state) == sorted(theirs.state)
    for name in ours.state:
        assert torch.equal(ours.state[name], theirs.state[name]), name


def test_to_universal_stores_a_padded_vocabulary_unpadded(tmp_path):
    """1000 tokens, 1024 rows at TP 1: the universal files hold 1000 (padded again for the loading TP size)."""
    save = tmp_path / "ck"
    run_trainer(TINY + ["--mock-data", "--vocab-size", "1000", "--train-iters", "2", "--save-interval", "2",
                        "--zero-stage", "3", "--eval-iters", "0", "--save", str(save)])
    run_module("megatron_ext.cli", ["to-universal", str(save)], check=True)
    out = save / "global_step2_universal"
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        state = torch.load(out / "zero" / name / "fp32.pt", weights_only=False)
        assert state["vocab_tensor"] and state["param"].shape == (1000, 64), name
    assert_same_weights(out, save / "global_step2")


def test_export_hf_of_a_zero3_checkpoint_gives_our_logits(whole, tmp_path):
    from megatron_ext.hf.export import ExportOptions, export

    nproc, save, _ = whole
    summary = export(ExportOptions(checkpoint=str(save), out_dir=str(tmp_path / "hf"), verify=True),
                     say=lambda _: None)
    assert summary["weights_read"] == "fp32 weights of ZeRO-3 partitions, TP=1" and summary["iteration"] == 6
    assert summary["architecture"] == "LlamaForCausalLM"
    assert summary["verify"]["max_abs_logit_difference"] < 1e-4 and summary["verify"]["generated_tokens"] == 4
