"""Initialisation and parametrizations on the real megatron-core model: measured init std per
family, the multipliers each parametrization puts on each param group (AdamW and Muon), the
residual/logit multipliers in the forward pass, the coordinate check, flags, aliases and errors."""
import json
import math
import subprocess
import sys

import pytest

from conftest import TINY, _env, error_lines, read_metrics, run_trainer

MODEL = "--num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 32 --mock-data --train-iters 1"

# Builds the model for each flag string and reports what it got: measured stds, param groups,
# forward multipliers. One process for all scenarios (start-up dominates).
PROBE = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import torch
from megatron.core import parallel_state as ps
from megatron_ext.plan import parse_args
from megatron_ext.models.gpt import build_model
from megatron_ext.optimizers import build_optimizer
from megatron_ext.parametrizations import parametrization_for
from megatron_ext.parametrizations.common.apply import residual_branches
from megatron_ext.parametrizations.common.report import init_report_rows
from megatron_ext.platform import init_distributed
from megatron_ext.training.trainer import set_seeds

init_distributed(); ps.initialize_model_parallel()
out = []
for flags in json.loads(sys.argv[1]):
    args = parse_args(flags.split(), world_size=1)
    set_seeds(1)
    par = parametrization_for(args)
    model = build_model(args, 1000, par)
    opt = build_optimizer(model, args, par)
    groups = {g["role"]: dict(lr_mult=g["lr_mult"], wd_mult=g["wd_mult"], eps=g.get("eps"),
                              matrix=g.get("use_matrix")) for g in opt.param_groups}
    # forward: raw vs scaled output of the first attention branch and of the output layer
    seen = {}
    def grab(key):
        def hook(module, inputs, output):
            seen[key] = output[0].detach().clone()
        return hook
    attn = residual_branches(model)[0]
    attn.register_forward_hook(grab("attn_raw"), prepend=True)
    attn.register_forward_hook(grab("attn_scaled"))
    model.output_layer.register_forward_hook(grab("logits_raw"), prepend=True)
    model.output_layer.register_forward_hook(grab("logits_scaled"))
    pre_mlp = {}
    model.decoder.layers[0].pre_mlp_layernorm.register_forward_pre_hook(
        lambda m, inp: pre_mlp.__setitem__("x", inp[0].detach().clone()))
    embedded = {}
    model.embedding.register_forward_hook(lambda m, i, o: embedded.__setitem__("x", o.detach().clone()))
    tokens = torch.randint(0, 1000, (2, args.seq_length))
    pos = torch.arange(args.seq_length).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        model(input_ids=tokens, position_ids=pos, attention_mask=None)
    residual_ok = torch.allclose(pre_mlp["x"], embedded["x"] + seen["attn_scaled"], atol=1e-6)
    out.append(dict(
        stds=[list(r) for r in init_report_rows(model, par)],
        groups=groups,
        attn_ratio=float((seen["attn_scaled"] / seen["attn_raw"]).median()),
        logit_ratio=float((seen["logits_scaled"] / seen["logits_raw"]).median()),
        residual_in_stream=bool(residual_ok),
        softmax_scale=model.decoder.layers[0].self_attention.core_attention.softmax_scale,
    ))
