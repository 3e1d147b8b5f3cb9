"""megatron_ext's plug-ins inside the real Megatron-DeepSpeed fork (the fixture), on one CPU process.

Each test runs the fork's own ``pretrain_gpt_alcf.py`` (a ~4M-parameter llama, 20 iterations of 4 x 64
tokens: ~12 s a process) and reads what it logged (``record_run.py``: every iteration's loss and LR
at full precision) and what the plug-ins report (``MEGATRON_EXT_REPORT``). Runs are shared through
module fixtures where one run serves several checks.
"""
import glob
import json
import math
import os
import shutil
import types

import pytest

from megatron_deepspeed.fork_harness import checkpoint_at, noise_free

pytestmark = pytest.mark.slow

LN_VOCAB = math.log(32000)  # the Llama-2 tokenizer's vocabulary (no padding at 32000)


def test_our_adamw_and_cosine_match_the_forks_own(fork_alone, fork_with_ours):
    alone, ours = fork_alone[0], fork_with_ours[0]
    assert ours.report["optimizer"] == "AdamW" and ours.report["scheduler"] == "ParamScheduler"
    assert "by megatron_ext" in ours.report["ownership"] and alone.report is None
    assert "learning rate decay style" in alone.proc.stdout and "learning rate decay style" not in ours.proc.stdout
    # the fork's own layout (decay, no decay) so the ZeRO partitions are interchangeable
    assert [g["name"] for g in ours.report["param_groups"]] == ["wd_no_scale_lr", "no_wd_no_scale_lr"]
    assert sorted(alone.losses) == sorted(ours.losses) == list(range(1, 21))
    for it in range(1, 21):
        assert abs(alone.losses[it] - ours.losses[it]) <= 1e-6, it
        assert abs(alone.lrs[it] - ours.lrs[it]) <= 1e-6 * alone.lrs[it], it
    assert ours.losses[20] < ours.losses[1] - 0.3


def test_a_checkpoint_saved_with_the_plugins_continues_in_the_fork_alone(fork, fork_alone, fork_with_ours):
    """Same ZeRO layout both ways: the fork alone resumes our AdamW's checkpoint natively."""
    load = checkpoint_at(fork_with_ours[1], 10, os.path.join(fork.work, "plugins-at-10"))
    resumed = fork.run(["--optimizer", "adamw", "--lr-decay-style", "cosine", "--load", load])
    assert sorted(resumed.losses) == list(range(11, 21))
    for it in range(11, 21):
        assert abs(resumed.losses[it] - fork_alone[0].losses[it]) <= 1e-6, it


def test_muon_and_wsd_train_and_resume_exactly_through_the_forks_checkpoints(fork):
    save = os.path.join(fork.work, "muon")
    flags = ["--optimizer", "muon", "--lr-decay-style", "wsd", "--lr-wsd-decay-fraction", "0.25"]
    full = fork.run([*flags, "--save", save, "--save-interval", "10"], plugins="all", via="module")
    groups = {g["role"]: g for g in full.report["param_groups"]}
    assert full.report["optimizer"] == "Muon" and groups["hidden"]["use_matrix"] and not groups["output"]["use_matrix"]
    # wsd in samples: warmup 8, hold 1e-3, cool down (1-sqrt) over the last 25% (samples 60..80)
    assert full.lrs[2] == pytest.approx(1e-3) and full.lrs[14] == pytest.approx(1e-3)
    assert full.lrs[16] < 1e-3 and full.lrs[20] == pytest.approx(1e-5)
    assert full.losses[20] < full.losses[1] - 0.3
    resumed = fork.run([*flags, "--load", checkpoint_at(save, 10, os.path.join(fork.work, "muon-at-10"))],
                       plugins="all", via="module")
    assert sorted(resumed.losses) == list(range(11, 21))
    for it in range(11, 21):
        assert resumed.losses[it] == full.losses[it] and resumed.lrs[it] == full.lrs[it], it


