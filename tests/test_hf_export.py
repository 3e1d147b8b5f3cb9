"""megatron-ext export-hf on checkpoints the real trainer writes: fp32 weights from every layout
(TP=2 merged bit-identically to DeepSpeed's universal converter; ZeRO-2 bf16 and ZeRO-0 bf16 fp32
masters; ZeRO 3; universal), transformers' logits within 1e-4 of our model's (fp32) for a TP=2
llama with GQA, a ZeRO-2 bf16 run, a CompleteP model with tied embeddings, an MoE model with an MTP
layer, a GPT-2 style model and the DeepSeek-V3 architecture (DeepseekV3ForCausalLM); the tokenizer (SentencePiece converted) giving training's ids;
config fields, shards, generate; one-line refusals with nothing written."""
import json
import os
import types

import pytest
import torch

from conftest import TINY, error_lines, run_module, run_trainer, tree_digest
from megatron_ext.launcher.presets import MODEL_PRESETS
from hf_fixtures import SAMPLES, command_env, corpus_lines, one_process_megatron  # noqa: F401 (fixtures)

ITERS = ["--mock-data", "--train-iters", "4", "--save-interval", "4", "--num-key-value-heads", "2"]
TOL = 1e-4

# name -> (extra trainer flags, processes)
RUNS = {
    "tp2": (["--tensor-model-parallel-size", "2", "--zero-stage", "1"], 2),  # + the SentencePiece tokenizer
    "zero2_bf16": (["--zero-stage", "2", "--bf16"], 2),
    "zero0_bf16": (["--zero-stage", "0", "--bf16"], 1),
    "zero3": (["--zero-stage", "3"], 1),
    "completep_tied": (["--parametrization", "completep", "--mup-base-hidden", "32", "--depth-base", "1",
                        "--tie-embeddings-and-output-weights"], 1),
    "moe_mtp": (["--num-experts", "4", "--moe-router-topk", "2", "--mtp-num-layers", "1"], 1),
    "gpt2": (["--model-style", "gpt2", "--num-key-value-heads", "4"], 1),
    # the deepseek-v3-tiny preset's architecture (MLA, dense first layer, sigmoid MoE with shared expert,
    # expert bias moved far enough to change the routing, group-limited routing, MTP) with YaRN x4
    "deepseek_v3": ([*MODEL_PRESETS["deepseek-v3-tiny"]["flags"], "--num-key-value-heads", "4",
                     "--moe-router-bias-update-rate", "0.05", "--rotary-scaling-factor", "4", "--mscale", "1.0",
                     "--mscale-all-dim", "1.0"], 1),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_ext.data.tokenizers import train_sentencepiece

    root = tmp_path_factory.mktemp("hf_export")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines()) + "\n")
    sp = train_sentencepiece([str(corpus)], str(root / "sp"), vocab_size=320)
    out = {"root": root, "sp": sp}

    def train(name):
        flags, nproc = RUNS[name]
        extra = ["--tokenizer-model", sp] if name == "tp2" else []
        run_trainer(TINY + ITERS + flags + extra + ["--save", str(root / name)], nproc=nproc)
        out[name] = root / name

    for name in RUNS:  # one-process runs train in this process: no start-up cost each
        train(name)
    return out


def export(checkpoint, out, **options):
    from megatron_ext.hf.export import ExportOptions, export as run

    return run(ExportOptions(checkpoint=str(checkpoint), out_dir=str(out), **options), say=lambda _: None)


# -- where the fp32 weights come from -------------------------------------------------------------
@pytest.mark.slow
def test_tp2_merge_is_bit_identical_to_deepspeeds_universal_conversion(runs, tmp_path):
    from megatron_ext.hf import checkpoint_reader
    from megatron_ext.training.universal import convert

    convert(str(runs["tp2"] / "global_step4"), str(tmp_path / "global_step4_universal"))
    ours = checkpoint_reader.read(str(runs["tp2"]))
    theirs = checkpoint_reader.read(str(tmp_path / "global_step4_universal"))
    assert "TP=2" in ours.source and "universal" in theirs.source
    assert sorted(ours.state) == sorted(theirs.state)
    for name in ours.state:
        assert torch.equal(ours.state[name], theirs.state[name]), name
    vocab = ours.args.vocab_size_unpadded
    assert ours.state["embedding.word_embeddings.weight"].shape[0] == vocab < ours.args.padded_vocab_size  # padding cut