print(json.dumps(out))
"""

SCENARIOS = {
    "sp": MODEL,
    "sp-auto": MODEL + " --init-method-std auto --adjust-word-embedding-init --output-layer-init-std 0.01",
    "sp-unscaled": MODEL + " --init-method-std 0.05 --no-scaled-output-projection-init",
    "mup": MODEL + " --parametrization mup --mup-base-hidden 32",
    "mup-muon": MODEL + " --parametrization mup --mup-base-hidden 32 --optimizer muon",
    "mup-muon-keller": MODEL + " --enable-mup --mup-base-width 32 --optimizer muon --muon-scaling keller",
    "completep": MODEL + " --parametrization completep --mup-base-hidden 32 --depth-base 2",
    "depth-mup": MODEL + " --enable-depth-scale --mup-base-hidden 32 --depth-base 2 --depth-alpha 0.5",
    "completep-muon": MODEL + " --enable-mup --enable-depth-scale --mup-base-hidden 32 --depth-base 2 --optimizer muon",
}


@pytest.fixture(scope="module")
def probe():
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(list(SCENARIOS.values()))],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(zip(SCENARIOS, json.loads(proc.stdout.strip().splitlines()[-1])))


def _stds(result):
    return {family: (want, got) for family, _, want, got in result["stds"]}


@pytest.mark.parametrize("name, expected", [
    ("sp", dict(embedding=0.02, hidden=0.02, output_projection=0.02 / math.sqrt(8), output_layer=0.02)),
    ("sp-auto", dict(embedding=math.sqrt(2 / 5), hidden=math.sqrt(2 / (5 * 128)),
                     output_projection=math.sqrt(2 / (5 * 128)) / math.sqrt(8), output_layer=0.01)),
    ("sp-unscaled", dict(embedding=0.05, hidden=0.05, output_projection=0.05, output_layer=0.05)),
    # muP: hidden x m_N^-1/2 (m_N = 4); embedding and output layer unchanged
    ("mup", dict(embedding=0.02, hidden=0.01, output_projection=0.01 / math.sqrt(8), output_layer=0.02)),
    # CompleteP drops the 1/sqrt(2L) output-projection scaling
    ("completep", dict(embedding=0.02, hidden=0.01, output_projection=0.01, output_layer=0.02)),
])
def test_measured_init_std_of_every_family_matches_the_request(probe, name, expected):
    stds = _stds(probe[name])
    assert set(stds) == set(expected)
    for family, value in expected.items():
        want, got = stds[family]
        assert want == pytest.approx(value, rel=1e-9), (family, want)
        assert got == pytest.approx(value, rel=0.03), (family, got)  # sampled: ~1% noise at these sizes


M_N, M_L = 4.0, 2.0  # 128 / 32 and 4 / 2


@pytest.mark.parametrize("name, lr, wd, eps", [
    # Adam-like under muP: hidden LR / m_N, weight decay x m_N; the rest unchanged
    ("mup", dict(hidden=1 / M_N, embedding=1, output=1, norm=1, final_norm=1),
     dict(hidden=M_N, embedding=1, output=1, norm=0, final_norm=0), dict(hidden=1e-8, norm=1e-8)),
    # Muon (Moonlight scaling grows like sqrt(width)): hidden LR m_N^-1/2, not Adam's 1/m_N on top
    ("mup-muon", dict(hidden=M_N ** -0.5, embedding=1, output=1, norm=1),
     dict(hidden=M_N ** 0.5, embedding=1, output=1, norm=0), dict(norm=1e-8)),
    # Muon with Keller's spectral scaling is width-independent already: no LR factor
    ("mup-muon-keller", dict(hidden=1, embedding=1, output=1, norm=1), dict(hidden=1), dict(norm=1e-8)),
    # CompleteP, alpha 1: depth factor m_L^0 on LR; eps of residual-block groups x m_N^-1 m_L^-1
    ("completep", dict(hidden=1 / M_N, norm=1, final_norm=1, embedding=1, output=1),
     dict(hidden=M_N, embedding=1, norm=0), dict(hidden=1e-8 / (M_N * M_L), norm=1e-8 / (M_N * M_L),
                                                 final_norm=1e-8, embedding=1e-8, output=1e-8)),
    # alpha 0.5 (depth-muP): LR of hidden, norms, biases x m_L^-1/2; eps x m_N^-1 m_L^-1/2
    ("depth-mup", dict(hidden=M_L ** -0.5 / M_N, norm=M_L ** -0.5, final_norm=1, embedding=1, output=1),
     dict(hidden=M_N), dict(hidden=1e-8 / (M_N * M_L ** 0.5), final_norm=1e-8)),
    ("completep-muon", dict(hidden=M_N ** -0.5, norm=1, embedding=1), dict(hidden=M_N ** 0.5),
     dict(norm=1e-8 / (M_N * M_L), embedding=1e-8)),
    ("sp", dict(hidden=1, embedding=1, output=1, norm=1, final_norm=1), dict(hidden=1, norm=0), dict(hidden=1e-8)),
])
def test_group_multipliers_follow_the_published_rules(probe, name, lr, wd, eps):
    groups = probe[name]["groups"]
    for role, value in lr.items():
        assert groups[role]["lr_mult"] == pytest.approx(value, rel=1e-12), (role, "lr")
    for role, value in wd.items():
        assert groups[role]["wd_mult"] == pytest.approx(value, rel=1e-12), (role, "wd")
    for role, value in eps.items():
        assert groups[role]["eps"] == pytest.approx(value, rel=1e-12), (role, "eps")
    if "muon" in name:
        assert groups["hidden"]["matrix"] and not groups["norm"]["matrix"]


@pytest.mark.parametrize("name, residual, logits, softmax", [
    ("sp", 1.0, 1.0, 1 / math.sqrt(32)),
    ("mup", 1.0, 1 / M_N, math.sqrt(8) / 32),  # attention 1/d_head, equal to SP at the base width
    ("completep", 1 / M_L, 1 / M_N, math.sqrt(8) / 32),
    ("depth-mup", M_L ** -0.5, 1 / M_N, math.sqrt(8) / 32),
])
def test_residual_and_logit_multipliers_act_in_the_forward_pass(probe, name, residual, logits, softmax):
    r = probe[name]
    assert r["attn_ratio"] == pytest.approx(residual, rel=1e-5)
    assert r["logit_ratio"] == pytest.approx(logits, rel=1e-5)
    assert r["residual_in_stream"]  # the residual stream adds the scaled branch
    assert r["softmax_scale"] == pytest.approx(softmax, rel=1e-9)


def test_init_report_command_prints_requested_and_measured(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.cli", "init-report", *MODEL.split(),
                           "--init-method-std", "auto", "--adjust-word-embedding-init"],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[2:]}
    assert float(rows["embedding"][2]) == pytest.approx(math.sqrt(2 / 5), rel=1e-4)
    assert float(rows["hidden"][3]) == pytest.approx(math.sqrt(2 / (5 * 128)), rel=0.03)


def test_mup_at_its_base_width_trains_exactly_like_sp(tmp_path):
    """Every muP rule is 1 when width == base width: the same losses bit for bit."""
    losses = {}
    for name, extra in (("sp", []), ("mup", ["--parametrization", "mup", "--mup-base-hidden", "64"])):
        path = tmp_path / f"{name}.jsonl"
        run_trainer(TINY + ["--mock-data", "--train-iters", "3", "--metrics-file", str(path)] + extra)
        losses[name] = [r["lm_loss"] for r in read_metrics(path).values()]
    assert losses["sp"] == losses["mup"]


def test_completep_trains_under_deepspeed_zero1(tmp_path):
    path = tmp_path / "m.jsonl"
    proc = run_trainer(TINY + ["--mock-data", "--train-iters", "6", "--lr", "1e-2", "--zero-stage", "1",
                               "--metrics-file", str(path), "--parametrization", "completep",
                               "--mup-base-hidden", "32", "--depth-base", "1"])
    losses = [r["lm_loss"] for r in read_metrics(path).values()]
    assert losses[-1] < losses[0]
    assert "completep" in proc.stdout and "residual branches x0.5" in proc.stdout  # start-up table


@pytest.mark.slow
def test_coord_check_passes_for_mup_and_completep_and_shows_sp_blowing_up(tmp_path):
    out = tmp_path / "cc.json"
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.cli", "coord-check", "--widths", "32,64,128",
                           "--depths", "2,4,8", "--seq-length", "32", "--json", str(out),
                           "--plot", str(tmp_path / "cc.png")],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    runs = {(r["parametrization"], r["axis"]): r for r in json.loads(out.read_text())}
    assert not runs[("sp", "width")]["passed"] and runs[("sp", "width")]["slopes"]["last_layer"] > 0.4
    for key in (("mup", "width"), ("completep", "width"), ("completep", "depth")):
        assert runs[key]["passed"], (key, runs[key]["slopes"])
    assert "PASS" in proc.stdout
    assert (tmp_path / "cc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flags, expected", [
    (["--enable-mup"], "mup"),
    (["--enable-depth-scale"], "completep"),
    (["--enable-depth-scale", "--enable-mup"], "completep"),
    (["--enable-mup", "--enable-depth-scale"], "completep"),
    (["--parametrization", "MuP"], "mup"),
    ([], "sp"),
])
def test_megatron_deepspeed_aliases_select_the_parametrization(flags, expected):
    from megatron_ext.plan import parse_args

    args = parse_args(MODEL.split() + flags, world_size=1)
    assert args.parametrization == expected


@pytest.mark.parametrize("flags, message", [
    (["--parametrization", "mup", "--mup-base-hidden", "256"], "--mup-base-hidden 256 is larger than --hidden-size 128"),
    (["--parametrization", "completep", "--depth-alpha", "1.5"], "--depth-alpha must be in [0, 1]"),
    (["--parametrization", "completep", "--depth-alpha", "-0.1"], "--depth-alpha must be in [0, 1]"),
    (["--parametrization", "completep", "--depth-base", "8"], "--depth-base 8 is larger than --num-layers 4"),
    (["--parametrization", "completep", "--depth-base", "2", "--depth-multiplier", "2"], "give one"),
    (["--mup-base-hidden", "32"], "--mup-base-hidden has no effect with --parametrization sp (it belongs to --parametrization mup)"),
    (["--enable-mup", "--depth-alpha", "0.5"], "--depth-alpha has no effect with --parametrization mup (it belongs to --parametrization completep)"),
    (["--init-method-std", "big"], "invalid number: 'big' (or 'auto')"),
    (["--init-method-std", "-1"], "must be >= 0, got '-1' (or 'auto')"),
    (["--mup-hidden-lr-scale", "0", "--enable-mup"], "must be > 0, got '0'"),
])
def test_invalid_combinations_give_one_clear_line(flags, message):
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.train", *MODEL.split(), *flags],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and message in lines[0], lines


def test_launcher_variables_select_mup_and_completep(tmp_path):
    from conftest import REPO

    def dry(env):
        proc = subprocess.run(["bash", "train_alcf.sh"], capture_output=True, text=True, cwd=REPO, timeout=120,
                              env={**_env(), "DRY_RUN": "1", "HIDDEN": "64", "HEADS": "4", "NLAYERS": "4", **env})
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    out = dry({"MUP_BASE_WIDTH": "32", "INIT_METHOD_STD": "auto"})
    assert "--parametrization mup" in out and "--mup-base-hidden 32" in out and "--init-method-std auto" in out
    out = dry({"MUP_BASE_WIDTH": "32", "DEPTH_BASE": "2"})
    assert "--parametrization completep" in out and "--depth-base 2" in out


@pytest.mark.slow
def test_completep_with_own_output_init_is_the_same_model_at_tp2(tmp_path):
    """The re-drawn output layer and the forward multipliers do not depend on the TP size."""
    flags = TINY + ["--mock-data", "--train-iters", "3", "--parametrization", "completep", "--mup-base-hidden", "32",
                    "--depth-base", "1", "--output-layer-init-std", "0.05", "--micro-batch-size", "4"]
    runs = {}
    for tp in (1, 2):
        path = tmp_path / f"tp{tp}.jsonl"
        run_trainer(flags + ["--tensor-model-parallel-size", str(tp), "--metrics-file", str(path)], nproc=tp)
        runs[tp] = [r["lm_loss"] for r in read_metrics(path).values()]
    assert runs[2] == pytest.approx(runs[1], rel=1e-5)
