"""Checkpoints of pipeline- and expert-parallel runs (docs/parallelism.md, docs/checkpoints.md):
a resumed run continues with exactly the uninterrupted run's losses; a universal checkpoint
reshards PP2 -> PP1 -> PP2 x DP2 and EP2 -> EP1 with the same losses; export-hf reads them
(Llama from PP2, Mixtral from EP2, DeepSeek-V3 from PP2 x EP2) with transformers' logits equal to
ours. One torchrun per world size runs every training leg of that size."""
import json
import os

import pytest

from conftest import TINY, error_lines, read_metrics, run_layouts, run_module, run_trainer
from megatron_ext.launcher.presets import MODEL_PRESETS

pytestmark = pytest.mark.slow

# clipping is active on every step (norms ~1-2 against --clip-grad 0.5)
STEPS = ["--mock-data", "--train-iters", "8", "--global-batch-size", "8", "--micro-batch-size", "2",
         "--seq-length", "32", "--lr", "3e-3", "--lr-warmup-iters", "1", "--clip-grad", "0.5", "--eval-interval",
         "1000", "--eval-iters", "1", "--log-interval", "1"]
LLAMA = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--num-key-value-heads", "2"] + STEPS
MIXTRAL = LLAMA + ["--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "1e-2"]
# tied embeddings: a pipeline-parallel run's last stage holds a copy of the word embedding
GPT2 = LLAMA + ["--model-style", "gpt2", "--hidden-dropout", "0", "--attention-dropout", "0", "--zero-stage", "1"]
# the deepseek-v3-tiny preset's architecture on 2 layers (a dense one, a MoE one with 8 experts), an MTP layer
DEEPSEEK = TINY + [*MODEL_PRESETS["deepseek-v3-tiny"]["flags"], "--mock-data", "--train-iters", "3",
                   "--save-interval", "3", "--num-key-value-heads", "4", "--moe-router-bias-update-rate", "0.05"]
TOL = 1e-4  # export-hf's logit check (fp32)


def interrupted(flags, folder, metrics):
    """An uninterrupted run, and the same run stopped after 4 iterations and resumed (saving every 2)."""
    ck = ["--save", folder, "--load", folder, "--save-interval", "2"]
    return [flags + ["--metrics-file", metrics], flags + ck + ["--exit-interval", "4"], flags + ck]


def assert_same(got, reference, iterations, exact=False):
    for it in iterations:
        for field in ("lm_loss", "grad_norm"):
            if exact:
                assert got[it][field] == reference[it][field], (field, it)
            else:
                assert got[it][field] == pytest.approx(reference[it][field], rel=1e-5), (field, it)


def to_universal(tag_dir):
    run_module("megatron_ext.cli", ["to-universal", str(tag_dir)], check=True)


def export_verified(checkpoint, out):
    from megatron_ext.hf.export import ExportOptions, export

    summary = export(ExportOptions(checkpoint=str(checkpoint), out_dir=str(out), verify=True, no_tokenizer=True),
                     say=lambda _: None)
    assert summary["verify"]["max_abs_logit_difference"] < TOL
    return summary


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """PP2 (Llama), EP2 at ZeRO 1 and ZeRO 0 (Mixtral-style MoE): uninterrupted and resumed."""
    root = tmp_path_factory.mktemp("parallel_checkpoints")
    pp2 = LLAMA + ["--pipeline-model-parallel-size", "2", "--zero-stage", "1"]
    runs = interrupted(pp2, root / "pp2", root / "pp2.jsonl")
    for zero in ("1", "0"):
        ep2 = MIXTRAL + ["--expert-model-parallel-size", "2", "--zero-stage", zero]
        runs += interrupted(ep2, root / f"ep2-zero{zero}", root / f"ep2-zero{zero}.jsonl")
    run_layouts(runs, 2, root)
    return root


def test_resume_is_exact_under_pipeline_and_expert_parallelism(two_ranks):
    for name in ("pp2", "ep2-zero1", "ep2-zero0"):
        resumed, reference = read_metrics(two_ranks / name / "metrics.jsonl"), read_metrics(two_ranks / f"{name}.jsonl")
        assert sorted(resumed) == list(range(1, 9)), name
        assert_same(resumed, reference, range(5, 9), exact=True)
    files = sorted(os.listdir(two_ranks / "ep2-zero1" / "global_step4"))
    assert "expert_ep_rank_01_mp_rank_00_experts.pt" in files and "mp_rank_00_model_states.pt" in files
    assert "mp_rank_01_model_states.pt" in os.listdir(two_ranks / "pp2" / "global_step4")  # one per stage


def test_a_native_checkpoint_at_another_pipeline_size_points_to_conversion(two_ranks):
    """Weights split another way cannot load natively, optimizer or not: the line names the
    conversion and not --no-load-optim (which it does offer for another data-parallel size)."""
    proc = run_trainer(LLAMA + ["--zero-stage", "1", "--load", str(two_ranks / "pp2")], check=False)
    lines = [line for line in error_lines(proc.stderr) if "error" in line.lower()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "saved at pipeline-parallel size 2, this run uses 1" in lines[0]
    assert "megatron-ext to-universal" in lines[0] and "--no-load-optim" not in lines[0]


def test_universal_checkpoint_reshards_pp2_pp1_pp2_and_ep2_ep1(two_ranks, tmp_path):
    reference = read_metrics(two_ranks / "pp2.jsonl")
    to_universal(two_ranks / "pp2" / "global_step4")
    pp1 = tmp_path / "pp1"
    run_trainer(LLAMA + ["--zero-stage", "1", "--load", str(two_ranks / "pp2"), "--universal-checkpoint", "--save",
                         str(pp1), "--save-interval", "2", "--exit-interval", "6"])
    assert_same(read_metrics(pp1 / "metrics.jsonl"), reference, (5, 6))
    to_universal(pp1 / "global_step6")
    tied = tmp_path / "tied"  # PP 1 -> PP 2 x DP 2 with tied embeddings: the copy loads from the link
    run_trainer(GPT2 + ["--save", str(tied), "--save-interval", "4", "--metrics-file", str(tmp_path / "tied.jsonl")])
    to_universal(tied / "global_step4")
    assert os.path.islink(tied / "global_step4_universal" / "zero" / "output_layer.weight")
    deepseek = tmp_path / "deepseek"
    run_layouts([LLAMA + ["--pipeline-model-parallel-size", "2", "--zero-stage", "1", "--load", pp1,
                          "--universal-checkpoint", "--metrics-file", tmp_path / "pp2dp2.jsonl"],
                 GPT2 + ["--pipeline-model-parallel-size", "2", "--load", tied, "--universal-checkpoint",
                         "--metrics-file", tmp_path / "tied-pp2dp2.jsonl"],
                 DEEPSEEK + ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2",
                             "--zero-stage", "1", "--save", deepseek]], 4, tmp_path)
    back = read_metrics(tmp_path / "pp2dp2.jsonl")
    assert sorted(back) == [7, 8]
    assert_same(back, reference, (7, 8))
    assert_same(read_metrics(tmp_path / "tied-pp2dp2.jsonl"), read_metrics(tmp_path / "tied.jsonl"), range(5, 9))

    experts = read_metrics(two_ranks / "ep2-zero1.jsonl")
    to_universal(two_ranks / "ep2-zero1" / "global_step4")
    ep1 = tmp_path / "ep1.jsonl"
    run_trainer(MIXTRAL + ["--zero-stage", "1", "--load", str(two_ranks / "ep2-zero1"), "--universal-checkpoint",
                           "--metrics-file", str(ep1)])
    assert_same(read_metrics(ep1), experts, range(5, 9))

    # export-hf of the PP2 x EP2 DeepSeek-V3 run (its first stage holds only the dense layer)
    summary = export_verified(deepseek, tmp_path / "hf-deepseek")
    assert summary["architecture"] == "DeepseekV3ForCausalLM" and "PP=2, EP=2" in summary["weights_read"]


def test_export_hf_reads_pipeline_and_expert_parallel_checkpoints(two_ranks, tmp_path):
    llama = export_verified(two_ranks / "pp2" / "global_step8", tmp_path / "llama")
    assert llama["architecture"] == "LlamaForCausalLM" and "PP=2, EP=1" in llama["weights_read"]
    mixtral = export_verified(two_ranks / "ep2-zero1" / "global_step8", tmp_path / "mixtral")
    assert mixtral["architecture"] == "MixtralForCausalLM" and "PP=1, EP=2" in mixtral["weights_read"]
    with open(tmp_path / "mixtral" / "config.json") as f:
        assert json.load(f)["num_local_experts"] == 4