@pytest.mark.slow
def test_fp32_model_states_equal_zero_partitions(runs):
    from megatron_ext.hf.checkpoint_reader import _tensors, _zero_to_fp32
    from megatron_ext.checkpoint_layout import load_states

    tag = str(runs["tp2"] / "global_step4")
    for rank in (0, 1):
        module = _tensors(load_states(f"{tag}/mp_rank_{rank:02d}_model_states.pt")["module"])
        partitions = _zero_to_fp32(tag, rank)
        assert sorted(module) == sorted(partitions)
        assert all(torch.equal(module[k], partitions[k]) for k in module)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero2_bf16", "zero0_bf16"])
def test_bf16_runs_give_their_fp32_masters(runs, name):
    from megatron_ext.hf import checkpoint_reader
    from megatron_ext.checkpoint_layout import load_states

    weights = checkpoint_reader.read(str(runs[name]))
    assert weights.dtype == torch.float32 and "fp32 master weights" in weights.source
    module = load_states(str(runs[name] / "global_step4" / "mp_rank_00_model_states.pt"))["module"]
    more_bits = False
    for key, master in weights.state.items():
        assert torch.equal(master.to(torch.bfloat16), module[key]), key  # the bf16 weights are the rounded masters
        more_bits |= not torch.equal(master, module[key].float())
    assert more_bits


# -- logits ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name,architecture", [("tp2", "LlamaForCausalLM"), ("zero2_bf16", "LlamaForCausalLM"),
                                               ("zero3", "LlamaForCausalLM"),
                                               ("completep_tied", "LlamaForCausalLM"),
                                               ("moe_mtp", "MixtralForCausalLM"), ("gpt2", "GPT2LMHeadModel"),
                                               ("deepseek_v3", "DeepseekV3ForCausalLM")])
def test_transformers_logits_match_ours(runs, tmp_path, one_process_megatron, name, architecture):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from megatron_ext.hf import checkpoint_reader, reference_model

    summary = export(runs[name], tmp_path / "hf", verify=True)
    assert summary["architecture"] == architecture
    assert summary["verify"]["max_abs_logit_difference"] < TOL and summary["verify"]["generated_tokens"] == 4
    # the same comparison, written out: transformers' own loader on the folder
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    weights = checkpoint_reader.read(str(runs[name]))
    ours = reference_model.build(weights.args, weights.state)
    diff, scale = reference_model.compare(ours, model, weights.args.vocab_size_unpadded, 64, seed=3)
    assert diff < TOL and scale > 0.1, (diff, scale)
    if name == "completep_tied":  # multipliers folded; tied embeddings become an untied copy
        assert any("folded" in n for n in summary["notes"]) and not summary["tie_word_embeddings"]
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    if name == "moe_mtp":
        assert any("multi-token-prediction" in n for n in summary["notes"])
    if name == "deepseek_v3":  # the trained expert bias routes in transformers too
        assert model.config.first_k_dense_replace == 1 and model.config.rope_parameters["rope_type"] == "yarn"
        assert model.model.layers[1].mlp.gate.e_score_correction_bias.abs().max() > 0


