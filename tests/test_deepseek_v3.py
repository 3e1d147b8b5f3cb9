"""DeepSeek-V3-style models on the real trainer (megatron-core MLA, shared experts, aux-loss-free
expert bias, group-limited routing, sequence aux loss, qk-layernorm, MTP; DeepSpeed; CPU): each
flag group builds and trains, document boundaries change what attends to what, the expert bias
moves once per optimizer step and resumes exactly, every impossible combination is one line, the
optimizers see the right roles, and the presets resolve."""
import json

import pytest
import torch

from conftest import TINY, error_lines, plan_error, read_metrics, run_trainer
from megatron_ext.plan import parse_args, parse_plan

MLA = ["--multi-latent-attention", "--q-lora-rank", "32", "--kv-lora-rank", "16", "--qk-head-dim", "16",
       "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16", "--qk-layernorm"]
DSV3_MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-first-k-dense", "1",
            "--moe-shared-expert-intermediate-size", "64", "--moe-router-score-function", "sigmoid",
            "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0.01",
            "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "1e-3",
            "--moe-router-num-groups", "2", "--moe-router-group-topk", "1", "--moe-router-topk-scaling-factor", "2.5"]
# 3 layers (1 dense), 2 micro-batches of 2 per iteration
DSV3 = TINY + MLA + DSV3_MOE + ["--num-layers", "3", "--mtp-num-layers", "1", "--mock-data", "--lr", "3e-3",
                                "--global-batch-size", "4", "--zero-stage", "1"]
BASE = ["--mock-data", "--train-iters", "10"]


# --- checks at start-up ------------------------------------------------------------------------

@pytest.mark.parametrize("argv, world, message", [
    (["--q-lora-rank", "8"], 1, "--q-lora-rank needs --multi-latent-attention"),
    (["--qk-layernorm", "--rope-type", "yarn"], 1, "--rope-type needs --multi-latent-attention"),
    (MLA + ["--num-key-value-heads", "2"], 1, "MLA has no grouped-query attention"),
    (MLA + ["--rope-type", "rope", "--rotary-scaling-factor", "4"], 1, "--rotary-scaling-factor is a yarn setting"),
    (MLA + ["--kv-lora-rank", "15", "--tensor-model-parallel-size", "2"], 2,
     "does not divide --kv-lora-rank + --qk-pos-emb-head-dim = 23"),
    (["--moe-shared-expert-intermediate-size", "64"], 1, "--moe-shared-expert-intermediate-size needs --num-experts"),
    (["--num-experts", "4", "--moe-shared-expert-intermediate-size", "64", "--moe-shared-expert-overlap"], 1,
     "--moe-shared-expert-overlap: it overlaps the shared expert"),
    (["--num-experts", "4", "--moe-shared-expert-intermediate-size", "64", "--add-bias-linear"], 1,
     "--moe-shared-expert-intermediate-size with --add-bias-linear: megatron-core's shared experts have no biases"),
    (["--num-experts", "4", "--moe-router-enable-expert-bias"], 1,
     "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid"),
    (["--num-experts", "4", "--moe-router-bias-update-rate", "0.01"], 1,
     "--moe-router-bias-update-rate needs --moe-router-enable-expert-bias"),
    (["--num-experts", "4", "--moe-router-num-groups", "2"], 1,
     "group-limited routing needs both --moe-router-num-groups and --moe-router-group-topk"),
    (["--num-experts", "6", "--moe-router-num-groups", "4", "--moe-router-group-topk", "1"], 1,
     "--moe-router-num-groups 4 does not divide --num-experts 6"),
    (["--num-experts", "8", "--moe-router-num-groups", "2", "--moe-router-group-topk", "3"], 1,
     "--moe-router-group-topk 3 is larger than --moe-router-num-groups 2"),
    (["--num-experts", "8", "--moe-router-topk", "1", "--moe-router-pre-softmax", "--moe-router-num-groups", "4",
      "--moe-router-group-topk", "2"], 1, "--moe-router-topk 1 must be between --moe-router-group-topk 2"),
    (["--eval-per-corpus"], 1, "--eval-per-corpus needs a data list"),
    (["--eval-per-corpus-iters", "2"], 1, "--eval-per-corpus-iters has no effect without --eval-per-corpus"),
    (["--num-experts", "4", "--gate_type", "TopKBalancedNoisyGate"], 1,
     "argument --gate-type: 'TopKBalancedNoisyGate' (LLaMA-MoE): LLaMA-MoE's gates"),
    (["--calculator_type", "SwitchDropTokenCalculator"], 1, "SwitchDropTokenCalculator drops tokens"),
    (["--final_lr_portion", "0.1"], 1, "--min-lr = --lr x portion"),
])
def test_impossible_combinations_are_one_line(capsys, argv, world, message):
    assert message in plan_error(capsys, BASE + argv, world)


