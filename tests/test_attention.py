"""Attention backends: the sdpa core attention against megatron-core's local attention (values and
gradients: MHA, GQA, muP's scale, document-boundary masks), multi-latent attention's shapes
against a direct evaluation, dropout, every core attention of a spec replaced, the same training
losses and interchangeable checkpoints, and how --attention-backend / --use-flash-attn* resolve."""
import math

import pytest
import torch

from conftest import TINY, error_lines, read_metrics, run_module, run_trainer, tree_digest


def _config(heads, groups, d, dropout=0.0):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=heads * d, num_attention_heads=heads, num_query_groups=groups,
                             attention_dropout=dropout, use_cpu_initialization=True, masked_softmax_fusion=False,
                             attention_softmax_in_fp32=True)


def _qkv(s, b, heads, groups, dk, dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(s, b, heads, dk, generator=g, requires_grad=True)
    k = torch.randn(s, b, groups, dk, generator=g, requires_grad=True)
    v = torch.randn(s, b, groups, dv or dk, generator=g, requires_grad=True)
    return q, k, v


def document_mask(s, boundaries):
    """Megatron's mask for packed documents: True = masked (the future, and other documents)."""
    doc = torch.zeros(s, dtype=torch.long)
    for start in boundaries:
        doc[start:] += 1
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    return ((j > i) | (doc[:, None] != doc[None, :]))[None, None]  # [1, 1, s, s]


def _run(module, q, k, v, mask):
    out = module(q, k, v, mask)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (q, k, v))
    return out.detach(), grads


