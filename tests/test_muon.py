"""Muon: the published update on fixed gradients (whole matrices, and the fused QKV / SwiGLU
matrices split as asked), the Gram iteration, fp16-safe momentum, MoE experts one at a time, the
Newton-Schulz precision following the hardware, role routing on a real megatron-core GPT, and the
same training under ZeRO-1/2 DP=2 and TP=2 (two gloo processes) as in one process."""
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import TINY, _env, assert_same_run, error_lines, layouts, read_metrics, run_metrics, run_trainer
from megatron_ext.optimizers.common.matrix_blocks import MatrixBlocks
from megatron_ext.optimizers.muon import Muon, newton_schulz, ns_dtype_for

A, B, C = 3.4445, -4.7750, 2.0315


def reference_ns(g, steps=5):
    """Keller Jordan's quintic Newton-Schulz, written out once per matrix, in fp32."""
    x = g.clone()
    if g.shape[0] > g.shape[1]:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        a = x @ x.T
        x = A * x + (B * a + C * a @ a) @ x
    return x.T if g.shape[0] > g.shape[1] else x


def test_newton_schulz_batched_matches_reference_and_orthogonalises():
    torch.manual_seed(0)
    gs = torch.randn(3, 16, 8)
    out = newton_schulz(gs, dtype=torch.float32)
    for k in range(3):
        torch.testing.assert_close(out[k], reference_ns(gs[k]), rtol=1e-5, atol=1e-6)
        s = torch.linalg.svdvals(out[k])
        assert s.min() > 0.5 and s.max() < 1.3  # NS5 pushes every singular value towards 1
    bf16 = newton_schulz(gs, dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32 and (bf16 - out).abs().max() < 0.05


@pytest.mark.parametrize("scaling", ["moonlight", "keller"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_one_step_equals_the_published_update(scaling, nesterov):
    torch.manual_seed(1)
    w_tall, w_wide, bias = torch.randn(12, 6), torch.randn(6, 12), torch.randn(6)
    params = [torch.nn.Parameter(t.clone()) for t in (w_tall, w_wide, bias)]
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    lr, wd, beta = 0.02, 0.1, 0.95
    groups = [{"params": params[:2], "use_matrix": True}, {"params": params[2:], "use_matrix": False}]
    opt = Muon(groups, lr=lr, weight_decay=wd, momentum=beta, nesterov=nesterov, ns_dtype=torch.float32,
               scaling=scaling, adam_betas=(0.9, 0.95), adam_eps=1e-8)
    opt.step()
    for w, g, p in zip((w_tall, w_wide), grads[:2], params[:2]):
        m = (1 - beta) * g
        u = (1 - beta) * g + beta * m if nesterov else m
        rows, cols = g.shape
        scale = 0.2 * math.sqrt(max(rows, cols)) if scaling == "moonlight" else math.sqrt(max(1, rows / cols))
        expected = w * (1 - lr * wd) - lr * scale * reference_ns(u)
        torch.testing.assert_close(p.data, expected, rtol=1e-5, atol=1e-6)
    # AdamW part, first step: m_hat = g, v_hat = g^2
    g = grads[2]
    expected = bias * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)
    torch.testing.assert_close(params[2].data, expected, rtol=1e-5, atol=1e-6)
    assert set(opt.state[params[0]]) == {"exp_avg"}  # momentum, named for universal conversion


def test_roles_route_hidden_matrices_to_muon_on_a_real_gpt():
    code = """
import json
from megatron_ext.plan import parse_args
from megatron_ext.platform import init_distributed
from megatron.core import parallel_state as ps
from megatron_ext.training.trainer import set_seeds
from megatron_ext.models.gpt import build_model
from megatron_ext.optimizers import OPTIMIZERS
from megatron_ext.optimizers.common.param_groups import build_param_groups
args = parse_args('--mock-data --train-iters 1 --optimizer muon --muon-lr-scale 2'.split())
init_distributed(); ps.initialize_model_parallel(); set_seeds(1)
model = build_model(args, 1000)
opt = OPTIMIZERS.get('muon').obj(build_param_groups(model), args)
print(json.dumps([[g['use_matrix'], g['lr_mult'], g['param_names']] for g in opt.param_groups]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True)
    groups = json.loads(out.stdout.strip().splitlines()[-1])
    muon = [n for use, _, names in groups if use for n in names]
    adamw = [n for use, _, names in groups if not use for n in names]
    assert muon and all(any(k in n for k in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")) for n in muon)
    assert len(muon) == 2 * 4  # 2 layers x (qkv, proj, fc1, fc2)
    assert any("word_embeddings" in n for n in adamw) and any("output_layer" in n for n in adamw)
    assert any("layernorm" in n for n in adamw)
    assert all(mult == 2.0 for use, mult, _ in groups if use)
    assert all(mult == 1.0 for use, mult, _ in groups if not use)


STEPS = TINY + ["--mock-data", "--train-iters", "4", "--global-batch-size", "4", "--lr", "1e-2",
                "--optimizer", "muon", "--muon-ns-dtype", "fp32", "--num-key-value-heads", "2"]
SPLIT_ALL = ["--muon-per-head", "--muon-split-swiglu", "--muon-ns-method", "gram"]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    path = tmp_path_factory.mktemp("muon1") / "m.jsonl"
    run_trainer(STEPS + ["--micro-batch-size", "4", "--zero-stage", "0", "--metrics-file", str(path)])
    return read_metrics(path)


@pytest.fixture(scope="module")
def single_process_split_all(tmp_path_factory):
    path = tmp_path_factory.mktemp("muon1s") / "m.jsonl"
    run_trainer(STEPS + SPLIT_ALL + ["--micro-batch-size", "4", "--zero-stage", "0", "--metrics-file", str(path)])
    return read_metrics(path)


@pytest.mark.slow
def test_tp2_splits_heads_and_swiglu_like_one_process(tmp_path, single_process_split_all):
    """Under TP=2 each rank holds whole query groups of QKV and [gate_r; up_r] of fc1: the gathered
    matrices must be split into the same heads and gate/up blocks as in one process."""
    m, _ = run_metrics(STEPS + SPLIT_ALL + ["--tensor-model-parallel-size", "2", "--micro-batch-size", "4"],
                       tmp_path / "m.jsonl", nproc=2)
    assert_same_run(m, single_process_split_all, (1, 2, 3, 4), rel=1e-5)


@pytest.mark.parametrize("name, extra, nproc", layouts("zero1", "dp2-zero0", "dp2-zero1", "dp2-zero2", "tp2"))
def test_engine_settings_reproduce_the_single_process_muon(tmp_path, single_process, name, extra, nproc):
    """With 2 data-parallel ranks each rank orthogonalises only the matrices it owns, then they swap."""
    m, _ = run_metrics(STEPS + extra, tmp_path / "m.jsonl", nproc)
    assert_same_run(m, single_process, (1, 2, 3, 4), rel=1e-5, name=name)


def test_muon_is_not_adamw_and_bf16_trains(tmp_path, single_process):
    adamw = tmp_path / "a.jsonl"
    run_trainer(TINY + ["--mock-data", "--train-iters", "4", "--global-batch-size", "4", "--lr", "1e-2",
                        "--micro-batch-size", "4", "--metrics-file", str(adamw)])
    assert abs(read_metrics(adamw)[4]["lm_loss"] - single_process[4]["lm_loss"]) > 1e-2
    bf16 = tmp_path / "b.jsonl"
    run_trainer(STEPS + ["--micro-batch-size", "4", "--zero-stage", "1", "--bf16", "--metrics-file", str(bf16)])
    assert read_metrics(bf16)[4]["lm_loss"] == pytest.approx(single_process[4]["lm_loss"], abs=5e-3)


def test_resume_is_exact(tmp_path):
    ck = tmp_path / "ck"
    common = STEPS + ["--micro-batch-size", "4", "--zero-stage", "1", "--save", str(ck), "--load", str(ck),
                      "--save-interval", "2"]
    run_trainer(common + ["--exit-interval", "2"])
    run_trainer(common)
    full = tmp_path / "full.jsonl"
    run_trainer(STEPS + ["--micro-batch-size", "4", "--zero-stage", "1", "--metrics-file", str(full)])
    a, b = read_metrics(full), read_metrics(ck / "metrics.jsonl")
    assert [a[i]["lm_loss"] for i in (3, 4)] == [b[i]["lm_loss"] for i in (3, 4)]


@pytest.mark.parametrize("extra, message", [
    (["--zero-stage", "3"], "--optimizer muon supports --zero-stage 0, 1 and 2, not 3"),
    (["--zero-stage", "1", "--cpu-optimizer"], "--optimizer muon does not support --cpu-optimizer"),
    (["--muon-momentum", "1.5"], "--muon-momentum must be in [0, 1)"),
    (["--muon-ns-coefficients", "1,2"], "expected three comma-separated numbers"),
    (["--muon-per-head", "--no-muon-split-qkv"], "--muon-per-head splits the fused QKV matrix, but --no-muon-split-qkv"),
    (["--muon-ns-method", "cubic"], "invalid choice: 'cubic'"),
])
def test_unsupported_settings_and_bad_values_are_one_line(extra, message):
    proc = run_trainer(STEPS + ["--micro-batch-size", "4"] + extra, check=False)
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def test_newton_schulz_work_is_split_evenly_and_identically_on_every_rank():
    from megatron_ext.optimizers.common.hybrid import assign_owners, matrix_cost

    shapes = [(768, 256), (256, 256), (1536, 256), (256, 768)] * 4
    costs = [matrix_cost(s) for s in shapes]
    owners = assign_owners(costs, 2)
    assert owners == assign_owners(costs, 2)
    load = [sum(c for c, r in zip(costs, owners) if r == rank) for rank in (0, 1)]
    assert abs(load[0] - load[1]) <= max(costs) and min(load) > 0
    assert assign_owners(costs, 1) == [0] * len(shapes)
    assert sorted(set(assign_owners(costs[:1], 4))) == [0]  # more ranks than matrices: rank 0 owns it


def test_gram_iteration_is_the_standard_polynomial():
    """Gram Newton-Schulz iterates on X X^T; in exact arithmetic it is the standard iteration."""
    torch.manual_seed(2)
    for shape in ((3, 8, 40), (40, 8), (16, 16)):  # wide (batched), tall, square (standard path)
        g = torch.randn(shape, dtype=torch.float64)
        standard = newton_schulz(g, dtype=torch.float64)
        torch.testing.assert_close(newton_schulz(g, dtype=torch.float64, method="gram"), standard,
                                   rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(newton_schulz(g.float(), dtype=torch.float32, method="gram"), standard.float(),
                                   rtol=1e-4, atol=1e-4)
        low = newton_schulz(g.float(), dtype=torch.bfloat16, method="gram")
        assert (low - standard.float()).abs().max() < 0.05


def _blocks_reference(u, blocks, scaling="moonlight"):
    """Direct evaluation: each block of u orthogonalised (reference_ns) and scaled by its own shape."""
    out = torch.empty_like(u)
    for rows_index, block in blocks:
        r, c = block.shape
        scale = 0.2 * math.sqrt(max(r, c)) if scaling == "moonlight" else math.sqrt(max(1, r / c))
        out[rows_index] = scale * reference_ns(block)
    return out


def _qkv_rows(groups, per_group, d):
    """Row indices of Q (all groups), K and V in megatron-core's fused QKV layout."""
    stride = (per_group + 2) * d
    q = [g * stride + i for g in range(groups) for i in range(per_group * d)]
    k = [g * stride + per_group * d + i for g in range(groups) for i in range(d)]
    v = [g * stride + (per_group + 1) * d + i for g in range(groups) for i in range(d)]
    return q, k, v


@pytest.mark.parametrize("kind", ["whole", "qkv", "heads", "gate_up"])
def test_one_step_orthogonalises_each_block_of_a_fused_matrix(kind):
    groups, per_group, d, cols = 2, 2, 4, 12
    torch.manual_seed(3)
    rows = groups * (per_group + 2) * d if kind != "gate_up" else 2 * 10
    w = torch.randn(rows, cols)
    p = torch.nn.Parameter(w.clone())
    g = torch.randn_like(w)
    p.grad = g.clone()
    blocks = MatrixBlocks(kind, groups=groups, heads_per_group=per_group, head_dim=d)
    lr, beta = 0.1, 0.95
    opt = Muon([{"params": [p], "use_matrix": True}], lr=lr, weight_decay=0.0, momentum=beta, ns_dtype=torch.float32,
               blocks={id(p): blocks})
    opt.step()
    u = (1 - beta) * g + beta * (1 - beta) * g
    if kind == "whole":
        parts = [(slice(None), u)]
    elif kind == "gate_up":
        parts = [(slice(0, 10), u[:10]), (slice(10, 20), u[10:])]
    elif kind == "qkv":
        parts = [(idx, u[idx]) for idx in _qkv_rows(groups, per_group, d)]
    else:
        parts = [(slice(h * d, (h + 1) * d), u[h * d:(h + 1) * d]) for h in range(rows // d)]
    torch.testing.assert_close(p.data, w - lr * _blocks_reference(u, parts), rtol=1e-5, atol=1e-6)


def test_gate_up_of_gathered_tensor_parallel_shards_are_the_single_process_gate_and_up():
    gate, up = torch.randn(8, 5), torch.randn(8, 5)
    gathered = torch.cat([gate[:4], up[:4], gate[4:], up[4:]])  # rank r holds [gate_r; up_r] (stride 2)
    blocks = MatrixBlocks("gate_up")
    parts = blocks.split(gathered, tp_shards=2)
    assert torch.equal(parts[0][0], gate) and torch.equal(parts[1][0], up)
    assert torch.equal(blocks.merge(parts, tp_shards=2), gathered)
    qkv = MatrixBlocks("qkv", groups=2, heads_per_group=2, head_dim=3)
    fused = torch.randn(24, 5)
    assert torch.equal(qkv.merge(qkv.split(fused)), fused)
    with pytest.raises(RuntimeError, match="does not have 2 groups"):
        qkv.split(torch.randn(20, 5))


def test_fp16_overflow_leaves_the_momentum_as_it_was():
    torch.manual_seed(4)
    results = {}
    for guarded in (True, False):
        p = torch.nn.Parameter(torch.randn(6, 4))
        opt = Muon([{"params": [p], "use_matrix": True}], lr=0.01, ns_dtype=torch.float32, finite_momentum=guarded)
        p.grad = torch.randn(6, 4)
        opt.step()
        before = opt.state[p]["exp_avg"].clone()
        p.grad = torch.full((6, 4), float("inf"))  # an fp16 step whose gradients overflowed
        opt.step()
        results[guarded] = (before, opt.state[p]["exp_avg"])
    before, after = results[True]
    assert torch.equal(after, before)  # unchanged, finite: the next good step continues from it
    assert not torch.isfinite(results[False][1]).all()  # what happens without the guard


def test_moe_experts_are_orthogonalised_one_expert_at_a_time(mcore):
    from megatron_ext.models.gpt import build_model
    from megatron_ext.optimizers import OPTIMIZERS
    from megatron_ext.optimizers.common.param_groups import build_param_groups
    from megatron_ext.plan import parse_args

    args = parse_args(TINY + ["--mock-data", "--train-iters", "1", "--optimizer", "muon", "--num-experts", "2",
                              "--muon-ns-dtype", "fp32", "--muon-split-swiglu", "--lr", "0.1", "--weight-decay", "0"],
                      world_size=1)
    model = build_model(args, 1000)
    opt = OPTIMIZERS.get("muon").build(build_param_groups(model), args)
    torch.manual_seed(5)
    experts = {n: p for n, p in model.named_parameters() if ".experts." in n}
    assert len(experts) == 2 * 2 * 2  # 2 layers x 2 experts x (fc1, fc2): separate matrices
    before = {n: p.detach().clone() for n, p in experts.items()}
    grads = {}
    for n, p in model.named_parameters():
        p.grad = grads[n] = torch.randn_like(p)
    opt.step()
    for n, p in experts.items():
        u = 0.05 * grads[n] * (1 + 0.95)
        if n.endswith("linear_fc1.weight"):  # SwiGLU [gate; up], split as asked
            half = u.size(0) // 2
            expected = _blocks_reference(u, [(slice(0, half), u[:half]), (slice(half, None), u[half:])])
        else:
            expected = _blocks_reference(u, [(slice(None), u)])
        torch.testing.assert_close(p.data, before[n] - 0.1 * expected, rtol=1e-5, atol=1e-6)


def test_newton_schulz_precision_follows_the_hardware(monkeypatch):
    from megatron_ext.plan import parse_plan

    native = torch.cpu.get_capabilities().get("avx512_bf16") or torch.cpu.get_capabilities().get("amx_bf16")
    dtype, why = ns_dtype_for("auto")
    assert dtype == (torch.bfloat16 if native else torch.float32) and why.startswith("auto: cpu")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    assert ns_dtype_for("auto") == (torch.bfloat16, "auto: cpu with avx512_bf16")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True})
    assert ns_dtype_for("auto")[0] == torch.float32
    assert ns_dtype_for("bf16") == (torch.bfloat16, "requested")
    monkeypatch.undo()
    row = dict(parse_plan(TINY + ["--mock-data", "--train-iters", "1", "--optimizer", "muon"], world_size=1).rows())
    expected = "bfloat16" if native else "float32"
    assert row["optimizer"].startswith(f"muon (Newton-Schulz in {expected} (auto: cpu") and "QKV: Q, K, V" in row["optimizer"]