def test_flags_reach_megatron_core_config():
    """Megatron-LM's defaults, MLA's own config class, and the fields each flag sets."""
    from megatron_ext.models.gpt import transformer_config
    from megatron_ext.parametrizations import parametrization_for

    a = parse_args(BASE + ["--multi-latent-attention", "--qk-layernorm", "--num-experts", "8",
                           "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                           "--moe-router-num-groups", "4", "--moe-router-group-topk", "2",
                           "--moe-shared-expert-intermediate-size", "96", "--reset-attention-mask"], world_size=1)
    assert (a.kv_lora_rank, a.qk_head_dim, a.qk_pos_emb_head_dim, a.v_head_dim, a.q_lora_rank) == (32, 128, 64, 128, None)
    assert (a.rope_type, a.rotary_scaling_factor, a.moe_router_bias_update_rate) == ("yarn", 1.0, 1e-3)
    c = transformer_config(a, parametrization_for(a))
    assert type(c).__name__ == "MLATransformerConfig"
    # Megatron-LM passes --rotary-scaling-factor (default 1): MLATransformerConfig's own default is 40
    assert (c.rotary_scaling_factor, c.kv_channels, c.qk_layernorm, c.rotary_base) == (1.0, 128, True, 10000)
    assert (c.moe_router_enable_expert_bias, c.moe_router_num_groups, c.moe_router_group_topk) == (True, 4, 2)
    assert c.moe_shared_expert_intermediate_size == 96 and not c.moe_shared_expert_overlap
    plain = transformer_config(parse_args(BASE, world_size=1), parametrization_for(a))
    assert type(plain).__name__ == "TransformerConfig" and not plain.qk_layernorm
    # LLaMA-MoE's names are aliases of the same flags
    b = parse_args(BASE + ["--num-experts", "16", "--num_selects", "4", "--gate_balance_loss_weight", "0.01",
                           "--moe_calculator_score_scale_factor", "4.0", "--learning_rate", "2e-4",
                           "--calculator_type", "UniversalCalculator", "--dynamic_data_selection", "none",
                           "--split", "1"], world_size=1)
    assert (b.moe_router_topk, b.moe_aux_loss_coeff, b.moe_router_topk_scaling_factor, b.lr) == (4, 0.01, 4.0, 2e-4)
    assert b.split == "1,0,0"  # Megatron: missing split weights are 0


def test_llama_moe_names_are_all_documented():
    import os

    from conftest import REPO
    from megatron_ext.models.llama_moe_names import ALIASES, REFUSED

    doc = open(os.path.join(REPO, "docs", "deepseek_v3.md")).read()
    for alias, (flag, _) in ALIASES.items():
        assert f"`{alias[2:].replace('-', '_')}`" in doc and flag in doc, alias
    for flag in REFUSED:
        assert f"`{flag[2:].replace('-', '_')}`" in doc, flag


# --- document boundaries -------------------------------------------------------------------------

def _model_and_sample(argv):
    from megatron.core import parallel_state as ps

    from megatron_ext.data.gpt_data import build_datasets
    from megatron_ext.models.gpt import build_model
    from megatron_ext.platform import init_distributed
    from megatron_ext.training.trainer import set_seeds

    init_distributed()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()
    plan = parse_plan(argv, world_size=1)
    set_seeds(1234)
    model = build_model(plan.args, plan.tokenizer.vocab_size, plan.parametrization).eval()
    train, _, _ = build_datasets(plan.args, plan.tokenizer, plan.data_sources)
    sample = next(train[i] for i in range(len(train))
                  if 8 <= (train[i]["tokens"] == plan.tokenizer.eod).nonzero()[0].item() <= 48)
    return plan, model, {k: v.unsqueeze(0) for k, v in sample.items() if torch.is_tensor(v)}