def test_shampoo_at_zero_0_with_an_infinite_schedule(fork):
    """Through an entry point that calls install(); the fork's own dshampooadamw cannot save."""
    save = os.path.join(fork.work, "shampoo")
    flags = ["--optimizer", "dshampooadamw", "--dshampooadamw-precondition-freq", "4", "--lr-decay-style",
             "infinite-cosine", "--constant-lr", "5e-4", "--lr-cooldown-fraction", "0.3", "--lr-constant-fraction",
             "0.3", "--save", save, "--save-interval", "20"]
    run = fork.run(flags, plugins="all", via="install", zero_stage=0)
    assert run.report["optimizer"] == "Shampoo"
    assert os.path.isfile(os.path.join(save, "global_step20", "mp_rank_00_model_states.pt"))
    expected = _our_schedule(lr=1e-3, min_lr=1e-5, lr_decay_style="infinite-cosine", constant_lr=5e-4,
                             lr_cooldown_fraction=0.3, lr_constant_fraction=0.3)
    for it in range(1, 21):  # the fork logs the LR set for the next iteration, at 4 x it samples
        assert run.lrs[it] == pytest.approx(expected.lr(4.0 * it), rel=1e-12), it
    assert all(math.isfinite(v) for v in run.losses.values()) and run.losses[20] < run.losses[1] - 0.2


def test_mup_multipliers_act_on_the_forks_model(fork, fork_with_ours):
    sp = fork_with_ours[0]
    at_base = fork.run(["--optimizer", "adamw", "--lr-decay-style", "cosine", "--parametrization", "mup",
                        "--mup-base-hidden", "64"], plugins="all")
    for it in range(1, 21):  # m_N = 1: every multiplier is 1 -> exactly the standard parametrization
        assert abs(at_base.losses[it] - sp.losses[it]) <= 1e-6, it
    # m_N = 2, on the fork's pipeline model (GPTModelPipe: N.lm_head.weight is the output layer)
    wide = fork.run(["--optimizer", "adamw", "--lr-decay-style", "cosine", "--parametrization", "mup",
                     "--mup-base-hidden", "32", "--mup-output-multiplier", "1e-6"], plugins="all", iters=4,
                    pipeline_model=True)
    applied = wide.report["parametrization"]
    assert wide.lrs[1] == pytest.approx(5e-4)  # the pipeline engine steps our schedule too (warmup: 1e-3 x 4/8)
    # logits x 1e-6 / m_N: the first loss is the uniform distribution's, ln(vocabulary), to float32
    # rounding; the standard parametrization's small initial logits are measurably off it
    assert applied["logit_multiplier"] == pytest.approx(0.5e-6)
    assert abs(wide.losses[1] - LN_VOCAB) < 2e-5 and abs(sp.losses[1] - LN_VOCAB) > 1e-4
    assert applied["hook_calls"]["logits"] >= 4  # the final norm (its output: the LM head's input) was scaled every forward
    assert applied["redrawn"]["hidden"] == pytest.approx(0.02 / math.sqrt(2))
    assert applied["measured_std"]["hidden"] == pytest.approx(0.02 / math.sqrt(2), rel=0.05)
    assert applied["softmax_scale"] == pytest.approx(math.sqrt(8) / 16) and applied["attention_modules"] == 2
    groups = {g["role"]: g for g in wide.report["param_groups"]}
    assert groups["hidden"]["lr_mult"] == pytest.approx(0.5) and groups["output"]["lr_mult"] == 1.0
    assert groups["output"]["numel"] == 32000 * 64 and groups["final_norm"]["numel"] == 64  # lm_head, bare N.weight


