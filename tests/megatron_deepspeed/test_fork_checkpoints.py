"""Checkpoints both ways (``megatron-ext convert``), verified by continuation: the fork at
iteration k continued by the fork vs converted and continued by our trainer (same data, same
schedule), and the reverse; for the fork's GPTModel and its pipeline model (GPTModelPipe, per-layer
files) at PP 2 and TP 2 x PP 2, both ways (ours at PP 1 and at PP 2 into it). The two
implementations of the same llama agree to the last float32 bit in most iterations; the tolerance, 5e-6 on losses near 10, allows a few ulps of summation-order
difference (measured: at most 2 ulps, 1.9e-6). Every fork run reads the 20-iteration data-index
cache the one-process ``fork_alone`` builds (ranks building it together race)."""
import os
import re

import pytest

from megatron_deepspeed.fork_harness import checkpoint_at

pytestmark = pytest.mark.slow

TOLERANCE = 5e-6
SAME_RUN = ["--optimizer", "adamw", "--lr-decay-style", "cosine", "--zero-stage", "1"]
PP2 = ["--pipeline-model-parallel-size", "2"]


def _assert_continues(metrics, losses, iterations):
    assert sorted(metrics) == list(iterations)
    for it in iterations:
        assert abs(metrics[it][0] - losses[it]) <= TOLERANCE, (it, metrics[it][0], losses[it])


@pytest.fixture(scope="module")
def ours_at_10(fork):
    """Our trainer's run with a checkpoint at 10, and its {iteration: (loss, lr)}."""
    save = os.path.join(fork.work, "ours")
    _, reference = fork.run_ours([*SAME_RUN, "--save", save, "--save-interval", "10"])
    return save, reference


def test_a_fork_checkpoint_continues_in_our_trainer(fork, fork_alone):
    run, save = fork_alone
    load = os.path.join(fork.work, "fork-to-ours")
    proc = fork.megatron_ext("convert", os.path.join(save, "global_step10"), "--output", load)
    summary = proc.stdout
    assert "for megatron_ext" in summary and "--universal-checkpoint" in summary
    # not on a terminal: one progress line for the conversion, every parameter counted
    assert re.search(r"^convert: Megatron-DeepSpeed -> megatron_ext, 15 parameters: 15 tensors, [\d.]+ MiB in "
                     r"[\d.]+ s \([\d.]+ [KMG]iB/s\)$", proc.stderr, re.MULTILINE), proc.stderr[-2000:]
    ours_save = os.path.join(fork.work, "ours-continuing-fork")
    _, metrics = fork.run_ours([*SAME_RUN, "--load", load, "--universal-checkpoint", "--save", ours_save])
    assert sorted(metrics) == list(range(11, 21))
    for it in range(11, 21):
        loss, lr = metrics[it]
        assert abs(loss - run.losses[it]) <= TOLERANCE, (it, loss, run.losses[it])
        assert lr == pytest.approx(run.lrs[it - 1], rel=1e-12)  # ours logs the LR an iteration used, the fork the next


def test_our_checkpoint_continues_in_the_fork(fork, ours_at_10):
    save, reference = ours_at_10
    load = os.path.join(fork.work, "ours-to-fork")
    summary = fork.megatron_ext("convert", os.path.join(save, "global_step10"), "--output", load).stdout
    assert "for Megatron-DeepSpeed" in summary and "2 optimizer groups in the fork layout" in summary
    continued = fork.run(["--optimizer", "adamw", "--lr-decay-style", "cosine", "--load", load,
                          "--universal-checkpoint"])  # the fork alone
    assert sorted(continued.losses) == list(range(11, 21))
    for it in range(11, 21):
        assert abs(continued.losses[it] - reference[it][0]) <= TOLERANCE, (it, continued.losses[it], reference[it])
        if it < 20:
            assert continued.lrs[it] == pytest.approx(reference[it + 1][1], rel=1e-12)