@pytest.mark.parametrize("attention", ["standard", "mla"])
def test_tokens_after_an_end_of_document_do_not_see_the_document_before(tmp_path, hf_corpus, attention):
    """With --reset-attention-mask, changing every token of the first document leaves the outputs
    after its end-of-document token untouched; without it they change. Positions restart and the
    end-of-document input carries no loss with the two other flags."""
    from megatron_ext.training.loss import model_inputs

    data = ["--data-file-list", hf_corpus["data_list"], "--tokenizer-type", "HFTokenizer", "--tokenizer-model",
            hf_corpus["tokenizer"], "--data-cache-path", str(tmp_path / "cache"), "--train-iters", "2",
            "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64"]
    data += MLA if attention == "mla" else []
    outputs = {}
    for flags in ([], ["--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss"]):
        plan, model, batch = _model_and_sample(data + flags)
        eod = (batch["tokens"][0] == plan.tokenizer.eod).nonzero()[0].item()
        changed = dict(batch, tokens=batch["tokens"].clone())
        changed["tokens"][0, :eod] = (changed["tokens"][0, :eod] + 7) % plan.tokenizer.vocab_size
        with torch.no_grad():
            before, after = (model(**model_inputs(b, "cpu")) for b in (batch, changed))
        outputs[bool(flags)] = (before, after, eod, batch)
    before, after, eod, batch = outputs[True]
    assert batch["attention_mask"].shape == (1, 1, 64, 64)
    assert torch.equal(before[0, eod + 1:], after[0, eod + 1:])  # the next document never saw the change
    assert not torch.equal(before[0, :eod], after[0, :eod])
    assert batch["position_ids"][0, eod + 1] == 0 and batch["loss_mask"][0, eod] == 0
    before, after, eod, plain = outputs[False]
    assert "attention_mask" not in plain and plain["position_ids"][0, eod + 1] == eod + 1
    assert not torch.allclose(before[0, eod + 1:], after[0, eod + 1:])  # causal attention crosses documents


# --- training, expert bias, resume ------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The DeepSeek-V3-style tiny model, one process, 2 accumulated micro-batches per iteration."""
    path = tmp_path_factory.mktemp("dsv3_dp1") / "m.jsonl"
    proc = run_trainer(DSV3 + ["--train-iters", "4", "--metrics-file", str(path)])
    return proc, read_metrics(path)


def test_deepseek_v3_trains_and_the_expert_bias_moves_once_per_optimizer_step(reference):
    proc, m = reference
    attention = next(line for line in proc.stdout.splitlines() if line.startswith("  attention "))
    assert attention.endswith("; MLA kv rank 16, q rank 32, head dims qk 16+8 v 16, yarn x1; qk-layernorm"), attention
    assert ("MoE 4 experts top-2 in 2/3 layers (aux loss coeff 0.001 seq_aux_loss, sigmoid scores, shared expert 64, "
            "expert bias rate 0.01, 1 of 2 groups)") in proc.stdout
    assert " total, " in proc.stdout and " active per token" in proc.stdout
    assert all("load_balancing_loss=" in line and "mtp_1 loss=" in line for line in proc.stdout.splitlines()
               if line.startswith(" iteration="))
    rate, previous = 0.01, None
    for it in (1, 2, 3, 4):
        load, bias = m[it]["expert_load"], m[it]["expert_bias"]
        assert sorted(bias) == ["decoder.layers.1", "decoder.layers.2", "mtp.layers.0.transformer_layer"]
        for layer, counts in load.items():
            mean = sum(counts) / len(counts)
            step = [rate * ((mean > c) - (mean < c)) for c in counts]  # sign(mean - tokens) x rate, once
            start = previous[layer] if previous else [0.0] * len(counts)
            assert bias[layer] == pytest.approx([s + d for s, d in zip(start, step)], abs=1e-7), (it, layer)
        previous = bias


def _assert_same_run(a, b, exact):
    for it in sorted(a):
        for key, rel in (("lm_loss", 1e-5), ("moe_aux_loss", 1e-5), ("mtp_loss", 1e-5), ("grad_norm", 1e-4)):
            expected = a[it][key] if exact else pytest.approx(a[it][key], rel=rel, abs=1e-6)
            assert b[it][key] == expected, (it, key)
        assert b[it]["expert_load"] == a[it]["expert_load"], it
        assert b[it]["expert_bias"] == a[it]["expert_bias"], it  # from the (equal) token counts: exact