@pytest.mark.parametrize("heads, groups", [(4, 4), (4, 2)])
@pytest.mark.parametrize("scale", [None, 1 / 16])  # megatron-core's 1/sqrt(d), muP's 1/d
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_equals_local_attention_values_and_gradients(mcore, heads, groups, scale, masked):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_ext.models.sdpa import SDPACoreAttention

    config = _config(heads, groups, 16)
    kw = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
              softmax_scale=scale)
    q, k, v = _qkv(32, 2, heads, groups, 16)
    mask = document_mask(32, [5, 17]) if masked else None
    out_local, grads_local = _run(DotProductAttention(**kw), q, k, v, mask)
    out_sdpa, grads_sdpa = _run(SDPACoreAttention(**kw), q, k, v, mask)
    assert out_sdpa.shape == out_local.shape == (32, 2, heads * 16)
    torch.testing.assert_close(out_sdpa, out_local, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_sdpa, grads_local):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sdpa_takes_multi_latent_attention_shapes(mcore):
    """MLA: query/key head dim (content + rotary part) differs from the value head dim, K/V have
    every head, and the layer passes its own softmax scale."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_ext.models.sdpa import SDPACoreAttention

    heads, dk, dv, s, b, scale = 4, 24, 16, 20, 2, 0.3
    module = SDPACoreAttention(_config(heads, heads, 16), 1, AttnMaskType.causal, "self", softmax_scale=scale,
                               k_channels=dk, v_channels=dv)
    q, k, v = _qkv(s, b, heads, heads, dk, dv)
    mask = document_mask(s, [7])
    out = module(q, k, v, mask)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) * scale
    expected = torch.einsum("bhqk,kbhd->qbhd", scores.masked_fill(mask, -math.inf).softmax(-1), v)
    assert out.shape == (s, b, heads * dv)
    torch.testing.assert_close(out, expected.reshape(s, b, heads * dv), rtol=1e-5, atol=1e-5)


def test_dropout_is_applied_in_training_only_from_the_model_parallel_rng(mcore):
    from megatron.core import tensor_parallel
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_ext.models.sdpa import SDPACoreAttention

    module = SDPACoreAttention(_config(4, 2, 16, dropout=0.5), 1, AttnMaskType.causal, "self")
    plain = SDPACoreAttention(_config(4, 2, 16), 1, AttnMaskType.causal, "self")
    q, k, v = _qkv(16, 1, 4, 2, 16)
    module.eval()
    torch.testing.assert_close(module(q, k, v, None), plain(q, k, v, None))
    module.train()
    draws = []
    for _ in range(2):
        tensor_parallel.model_parallel_cuda_manual_seed(7)
        draws.append(module(q, k, v, None).detach())
    assert not torch.allclose(draws[0], plain(q, k, v, None))
    torch.testing.assert_close(draws[0], draws[1])  # the model-parallel RNG, reseeded, draws the same mask


def test_every_core_attention_of_moe_mtp_and_mla_specs_is_replaced(mcore):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_ext.models.features.attention_backend import with_core_attention
    from megatron_ext.models.sdpa import SDPACoreAttention
    from megatron_ext.models.gpt import build_model
    from megatron_ext.plan import parse_args

    args = parse_args(TINY + ["--mock-data", "--train-iters", "1", "--num-experts", "2", "--mtp-num-layers", "1",
                              "--num-key-value-heads", "2"], world_size=1)
    model = build_model(args, 1000)
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(SDPACoreAttention) == 3 and DotProductAttention not in kinds  # 2 decoder layers + 1 MTP
    mla = with_core_attention(get_gpt_layer_local_spec(multi_latent_attention=True), SDPACoreAttention)
    assert mla.submodules.self_attention.submodules.core_attention is SDPACoreAttention
    original = get_gpt_layer_local_spec(multi_latent_attention=True)
    assert original.submodules.self_attention.submodules.core_attention is DotProductAttention  # a copy, not an edit
    # built from the flags: MLA layers (and the MTP layer) run sdpa too; local runs the local MLA attention
    from megatron_ext.models.features.mla import local_mla_core_attention

    mla_flags = TINY + ["--mock-data", "--train-iters", "1", "--multi-latent-attention", "--kv-lora-rank", "16",
                        "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16", "--mtp-num-layers", "1"]
    kinds = [type(m) for m in build_model(parse_args(mla_flags, world_size=1), 1000).modules()]
    assert kinds.count(SDPACoreAttention) == 3 and local_mla_core_attention() not in kinds
    kinds = [type(m) for m in build_model(parse_args(mla_flags + ["--attention-backend", "local"], world_size=1),
                                          1000).modules()]
    assert kinds.count(local_mla_core_attention()) == 3 and SDPACoreAttention not in kinds


GQA = TINY + ["--mock-data", "--num-key-value-heads", "2", "--zero-stage", "1"]


def _losses(tmp_path, name, extra, iters=(1, 2, 3, 4)):
    path = tmp_path / f"{name}.jsonl"
    proc = run_trainer(GQA + extra + ["--metrics-file", str(path)])
    metrics = read_metrics(path)
    return [metrics[i]["lm_loss"] for i in iters], proc


def test_sdpa_and_local_train_to_the_same_losses_and_say_which_runs(tmp_path):
    local, proc_local = _losses(tmp_path, "local", ["--train-iters", "4", "--attention-backend", "local"])
    sdpa, proc_auto = _losses(tmp_path, "auto", ["--train-iters", "4"])
    assert sdpa == pytest.approx(local, rel=1e-6)
    assert "attention             : local (megatron-core unfused DotProductAttention; requested)" in proc_local.stdout
    row = [line for line in proc_auto.stdout.splitlines() if line.strip().startswith("attention ")]
    assert row and "sdpa (torch scaled_dot_product_attention; auto: Transformer Engine needs a CUDA GPU" in row[0]


@pytest.mark.parametrize("first, second", [("local", "sdpa"), ("sdpa", "local")])
def test_a_checkpoint_written_with_one_backend_resumes_with_the_other(tmp_path, first, second):
    ck = tmp_path / "ck"
    common = ["--train-iters", "4", "--save", str(ck), "--load", str(ck), "--save-interval", "2"]
    run_trainer(GQA + common + ["--attention-backend", first, "--exit-interval", "2"])
    resumed, proc = _losses(tmp_path, "resumed", common + ["--attention-backend", second], iters=(3, 4))
    assert "start iteration       : 2" in proc.stdout and f"attention             : {second}" in proc.stdout
    straight, _ = _losses(tmp_path, "straight", ["--train-iters", "4", "--attention-backend", first], iters=(3, 4))
    assert resumed == pytest.approx(straight, rel=1e-5)


@pytest.mark.parametrize("extra, row", [
    (["--use-flash-attn-v2"], "sdpa (torch scaled_dot_product_attention; flash: Transformer Engine needs a CUDA GPU"),
    (["--use-flash-attn-builder", "--attention-backend", "sdpa"], "sdpa (torch scaled_dot_product_attention; requested)"),
    (["--attention-backend", "FUSED"], "sdpa (torch scaled_dot_product_attention; fused: Transformer Engine needs"),
    (["--attention_backend", "unfused"], "local (megatron-core unfused DotProductAttention; --attention-backend unfused"),
])
def test_megatron_spellings_and_flash_flags_resolve(extra, row):
    from megatron_ext.plan import parse_plan

    plan = parse_plan(TINY + ["--mock-data", "--train-iters", "1"] + extra, world_size=1)
    assert row in dict(plan.rows())["attention"]


@pytest.mark.parametrize("extra, message", [
    (["--attention-backend", "te"], "--attention-backend te: Transformer Engine needs a CUDA GPU"),
    (["--use-flash-attn", "--attention-backend", "local"],
     "--use-flash-attn asks for flash attention but --attention-backend local is the unfused one"),
    (["--attention-backend", "flashy"], "invalid choice 'flashy'"),
])
def test_impossible_backends_are_one_line(extra, message):
    proc = run_trainer(TINY + ["--mock-data", "--train-iters", "1"] + extra, check=False)
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def test_a_transformer_engine_checkpoint_is_refused_in_one_line_where_its_names_do_not_fit(tmp_path):
    """Transformer Engine's spec names the norms after the fused linear that holds them: a te
    checkpoint does not fit an sdpa/local model, export-hf's or the fork's mapping. No TE here, so
    the checkpoint is a real sdpa one whose saved flags say te (what a CUDA machine would write)."""
    from megatron_ext.checkpoint_layout import model_states_files

    ck = tmp_path / "ck"
    run_trainer(GQA + ["--train-iters", "2", "--save", str(ck), "--save-interval", "2"])
    for path in model_states_files(str(ck / "global_step2")):
        state = torch.load(path, weights_only=False)  # into memory (load_states maps the file)
        state["args"]["attention_backend"] = "te"
        torch.save(state, path)
    before = tree_digest(ck)
    resumed = run_trainer(GQA + ["--train-iters", "4", "--load", str(ck)], check=False)
    assert resumed.returncode != 0
    line, = error_lines(resumed.stderr)
    assert "was written with --attention-backend te, this model is built with sdpa" in line
    assert "continue it with --attention-backend te on a CUDA machine" in line
    for command, expected in ((["export-hf", str(ck), str(tmp_path / "hf")], "--attention-backend te"),
                              (["convert", str(ck), "--output", str(tmp_path / "fork")], "--attention-backend te")):
        proc = run_module("megatron_ext.cli", command)
        assert proc.returncode == 2 and expected in error_lines(proc.stderr)[0], proc.stderr
    assert not (tmp_path / "hf").exists() and not (tmp_path / "fork").exists()
    assert tree_digest(ck) == before  # refused before anything was written