def test_a_tensor_parallel_fork_checkpoint_continues_in_our_trainer_at_tp_1(fork):
    """TP 2 -> 1 through the universal format: QKV, SwiGLU's [gate; up] and the row-parallel
    matrices are merged right. (Multi-head attention: the fork's own GQA attention fails at TP 2
    on CPU, a view of a non-contiguous tensor in its core attention.)"""
    save = os.path.join(fork.work, "fork-tp2")
    flags = ["--optimizer", "adamw", "--lr-decay-style", "cosine", "--num-key-value-heads", "4",
             "--tensor-model-parallel-size", "2", "--save", save, "--save-interval", "4"]
    run = fork.run(flags, iters=8, nproc=2)
    load = os.path.join(fork.work, "fork-tp2-to-ours")
    fork.megatron_ext("convert", save + "/global_step4", "--output", load)
    _, metrics = fork.run_ours([*SAME_RUN, "--num-key-value-heads", "4", "--load", load, "--universal-checkpoint",
                                "--save", os.path.join(fork.work, "ours-continuing-tp2")], iters=8)
    assert sorted(metrics) == [5, 6, 7, 8]
    for it in range(5, 9):
        assert abs(metrics[it][0] - run.losses[it]) <= TOLERANCE, (it, metrics[it][0], run.losses[it])


def test_a_pipeline_fork_checkpoint_continues_in_our_trainer(fork, fork_alone, tmp_path):
    """GPTModelPipe at PP 2: its layers by position in the pipe (1 the embedding, 2-3 the layers, 4
    the final norm, 5 the output layer), each stage's own names and partitions; ours continues at PP 1.
    A copy missing one layer file is one line."""
    save = os.path.join(fork.work, "fork-pp2")
    run = fork.run([*SAME_RUN[:4], *PP2, "--save", save, "--save-interval", "10"], pipeline_model=True, nproc=2)
    load = os.path.join(fork.work, "fork-pp2-to-ours")
    summary = fork.megatron_ext("convert", os.path.join(save, "global_step10"), "--output", load).stdout
    assert "(GPTModelPipe, iteration 10, TP=1, PP=2, DP=1) for megatron_ext" in summary
    _, metrics = fork.run_ours([*SAME_RUN, "--load", load, "--universal-checkpoint",
                                "--save", os.path.join(fork.work, "ours-continuing-pp2")])
    _assert_continues(metrics, run.losses, range(11, 21))

    broken = checkpoint_at(save, 10, str(tmp_path / "incomplete"))
    os.unlink(os.path.join(broken, "global_step10", "layer_03-model_00-model_states.pt"))
    for args, line in (
            ([broken], f"{broken}/global_step10: pipeline layer file layer_03-model_00-model_states.pt missing (the "
                       "checkpoint is incomplete)"),
            ([save, "--fork-model", "GPTModelPipe"], f"--fork-model GPTModelPipe: the target is megatron_ext (the "
                                                     "source is the fork's GPTModelPipe)")):
        proc = fork.megatron_ext("convert", *args, "--output", str(tmp_path / "out"), check=False)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"megatron-ext convert: error: {line}"
        assert not (tmp_path / "out").exists()


def test_a_tensor_x_pipeline_fork_checkpoint_with_a_tied_embedding_continues_in_our_trainer(fork, fork_alone):
    """TP 2 x PP 2 on 4 ranks, the output layer tied to the embedding: the pipeline's tied module is on
    the first and the last stage (one copy taken), its TP shards merged; ours continues at TP 1, PP 1."""
    save = os.path.join(fork.work, "fork-tp2pp2")
    run = fork.run([*SAME_RUN[:4], *PP2, "--tensor-model-parallel-size", "2", "--num-key-value-heads", "4",
                    "--save", save, "--save-interval", "10"], pipeline_model=True, tied=True, nproc=4)
    load = os.path.join(fork.work, "fork-tp2pp2-to-ours")
    summary = fork.megatron_ext("convert", os.path.join(save, "global_step10"), "--output", load).stdout
    assert "TP=2, PP=2" in summary and "--tie-embeddings-and-output-weights" in summary
    _, metrics = fork.run_ours([*SAME_RUN, "--num-key-value-heads", "4", "--tie-embeddings-and-output-weights",
                                "--load", load, "--universal-checkpoint",
                                "--save", os.path.join(fork.work, "ours-continuing-tp2pp2")])
    _assert_continues(metrics, run.losses, range(11, 21))