def test_resume_is_exact(tmp_path, reference):
    """The expert bias is saved with the weights: a resumed run routes exactly like the straight one."""
    ck = tmp_path / "ck"
    common = DSV3 + ["--train-iters", "4", "--save", str(ck), "--load", str(ck), "--save-interval", "3"]
    run_trainer(common + ["--exit-interval", "3"])
    state = torch.load(next(ck.glob("global_step3/mp_rank_00_model_states.pt")), weights_only=False)["module"]
    saved = {k[:-len(".mlp.router.expert_bias")]: v.tolist() for k, v in state.items() if k.endswith("router.expert_bias")}
    assert saved == reference[1][3]["expert_bias"] and any(any(b) for b in saved.values())
    second = run_trainer(common)
    assert "start iteration       : 3" in second.stdout
    _assert_same_run(reference[1], read_metrics(ck / "metrics.jsonl"), exact=True)


def test_universal_checkpoint_carries_the_expert_bias(tmp_path, reference):
    """The universal converter extracts the expert bias like a parameter; the load restores it, so
    the run continues exactly (DeepSpeed's universal load alone restores parameters only)."""
    from conftest import run_module

    ck = tmp_path / "ck"
    run_trainer(DSV3 + ["--train-iters", "4", "--save", str(ck), "--save-interval", "3", "--exit-interval", "3"])
    run_module("megatron_ext.cli", ["to-universal", str(ck)], check=True)
    run_trainer(DSV3 + ["--train-iters", "4", "--load", str(ck), "--universal-checkpoint", "--save", str(tmp_path / "b"),
                        "--metrics-file", str(tmp_path / "m.jsonl")])
    resumed = read_metrics(tmp_path / "m.jsonl")
    assert sorted(resumed) == [4]
    _assert_same_run({4: reference[1][4]}, resumed, exact=True)


@pytest.mark.slow
def test_two_data_parallel_ranks_match_the_accumulated_single_process(tmp_path, reference):
    """Each rank routes its own micro-batch; the bias follows the tokens summed over both ranks."""
    run_trainer(DSV3 + ["--train-iters", "4", "--metrics-file", str(tmp_path / "m.jsonl")], nproc=2)
    _assert_same_run(reference[1], read_metrics(tmp_path / "m.jsonl"), exact=False)


@pytest.mark.parametrize("zero", ["0", "2"])
def test_resume_is_exact_under_other_zero_stages(tmp_path, zero):
    ck = tmp_path / "ck"
    flags = DSV3 + ["--zero-stage", zero, "--train-iters", "4"]
    run_trainer(flags + ["--metrics-file", str(tmp_path / "straight.jsonl")])
    common = flags + ["--save", str(ck), "--load", str(ck), "--save-interval", "2"]
    run_trainer(common + ["--exit-interval", "2"])
    run_trainer(common)
    _assert_same_run(read_metrics(tmp_path / "straight.jsonl"), read_metrics(ck / "metrics.jsonl"), exact=True)


@pytest.mark.slow
def test_mla_under_tensor_parallelism_matches_one_rank(tmp_path):
    """MLA's down-projections are split across tensor-parallel ranks and gathered: TP 2 trains like
    TP 1 (CPU initialisation draws the same weights at any TP size), and resumes exactly."""
    flags = TINY + MLA + ["--mock-data", "--train-iters", "4", "--lr", "3e-3"]
    run_trainer(flags + ["--metrics-file", str(tmp_path / "tp1.jsonl")])
    ck = tmp_path / "ck"
    tp2 = flags + ["--tensor-model-parallel-size", "2", "--save", str(ck), "--load", str(ck), "--save-interval", "2"]
    run_trainer(tp2 + ["--exit-interval", "2"], nproc=2)
    run_trainer(tp2, nproc=2)
    one, two = read_metrics(tmp_path / "tp1.jsonl"), read_metrics(ck / "metrics.jsonl")
    for it in (1, 2, 3, 4):
        assert two[it]["lm_loss"] == pytest.approx(one[it]["lm_loss"], rel=1e-5), it


# --- optimizers and parametrizations ---------------------------------------------------------------