@pytest.mark.slow
def test_config_generation_config_and_tokenizer(runs, tmp_path):
    import sentencepiece
    from transformers import AutoTokenizer

    summary = export(runs["tp2"], tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    pieces = __import__("sentencepiece").SentencePieceProcessor(model_file=runs["sp"]).get_piece_size()
    assert (config["vocab_size"], config["num_key_value_heads"], config["num_attention_heads"]) == (pieces, 2, 4)
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == 10000.0
    assert config["rms_norm_eps"] == 1e-5 and config["tie_word_embeddings"] is False
    assert (config["eos_token_id"], config["bos_token_id"]) == (2, 1)
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == 2
    record = json.loads((tmp_path / "hf" / "megatron_ext_export.json").read_text())
    assert record["iteration"] == 4 and record["tokenizer"]["type"] == "SentencePieceTokenizer"
    # the converted tokenizer encodes like SentencePiece did in training: same ids, no BOS added
    sp = sentencepiece.SentencePieceProcessor(model_file=runs["sp"])
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in list(SAMPLES) + corpus_lines()[:50]:
        assert hf.encode(text) == sp.encode(text), text
    assert hf.eos_token_id == 2 and summary["tokenizer"]["texts_checked_same_ids"] >= 8


@pytest.mark.slow
def test_sharded_bf16_export_loads(runs, tmp_path, one_process_megatron):  # noqa: F811
    from transformers import AutoModelForCausalLM

    summary = export(runs["tp2"], tmp_path / "hf", dtype="bf16", max_shard_size="100KB", verify=True)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((tmp_path / "hf" / s).is_file() for s in shards)
    assert summary["verify"]["max_abs_logit_difference"] < TOL  # no multipliers: the same function exactly
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert model.dtype == torch.bfloat16


@pytest.mark.slow
def test_universal_checkpoint_exports(runs, tmp_path):
    from megatron_ext.training.universal import convert

    (tmp_path / "uni").mkdir()
    convert(str(runs["zero2_bf16"] / "global_step4"), str(tmp_path / "uni" / "global_step4_universal"))
    summary = export(tmp_path / "uni", tmp_path / "hf")  # a run directory with only latest_universal
    assert summary["weights_read"] == "fp32 weights of a universal checkpoint"


# -- refusals: one line, exit 2, nothing written --------------------------------------------------
def _in_process(capsys, argv):
    from megatron_ext.cli import main

    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def _error(proc):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_bad_inputs_are_one_line_and_write_nothing(runs, tmp_path, capsys, command_env):  # noqa: F811
    import shutil

    src = runs["completep_tied"]
    before = tree_digest(src)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    # an architecture no Hugging Face class computes: llama-style with LayerNorm (saved flags edited)
    odd = tmp_path / "odd"
    shutil.copytree(src, odd)
    states = odd / "global_step4" / "mp_rank_00_model_states.pt"
    client = torch.load(states, weights_only=False)
    client["args"]["normalization"] = "LayerNorm"
    torch.save(client, states)
    cases = [
        ([str(tmp_path / "missing"), str(tmp_path / "o1")], "no such checkpoint directory"),
        ([str(tmp_path), str(tmp_path / "o2")], "not a checkpoint"),
        ([str(src), str(busy)], "exists and is not empty"),
        ([str(odd), str(tmp_path / "o3")], "LlamaForCausalLM needs RMSNorm (this model: LayerNorm)"),
        ([str(runs["tp2"]), str(tmp_path / "o4"), "--tokenizer-model", str(tmp_path / "gone.model")],
         "--tokenizer-model"),
    ]
    line = _error(run_module("megatron_ext.cli", ["export-hf", *cases[0][0]]))  # the real command line once
    assert cases[0][1] in line, line
    for argv, expected in cases[1:]:  # then in this process (no start-up per case)
        line = _error(_in_process(capsys, ["export-hf", *argv]))
        assert expected in line, line
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
    assert (busy / "keep.txt").read_text() == "mine" and sorted(os.listdir(busy)) == ["keep.txt"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".export-hf.")]  # no staging left
    assert tree_digest(src) == before  # the checkpoint is only read