def _continues_in_the_forks_pipeline_model_at_pp2(fork, save, reference, output):
    """Our checkpoint at 10 in ``save`` -> ``--fork-model GPTModelPipe`` -> the fork at PP 2 continues
    with ``reference``'s losses (and LRs: the fork logs the next iteration's); returns convert's summary."""
    load = os.path.join(fork.work, output)
    summary = fork.megatron_ext("convert", os.path.join(save, "global_step10"), "--output", load,
                                "--fork-model", "GPTModelPipe").stdout
    assert "for Megatron-DeepSpeed GPTModelPipe" in summary and "without --no-pipeline-parallel" in summary
    continued = fork.run([*SAME_RUN[:4], *PP2, "--load", load, "--universal-checkpoint"], pipeline_model=True, nproc=2)
    _assert_continues({it: (loss, None) for it, loss in continued.losses.items()},
                      {it: loss for it, (loss, _) in reference.items()}, range(11, 21))
    for it in range(11, 20):
        assert continued.lrs[it] == pytest.approx(reference[it + 1][1], rel=1e-12)
    return summary


def test_our_checkpoint_continues_in_the_forks_pipeline_model_at_pp2(fork, fork_alone, ours_at_10):
    save, reference = ours_at_10
    _continues_in_the_forks_pipeline_model_at_pp2(fork, save, reference, "ours-to-fork-pipe")


def test_our_pipeline_checkpoint_continues_in_the_forks_pipeline_model_at_pp2(fork, fork_alone):
    """Ours at PP 2 on 2 ranks (per-stage model-states and ZeRO files, the later stage holding layer 1
    and the output layer) -> the fork's GPTModelPipe at PP 2: every stage's parameters must reach the
    fork's stages, or the continued losses change (measured: swapping the two layers' dense_4h_to_h
    in the converted checkpoint moves the first loss by 4e-2)."""
    save = os.path.join(fork.work, "ours-pp2")
    _, reference = fork.run_ours([*SAME_RUN, *PP2, "--save", save, "--save-interval", "10"], nproc=2)
    assert os.path.exists(os.path.join(save, "global_step10", "mp_rank_01_model_states.pt"))  # the second stage's
    summary = _continues_in_the_forks_pipeline_model_at_pp2(fork, save, reference, "ours-pp2-to-fork-pipe")
    assert "TP=1, PP=2" in summary


# top-2 (DeepSpeed's gate renormalises the two probabilities, megatron-core's softmax over the top two
# does the same); no capacity on the fork's side (ours drops no tokens), no random second expert, no aux loss
OURS_MOE = ["--num-experts", "2", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0"]
FORK_MOE = ["--num-experts", "2", "--topk", "2", "--expert-interval", "1", "--moe-expert-parallel-size", "1",
            "--create-moe-param-group", "--disable-moe-token-dropping", "--disable-moe-top2-2nd-expert-sampling",
            "--moe-loss-coeff", "0"]


def test_our_moe_checkpoint_continues_in_the_forks_deepspeed_moe(fork, fork_alone, tmp_path):
    """Our megatron-core MoE -> the fork's DeepSpeed-MoE (router -> gate.wg, local_experts.E ->
    deepspeed_experts.E, the experts' own param group after the fork's two). Swapped experts, a lost
    expert group (DeepSpeed pairs groups by position) or another gate would change every loss."""
    save = os.path.join(fork.work, "ours-moe")
    _, reference = fork.run_ours([*SAME_RUN, *OURS_MOE, "--save", save, "--save-interval", "10"])
    load = os.path.join(fork.work, "ours-moe-to-fork")
    summary = fork.megatron_ext("convert", os.path.join(save, "global_step10"), "--output", load).stdout
    assert "3 optimizer groups in the fork layout" in summary and " ".join(FORK_MOE[:10]) in summary
    continued = fork.run([*SAME_RUN[:4], *FORK_MOE, "--load", load, "--universal-checkpoint"])
    _assert_continues({it: (loss, None) for it, loss in continued.losses.items()},
                      {it: loss for it, (loss, _) in reference.items()}, range(11, 21))

    proc = fork.megatron_ext("convert", os.path.join(save, "global_step10"), "--output", str(tmp_path / "out"),
                             "--fork-model", "GPTModelPipe", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        f"megatron-ext convert: error: {save}/global_step10: an MoE model converts for the fork's GPTModel")


def test_convert_refuses_what_it_cannot_convert_in_one_line(fork, tmp_path):
    bad = tmp_path / "not-a-checkpoint"
    bad.mkdir()
    proc = fork.megatron_ext("convert", str(bad), "--output", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("megatron-ext convert: error:")
    assert not (tmp_path / "out").exists()