def test_optimizer_roles_of_mla_router_shared_experts():
    """MLA's low-rank matrices and the shared expert are hidden matrices (Muon/Shampoo update them
    whole); the router keeps its element-wise role; norms and the expert bias are not matrices."""
    from megatron.core import parallel_state as ps

    from megatron_ext.models.gpt import build_model
    from megatron_ext.optimizers import OPTIMIZERS
    from megatron_ext.optimizers.common.param_groups import build_param_groups
    from megatron_ext.platform import init_distributed

    init_distributed()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()
    args = parse_args(DSV3 + ["--train-iters", "1", "--optimizer", "muon"], world_size=1)
    model = build_model(args, 1024)
    groups = {g["role"]: g for g in OPTIMIZERS.get("muon").obj(build_param_groups(model), args).param_groups}
    hidden = groups["hidden"]["param_names"]
    for part in ("linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj",
                 "shared_experts.linear_fc1", "shared_experts.linear_fc2"):
        assert any(f"{part}.weight" in n for n in hidden), part
    assert groups["hidden"]["use_matrix"] and not groups["router"]["use_matrix"]
    assert all(n.endswith("mlp.router.weight") for n in groups["router"]["param_names"])
    norms = groups["norm"]["param_names"]
    assert any(n.endswith("q_layernorm.weight") for n in norms) and any(n.endswith("kv_layernorm.weight") for n in norms)
    names = {n for g in groups.values() for n in g["param_names"]}
    assert not any("expert_bias" in n for n in names)  # a buffer, moved by its own rule
    assert any(n.endswith("router.expert_bias") for n, _ in model.named_buffers())


@pytest.mark.parametrize("extra", [
    ["--optimizer", "muon"],
    ["--parametrization", "mup", "--mup-base-hidden", "32"],
    ["--optimizer", "shampoo"],
    ["--parametrization", "completep", "--depth-base", "1", "--optimizer", "muon"],
])
def test_optimizers_and_parametrizations_train_the_model(tmp_path, extra):
    run_trainer(DSV3 + extra + ["--train-iters", "3", "--metrics-file", str(tmp_path / "m.jsonl")])
    m = read_metrics(tmp_path / "m.jsonl")
    assert sorted(m) == [1, 2, 3] and all(0 < r["lm_loss"] < 20 and r["grad_norm"] > 0 for r in m.values())


# --- presets -------------------------------------------------------------------------------------

def test_presets_resolve_and_the_tiny_one_trains(tmp_path, hf_corpus):
    from test_launcher import launch, resolved

    from megatron_ext.launcher.presets import MODEL_PRESETS

    args, _, settings = resolved(launch(dict(MODEL_ARCH="openseek-small", SAVE=str(tmp_path / "run"))))
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.ffn_hidden_size) == (6, 1280, 10, 7168)
    assert (args.multi_latent_attention, args.kv_lora_rank, args.qk_head_dim, args.qk_pos_emb_head_dim,
            args.v_head_dim, args.q_lora_rank, args.qk_layernorm) == (True, 512, 128, 64, 128, None, True)
    assert (args.num_experts, args.moe_router_topk, args.moe_ffn_hidden_size, args.moe_shared_expert_intermediate_size,
            args.moe_first_k_dense) == (64, 6, 896, 1792, 1)
    assert (args.moe_router_score_function, args.moe_router_enable_expert_bias, args.moe_router_load_balancing_type,
            args.moe_aux_loss_coeff, args.moe_router_topk_scaling_factor) == ("sigmoid", True, "seq_aux_loss", 1e-4, 2.446)
    assert not args.untie_embeddings_and_output_weights and args.rope_theta == 1e6 and args.seq_length == 4096
    assert settings["MODEL_ARCH flags"].startswith("--multi-latent-attention")
    # a variable still wins over the preset's flag
    args = resolved(launch(dict(MODEL_ARCH="openseek-small", MOE_TOPK="4", SAVE=str(tmp_path / "run"))))[0]
    assert args.moe_router_topk == 4
    preset = MODEL_PRESETS["deepseek-v3-tiny"]
    shape = ["--num-layers", str(preset["num_layers"]), "--hidden-size", str(preset["hidden_size"]),
             "--ffn-hidden-size", str(preset["ffn_hidden_size"]), "--num-attention-heads",
             str(preset["num_attention_heads"]), "--seq-length", "64"]
    run_trainer(shape + list(preset["flags"]) + ["--mock-data", "--train-iters", "2", "--micro-batch-size", "2",
                                                 "--metrics-file", str(tmp_path / "m.jsonl")])
    m = read_metrics(tmp_path / "m.jsonl")
    assert sorted(m) == [1, 2] and "mtp_loss" in m[2] and len(m[2]["expert_load"]) == 3 + 1