def test_our_lr_finder_replaces_the_forks_and_sophiags_curvature_pass_runs(fork):
    save = os.path.join(fork.work, "lr-finder")
    run = fork.run(["--optimizer", "sophiag", "--sophiag-hessian-interval", "3", "--lr-finder", "--lr-finder-iters",
                    "12", "--lr-finder-start", "1e-5", "--lr-finder-end", "1", "--save", save, "--save-interval", "5"],
                   plugins="all")
    assert run.report["lr_finder_ran"] and run.report["hook_calls"]["curvature_pass"] == 4  # iterations 0, 3, 6, 9
    result = json.load(open(os.path.join(save, "lr_finder", "lr_finder.json")))
    assert result["iterations_run"] == 12 and result["suggestions"]["min_loss_div10"] is not None
    assert not glob.glob(os.path.join(save, "global_step*"))  # no checkpoint
    assert not os.path.exists(os.path.join(save, "lr_finder", "lr_finder_data.csv"))  # the fork's finder did not run


def test_schedule_free_evaluation_weights_completep_branches_and_moe_router_roles(fork):
    """One run, three checks: schedule-free's evaluation weights, CompleteP's residual-branch
    multipliers (on dense and DeepSpeed-MoE layers), the router's role."""
    run = fork.run(["--optimizer", "adamwschedulefree", "--eval-interval", "4", "--num-experts", "2",
                    "--create-moe-param-group", "--parametrization", "completep", "--depth-base", "1"],
                   plugins="all", iters=8)
    assert run.report["optimizer"] == "AdamWScheduleFree"
    assert run.report["hook_calls"]["evaluation_weights"] == 2  # evaluations at 4 and 8
    applied = run.report["parametrization"]
    assert applied["residual_multiplier"] == pytest.approx(0.5)  # m_L = 2 layers / depth base 1, alpha 1
    calls = applied["hook_calls"]
    assert calls["residual_self_attention"] == calls["residual_mlp"] >= 2 * 8  # both layers, every forward
    groups = run.report["param_groups"]
    router = [g for g in groups if g["role"] == "router"]
    # deepspeed_moe.gate.wg of the one MoE layer (the fork's --expert-interval 2): 2 experts x hidden 64
    assert len(router) == 1 and router[0]["numel"] == 2 * 64 and router[0]["lr_mult"] == 1.0
    assert [g["role"] for g in groups if g.get("moe")] == ["hidden"]  # the experts' matrices, in DeepSpeed's MoE group
    assert all(math.isfinite(v) for v in run.losses.values())


def test_new_adds_only_what_the_fork_lacks(fork):
    run = fork.run(["--optimizer", "adamw", "--lr-decay-style", "wsd"], plugins="new", iters=6)
    assert "optimizer adamw by Megatron-DeepSpeed" in run.report["ownership"]
    assert "LR schedule wsd by megatron_ext" in run.report["ownership"]
    expected = _our_schedule(lr=1e-3, min_lr=1e-5, lr_decay_style="wsd", train_iters=6)
    for it in range(1, 7):
        assert run.lrs[it] == pytest.approx(expected.lr(4.0 * it), rel=1e-12), it


@pytest.mark.parametrize("flags, message", [
    (["--optimizer", "muon", "--muon-ns-steps", "0"], "argument --muon-ns-steps: must be a positive integer"),
    (["--lr-decay-style", "wsd", "--lr-wsd-decay-fraction", "0"], "--lr-wsd-decay-fraction must be > 0"),
])
def test_a_bad_plugin_flag_is_one_line_before_any_work(fork, flags, message):
    run = fork.run(flags, plugins="all", check=False)
    lines = noise_free(run.proc.stderr)
    assert run.proc.returncode == 2 and len(lines) == 1 and message in lines[0], run.proc.stderr[-2000:]
    assert "building GPT model" not in run.proc.stdout and not run.records


# -- helpers ----------------------------------------------------------------------------------------


def _our_schedule(**kw):
    """Our LR schedule for the harness's run (global batch 4, 20 iterations, warmup 2 iterations)."""
    from megatron_ext.arguments import build_parser
    from megatron_ext.schedules.common.scheduler import build_schedule

    args = build_parser().parse_args(["--mock-data"])
    fields = dict(global_batch_size=4, seq_length=64, train_iters=20, lr_warmup_iters=2)
    fields.update(kw)
    return build_schedule(types.SimpleNamespace(**{**vars(args), **fields}))
