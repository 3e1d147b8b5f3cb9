"""Mixture of experts and multi-token prediction on the real trainer (megatron-core MoE/MTP,
DeepSpeed engine, CPU): both train with their losses logged next to the pure LM loss, expert load
adds up to tokens x top-k, data parallel and resume reproduce the single run, bad values fail in
one line, and the launcher maps its variables."""
import json
import subprocess
import sys

import pytest

from conftest import TINY, _env, error_lines, plan_error, read_metrics, run_trainer
from megatron_ext.plan import parse_args

MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "1e-2"]
MTP = ["--mtp-num-layers", "1"]
# 2 micro-batches of 2 per iteration: accumulated in one process, one each on 2 data-parallel ranks.
BOTH = TINY + MOE + MTP + ["--mock-data", "--global-batch-size", "4", "--zero-stage", "1"]
TOKENS_X_TOPK = 4 * 64 * 2  # samples x sequence length x top-k, per MoE layer and iteration


@pytest.mark.parametrize("name, extra", [
    # full recomputation runs each layer twice: the expert load must still count every token once
    ("moe", MOE + ["--zero-stage", "0", "--recompute-activations"]),
    ("mtp", MTP + ["--zero-stage", "2"]),
])
def test_moe_and_mtp_train_with_their_losses_logged(tmp_path, name, extra):
    proc = run_trainer(TINY + extra + ["--mock-data", "--train-iters", "10", "--micro-batch-size", "4", "--lr", "3e-3",
                                       "--metrics-file", str(tmp_path / "m.jsonl")])
    m = read_metrics(tmp_path / "m.jsonl")
    assert sorted(m) == list(range(1, 11))
    first = sum(m[i]["lm_loss"] for i in (1, 2, 3)) / 3
    last = sum(m[i]["lm_loss"] for i in (8, 9, 10)) / 3
    assert last < first - 0.1, (first, last)
    if name == "moe":
        assert "MoE / MTP             : MoE 4 experts top-2 in 2/2 layers (aux loss coeff 0.01)" in proc.stdout
        assert "load_balancing_loss=" in proc.stdout and "expert_load_max/mean=" in proc.stdout
        for r in m.values():
            assert 0.9 < r["moe_aux_loss"] < 2.0  # 1.0 = perfectly balanced (Switch loss, unweighted)
            assert sorted(r["expert_load"]) == ["decoder.layers.0", "decoder.layers.1"]
            assert all(len(load) == 4 and sum(load) == TOKENS_X_TOPK for load in r["expert_load"].values())
            assert "mtp_loss" not in r
    else:
        assert "mtp_1 loss=" in proc.stdout and "load_balancing_loss=" not in proc.stdout
        for r in m.values():
            assert 0 < r["mtp_loss"] < 10 and r["mtp_losses"] == [r["mtp_loss"]]
            assert "moe_aux_loss" not in r and "expert_load" not in r
        assert m[10]["mtp_loss"] < m[1]["mtp_loss"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """MoE + MTP, one process, 2 accumulated micro-batches per iteration."""
    path = tmp_path_factory.mktemp("moe_mtp_dp1") / "m.jsonl"
    run_trainer(BOTH + ["--train-iters", "4", "--metrics-file", str(path)])
    return read_metrics(path)


def _assert_same_run(a, b, exact):
    """Same losses, gradient norms and expert loads: bit-identical, or to summation-order rounding."""
    for it in sorted(a):
        for key, rel in (("lm_loss", 1e-5), ("moe_aux_loss", 1e-5), ("mtp_loss", 1e-5), ("grad_norm", 1e-4)):
            expected = a[it][key] if exact else pytest.approx(a[it][key], rel=rel, abs=1e-6)
            assert b[it][key] == expected, (it, key)
        assert b[it]["expert_load"] == a[it]["expert_load"], it


def test_logged_lm_loss_is_pure_and_the_auxiliary_losses_are_trained(tmp_path, reference):
    """Heavier aux/MTP weights: the same first forward, so the same logged LM, aux and MTP losses at
    iteration 1 (neither weight is in the logged LM loss), but other gradients and a different iteration 2."""
    run_trainer(BOTH + ["--train-iters", "2", "--moe-aux-loss-coeff", "1", "--mtp-loss-scaling-factor", "1",
                        "--metrics-file", str(tmp_path / "m.jsonl")])
    heavy = read_metrics(tmp_path / "m.jsonl")
    for key in ("lm_loss", "moe_aux_loss", "mtp_loss", "expert_load"):
        assert heavy[1][key] == reference[1][key], key
    assert abs(heavy[1]["grad_norm"] - reference[1]["grad_norm"]) > 1e-3 * reference[1]["grad_norm"]
    assert heavy[2]["lm_loss"] != pytest.approx(reference[2]["lm_loss"], rel=1e-5)


@pytest.mark.slow
def test_two_data_parallel_ranks_match_the_accumulated_single_process(tmp_path, reference):
    """Each rank routes its own micro-batch, as the single process does micro-batch by micro-batch;
    the aux and MTP gradients must follow the LM loss's 1/accumulation scale for this to hold."""
    proc = run_trainer(BOTH + ["--train-iters", "4", "--metrics-file", str(tmp_path / "m.jsonl")], nproc=2)
    assert "data-parallel size    : 2" in proc.stdout
    m = read_metrics(tmp_path / "m.jsonl")
    assert sorted(m) == [1, 2, 3, 4]
    _assert_same_run(reference, m, exact=False)
    assert all(sum(load) == TOKENS_X_TOPK for r in m.values() for load in r["expert_load"].values())


def test_resume_is_exact(tmp_path, reference):
    ck = tmp_path / "ck"
    common = BOTH + ["--train-iters", "4", "--save", str(ck), "--load", str(ck), "--save-interval", "2"]
    run_trainer(common + ["--exit-interval", "2"])
    second = run_trainer(common)
    assert "start iteration       : 2" in second.stdout
    m = read_metrics(ck / "metrics.jsonl")
    assert sorted(m) == [1, 2, 3, 4]
    _assert_same_run(reference, m, exact=True)


def test_model_layout_roles_and_residual_branches():
    """First-k dense layers, MTP with MoE, the router's optimizer role, CompleteP's residual hooks."""
    code = """
import json
from megatron_ext.plan import parse_args
from megatron_ext.platform import init_distributed
from megatron.core import parallel_state as ps
from megatron_ext.models.gpt import build_model
from megatron_ext.optimizers import OPTIMIZERS
from megatron_ext.optimizers.common.param_groups import build_param_groups
args = parse_args('--mock-data --train-iters 1 --num-layers 3 --num-experts 4 --moe-first-k-dense 1 '
                  '--mtp-num-layers 1 --optimizer muon --parametrization completep --depth-base 1'.split())
init_distributed(); ps.initialize_model_parallel()
model = build_model(args, 1000)
opt = OPTIMIZERS.get('muon').obj(build_param_groups(model), args)
print(json.dumps(dict(
    mlp=[type(layer.mlp).__name__ for layer in model.decoder.layers],
    mtp_mlp=type(model.mtp.layers[0].transformer_layer.mlp).__name__,
    hooks=len(model.parametrization_hooks), config_freq=model.config.moe_layer_freq,
    groups={g['role']: [g['use_matrix'], g['param_names']] for g in opt.param_groups})))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["mlp"] == ["MLP", "MoELayer", "MoELayer"] and r["config_freq"] == [0, 1, 1]
    assert r["mtp_mlp"] == "MoELayer"  # the MTP layer repeats the last decoder layer
    assert r["hooks"] == 2 * (3 + 1)  # attention + MLP/MoE of 3 decoder layers and 1 MTP layer
    use_matrix, routers = r["groups"]["router"]
    assert not use_matrix and len(routers) == 3 and all(n.endswith("mlp.router.weight") for n in routers)
    use_matrix, hidden = r["groups"]["hidden"]
    assert use_matrix and sum(".mlp.experts.local_experts." in n for n in hidden) == 3 * 4 * 2


BASE = ["--mock-data", "--train-iters", "10"]


@pytest.mark.parametrize("argv, world, message", [
    (["--num-experts", "4", "--moe-router-topk", "5"], 1, "--moe-router-topk 5 is larger than --num-experts 4"),
    (["--moe-router-topk", "2"], 1, "--moe-router-topk needs --num-experts"),
    (["--mtp-loss-coeff", "0.3"], 1, "--mtp-loss-scaling-factor needs --mtp-num-layers"),
    (["--num-experts", "4", "--tensor-model-parallel-size", "2"], 2, "needs sequence parallelism"),
    (["--num-experts", "3", "--moe-router-topk", "1", "--moe-router-pre-softmax", "--expert-model-parallel-size", "2"], 2,
     "--expert-model-parallel-size 2 does not divide --num-experts 3"),
    (["--num-experts", "4", "--moe-router-topk", "1"], 1, "--moe-router-topk 1 with softmax scores needs --moe-router-pre-softmax"),
    (["--num-experts", "4", "--moe-layer-freq", "[0,1,1]"], 1, "--moe-layer-freq has 3 entries but --num-layers is 2"),
    (["--num-experts", "4", "--moe-layer-freq", "[0,2]"], 1, "--moe-layer-freq: "),
    (["--num-experts", "4", "--moe-layer-freq", "__import__('os')"], 1, "--moe-layer-freq: "),
    (["--num-experts", "4", "--moe-first-k-dense", "2"], 1, "--moe-first-k-dense 2 leaves no MoE layer"),
    (["--num-experts", "4", "--moe-router-dtype", "fp16"], 1, "--moe-router-dtype: invalid choice 'fp16'"),
    (["--num-experts", "4", "--moe-router-load-balancing-type", "sinkhorn", "--moe-aux-loss-coeff", "0.01"], 1,
     "--moe-aux-loss-coeff 0.01 has no effect with --moe-router-load-balancing-type sinkhorn"),
])
def test_bad_values_are_one_line_errors(capsys, argv, world, message):
    assert message in plan_error(capsys, BASE + argv, world)


def test_flags_spellings_and_defaults():
    a = parse_args(BASE + ["--num-layers", "4", "--num-experts", "8", "--moe-layer-freq", "([0]*1+[1]*3)",
                           "--num-mtp-predictor", "2"], world_size=1)
    assert (a.moe_router_topk, a.moe_aux_loss_coeff, a.moe_router_score_function) == (2, 0.0, "softmax")
    assert a.moe_ffn_hidden_size == a.ffn_hidden_size and a.moe_layer_freq == [0, 1, 1, 1]
    assert (a.mtp_num_layers, a.mtp_loss_scaling_factor) == (2, 0.1)
    b = parse_args(BASE + ["--num-layers", "4", "--num-experts", "8", "--moe-layer-freq", "2", "--first-k-dense-replace",
                           "1"], world_size=1)
    from megatron_ext.models.features.moe_mtp import moe_layer_pattern

    assert moe_layer_pattern(b) == [0, 0, 1, 0]
    dense = parse_args(BASE, world_size=1)
    assert dense.num_experts is None and dense.mtp_num_layers is None and dense.moe_router_topk is None


def test_bad_value_stops_the_trainer_before_any_work(tmp_path):
    proc = run_trainer(TINY + BASE + ["--num-experts", "4", "--moe-router-topk", "8", "--save", str(tmp_path / "ck")],
                       check=False)
    assert proc.returncode == 2 and "iteration=" not in proc.stdout
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "--moe-router-topk 8 is larger than --num-experts 4" in lines[0], lines
    assert not (tmp_path / "ck").exists()


def test_launcher_variables_map_to_the_flags(tmp_path):
    from test_launcher import launch, resolved

    env = dict(NLAYERS="3", NUM_EXPERTS="8", MOE_TOPK="2", MOE_FFN_HIDDEN_SIZE="96", MOE_AUX_LOSS_COEFF="0.01",
               MOE_Z_LOSS_COEFF="0.001", MOE_ROUTER_DTYPE="fp64", MOE_SCORE_FUNCTION="sigmoid",
               MOE_TOPK_SCALING_FACTOR="2.5", MOE_FIRST_K_DENSE="1", MOE_LOAD_BALANCING_TYPE="seq_aux_loss",
               NUM_MTP_PREDICTOR="1", MTP_LOSS_COEFF="0.3", SAVE=str(tmp_path / "run"))
    args, _, settings = resolved(launch(env))
    assert (args.num_experts, args.moe_router_topk, args.moe_ffn_hidden_size) == (8, 2, 96)
    assert (args.moe_aux_loss_coeff, args.moe_z_loss_coeff, args.moe_router_dtype) == (0.01, 0.001, "fp64")
    assert (args.moe_router_score_function, args.moe_router_topk_scaling_factor) == ("sigmoid", 2.5)
    assert args.moe_first_k_dense == 1 and args.moe_router_load_balancing_type == "seq_aux_loss"
    assert (args.mtp_num_layers, args.mtp_loss_scaling_factor) == (1, 0.3)
    assert settings["NUM_EXPERTS"] == "8" and settings["MTP_NUM_LAYERS"] == "1"
    default = resolved(launch(dict(NUM_EXPERTS="4", MTP_NUM_LAYERS="1")))[2]["SAVE"]
    assert default.endswith("-moe4x2-mtp1")  # another architecture, another default run directory
    bad = launch(dict(NUM_EXPERTS="4", MOE_ROUTER_DTYPE="fp16", SAVE=str(tmp_path / "run")), dry_run=False)
    assert bad.returncode == 2
    lines = error_lines(bad.stderr)
    assert len(lines) == 1 and "MOE_ROUTER_DTYPE='fp16'" in lines[0], lines