def test_bad_preset_combination_is_one_line(tmp_path):
    from test_launcher import launch

    bad = launch(dict(MODEL_ARCH="deepseek-v3-tiny", MOE_SCORE_FUNCTION="softmax", SAVE=str(tmp_path / "run")))
    assert bad.returncode == 2
    lines = error_lines(bad.stderr)
    assert len(lines) == 1 and "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid" in lines[0]


# --- per-corpus validation ---------------------------------------------------------------------------

def test_validation_loss_per_corpus(tmp_path, hf_corpus, capsys):
    """Two corpora of the data list: one validation loss each at every evaluation, in the log,
    metrics.jsonl and the TensorBoard scalars."""
    import shutil

    from megatron_ext.training.metrics import scalars_of

    other = tmp_path / "other"
    other.mkdir()
    for ext in (".bin", ".idx"):
        shutil.copy(hf_corpus["prefix"] + ext, str(other / "corpus_text_document") + ext)
    data_list = tmp_path / "list.txt"
    data_list.write_text(f"0.7 {hf_corpus['prefix']} web\n0.3 {other}/corpus_text_document books\n")
    proc = run_trainer(TINY + ["--data-file-list", str(data_list), "--tokenizer-type", "HFTokenizer",
                               "--tokenizer-model", hf_corpus["tokenizer"], "--data-cache-path", str(tmp_path / "c"),
                               "--seq-length", "32", "--train-iters", "4", "--eval-interval", "2", "--eval-iters", "2",
                               "--split", "90,10,0", "--eval-per-corpus", "--eval-per-corpus-iters", "1",
                               "--metrics-file", str(tmp_path / "m.jsonl")])
    lines = [line for line in proc.stdout.splitlines() if "validation loss per corpus" in line]
    assert [line.split("|")[0].strip() for line in lines] == ["validation loss per corpus at iteration 2",
                                                              "validation loss per corpus at iteration 4"]
    assert "web: " in lines[0] and "books: " in lines[0]
    per_corpus = read_metrics(tmp_path / "m.jsonl", "validation_per_corpus")
    assert sorted(per_corpus) == [2, 4]
    losses = per_corpus[4]["lm_loss"]
    assert sorted(losses) == ["books", "web"] and all(0 < v < 20 for v in losses.values())
    # the same documents and seed in both corpora: the same validation samples, the same loss
    assert losses["web"] == pytest.approx(losses["books"])
    assert per_corpus[4]["lm_loss"]["web"] < per_corpus[2]["lm_loss"]["web"]
    scalars = scalars_of("validation_per_corpus", per_corpus[4])
    assert scalars["validation_per_corpus/lm_loss/web"] == losses["web"]
    assert {"validation_per_corpus/ppl/books", "validation_per_corpus/accuracy/web"} <= set(scalars)
    # a corpus with no validation document under the split: one line before any work
    with pytest.raises(SystemExit):
        parse_args(["--data-file-list", str(data_list), "--tokenizer-type", "HFTokenizer", "--tokenizer-model",
                    hf_corpus["tokenizer"], "--train-iters", "2", "--split", "9999,1,0", "--eval-per-corpus"],
                   world_size=1)
    assert "--split 9999,1,0: the validation split gets 0 of the 600 documents of" in capsys.readouterr().err


def test_corpus_names_of_a_data_path():
    from megatron_ext.data.data_list import parse_data_path
    from megatron_ext.data.gpt_data import corpus_names

    names = corpus_names(parse_data_path(["1", "/d/arxiv-high/2_text_document", "2", "/d/arxiv-low/2_text_document",
                                          "1", "/d/wiki/012_text_document"]))
    assert list(names) == ["arxiv-high/2_text_document", "arxiv-low/2_text_document", "012_text_document"]


def test_per_corpus_numbers_reach_the_sweep_results():
    from megatron_ext.sweeps.results import summarize

    records = [{"split": "train", "iteration": 1, "lm_loss": 6.0}, {"split": "validation", "iteration": 1, "lm_loss": 5.0},
               {"split": "validation_per_corpus", "iteration": 1, "lm_loss": {"web": 4.5, "books": 5.5}}]
    assert summarize(records)["final_val_loss_per_corpus"] == {"web": 4.5, "books": 5.5}
    assert json.dumps(summarize(records))  # JSON-safe