def test_architecture_refusals_name_what_is_missing():
    from megatron_ext.hf import HFError
    from megatron_ext.hf.config_mapping import export_architecture

    llama = dict(model_style="llama", position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                 num_attention_heads=4, num_key_value_heads=2, num_layers=2, num_experts=None,
                 add_bias_linear=False, ffn_hidden_size=128)
    assert export_architecture(types.SimpleNamespace(**llama)) == "LlamaForCausalLM"
    cases = [
        (dict(swiglu=False), "needs SwiGLU (this model: GELU)"),
        (dict(position_embedding_type="learned_absolute"), "needs rotary positions"),
        (dict(num_experts=4, moe_layer_freq=2, moe_first_k_dense=None), "an MoE MLP in every layer"),
        (dict(num_experts=4, moe_layer_freq=1, moe_first_k_dense=None, moe_router_score_function="sigmoid"),
         "DeepseekV3ForCausalLM cannot represent this model: it needs multi-latent attention"),
        (dict(multi_latent_attention=True), "DeepseekV3ForCausalLM cannot represent this model: it needs its q/kv "
                                             "norms (--qk-layernorm); --norm-epsilon 1e-06"),
        (dict(qk_layernorm=True), "--qk-layernorm without --multi-latent-attention"),
        (dict(multi_latent_attention=True, qk_layernorm=True, norm_epsilon=1e-6, num_experts=8, moe_layer_freq=1,
              moe_first_k_dense=None, moe_router_topk=2, moe_router_score_function="sigmoid",
              moe_shared_expert_intermediate_size=64, moe_ffn_hidden_size=64, moe_router_num_groups=4,
              moe_router_group_topk=2), "scored by their top 1; --moe-router-topk / --moe-router-group-topk must be 2"),
        (dict(num_experts=4, moe_layer_freq=1, moe_first_k_dense=None, moe_shared_expert_intermediate_size=64),
         "it needs multi-latent attention (--multi-latent-attention)"),
        (dict(attention_backend="te"), "--attention-backend te: Transformer Engine's parameter names are not mapped"),
        (dict(model_style="gpt2", position_embedding_type="learned_absolute", normalization="LayerNorm",
              swiglu=False), "GPT2LMHeadModel has no grouped-query attention"),
    ]
    for change, expected in cases:
        with pytest.raises(HFError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            export_architecture(types.SimpleNamespace(**{**llama, **change}))


@pytest.mark.parametrize("name, flags", [
    ("LlamaForCausalLM", ["--num-key-value-heads", "2", "--add-bias-linear"]),
    ("MixtralForCausalLM", ["--num-key-value-heads", "2", "--num-experts", "4"]),
    ("DeepseekV3ForCausalLM", [*MODEL_PRESETS["deepseek-v3-tiny"]["flags"], "--num-layers", "3",
                               "--moe-ffn-hidden-size", "32", "--moe-shared-expert-intermediate-size", "32"]),
    ("DeepseekV3ForCausalLM", ["--multi-latent-attention", "--qk-layernorm", "--norm-epsilon", "1e-6"]),  # full q, dense
    ("GPT2LMHeadModel", ["--model-style", "gpt2", "--untie-embeddings-and-output-weights"]),
])
def test_the_weight_table_read_both_ways_gives_back_every_tensor(one_process_megatron, name, flags):  # noqa: F811
    """weight_mapping's one table: export then import (no multipliers) is the identity on every
    tensor of our model, for each architecture and (Mixtral) both expert layouts import reads."""
    from megatron_ext.hf.config_mapping import export_architecture, hf_config
    from megatron_ext.hf.weight_mapping import from_hf, to_hf
    from megatron_ext.models.gpt import build_model
    from megatron_ext.plan import parse_args

    args = parse_args(TINY + ["--mock-data", "--train-iters", "1", *flags], world_size=1)
    assert export_architecture(args) == name
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator) for k, v in build_model(args, 256).state_dict().items()
             if torch.is_tensor(v) and not k.startswith("mtp.")}
    state = {k: v[:250] if v.shape[0] == 256 else v for k, v in state.items()}  # vocabulary unpadded
    theirs, tie, _ = to_hf(state, args, name)
    config = hf_config(args, name, vocab_size=250, tie=tie, bos=None, eos=None, dtype="float32")
    layouts = [theirs]
    if name == "MixtralForCausalLM":  # transformers 5's fused experts
        fused = {k: v for k, v in theirs.items() if ".block_sparse_moe." not in k}
        for i in range(args.num_layers):
            moe, experts = f"model.layers.{i}.block_sparse_moe.", range(args.num_experts)
            fused[f"model.layers.{i}.mlp.gate.weight"] = theirs[moe + "gate.weight"]
            fused[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([theirs[moe + f"experts.{e}.w1.weight"], theirs[moe + f"experts.{e}.w3.weight"]]) for e in experts])
            fused[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([theirs[moe + f"experts.{e}.w2.weight"]
                                                                             for e in experts])
        layouts.append(fused)
    for hf in layouts:
        ours = from_hf(hf.__getitem__, list(hf), config, name)
        assert sorted(ours) == sorted(state)
        for k, v in state.items():
            assert torch.equal(ours[k], v), k
