"""The memory and time plan (megatron_ext/planning, ``megatron-ext plan``): its estimate against the
peak memory measured on this machine for every configuration of ``planning.checks``, each check
able to fail (a plausible formula mistake lands outside the tolerance); the parameter inventory
against the real model; the command, its search, JSON and plot; the refusals of the trainer, the
launcher and sweeps; bad input."""
import argparse
import dataclasses
import glob
import json
import subprocess
import sys

import pytest

from conftest import REPO, TINY, _env, error_lines, free_port, run_in_process, run_trainer

TOLERANCE = 0.15  # |estimate / measured - 1| for every check


def _estimate(check, ds_config, world):
    from megatron_ext.plan import parse_plan
    from megatron_ext.planning.report import assess

    return assess(parse_plan(check.argv(ds_config), world))


def _reestimate(setup):
    from megatron_ext.planning.memory import estimate

    return estimate(setup).total


def _without(term):
    return lambda a: a.memory.total - a.memory.term(term)


def _setup_with(**changes):
    def mistake(a):
        setup = a.setup
        args_changes = {k: v for k, v in changes.items() if k not in ("layout", "optimizer", "backend", "device_kind")}
        if args_changes:
            args = argparse.Namespace(**{**{k: v for k, v in vars(setup.args).items() if k != "_frozen"},
                                         **args_changes})
            setup = dataclasses.replace(setup, args=args)
        rest = {k: v for k, v in changes.items() if k in ("layout", "optimizer", "backend", "device_kind")}
        if "optimizer" in rest:
            from megatron_ext.optimizers import OPTIMIZERS

            rest["optimizer"] = OPTIMIZERS.get(rest["optimizer"])
        return _reestimate(dataclasses.replace(setup, **rest))
    return mistake


def _half_the_states(a):
    return a.memory.total - a.memory.term("states") / 2


# A plausible mistake per check; each must land outside the tolerance (the check can fail).
MISTAKES = {
    "zero0-fp32-adamw": ("Adam's second moment forgotten", _half_the_states),
    "zero1-bf16-adamw": ("DeepSpeed's fp32 master weights forgotten", _without("master")),
    "zero2-fp32-accumulation": ("the step's temporaries forgotten", _without("workspace")),
    "zero3-bf16": ("the step's flat fp32 gradient and Adam's temporaries forgotten", _without("workspace")),
    "zero0-recompute": ("recomputation ignored (every activation kept)", _setup_with(recompute_activations=False)),
    "zero1-moe-bf16": ("only the active experts counted", _setup_with(num_experts=2)),
    "zero1-mla": ("sdpa's CPU math path for MLA (probabilities, fp32 q/k/v) forgotten", _setup_with(device_kind="cuda")),
    "zero1-muon": ("Muon's step (whole gathered matrices, Newton-Schulz) forgotten", _without("workspace")),
    "zero0-shampoo": ("Shampoo's factors forgotten (taken as AdamW)", _setup_with(optimizer="adamw")),
    "zero0-local-attention-gqa": ("the local kernel's score matrix forgotten", _setup_with(backend="sdpa")),
    "zero1-dp2": ("ZeRO partitioning forgotten", lambda a: _setup_with(
        layout=dataclasses.replace(a.setup.layout, dp=1))(a)),
    "tp2-zero1": ("tensor parallelism forgotten", lambda a: _setup_with(
        layout=dataclasses.replace(a.setup.layout, tp=1))(a)),
}


def _check_against(check, measured, ds_config):
    assessment = _estimate(check, ds_config, check.ranks)
    ratio = assessment.memory.total / measured
    what, mistake = MISTAKES[check.name]
    wrong = mistake(assessment) / measured
    detail = f"{check.name}: estimate {assessment.memory.total:,.0f} B / measured {measured:,.0f} B = {ratio:.3f}"
    assert abs(ratio - 1) <= TOLERANCE, detail + "\n" + "\n".join(
        f"  {t.key} {t.bytes:,.0f} {t.formula}" for t in assessment.memory.terms)
    assert abs(wrong - 1) > TOLERANCE, f"{detail}; with {what} it would be {wrong:.3f}: the check cannot fail"


def _checks(ranks):
    from megatron_ext.planning.checks import CHECKS

    return [c for c in CHECKS if c.ranks == ranks and c.repeatable]


@pytest.fixture(scope="module")
def ds_config(tmp_path_factory):
    from megatron_ext.planning.checks import write_ds_config

    return write_ds_config(str(tmp_path_factory.mktemp("ds")))


def test_every_check_has_a_mistake_and_the_list_covers_the_issue():
    from megatron_ext.planning.checks import CHECKS

    checked = [c for c in CHECKS if c.repeatable]
    assert {c.name for c in checked} == set(MISTAKES)  # every asserted check can fail
    assert len(checked) >= 8
    text = " ".join(" ".join(c.flags) for c in checked)
    for needed in ("--zero-stage 0", "--zero-stage 1", "--zero-stage 2", "--zero-stage 3",
                   "--tensor-model-parallel-size 2", "--recompute-activations", "--num-experts",
                   "--multi-latent-attention", "muon", "shampoo", "--bf16"):
        assert needed in text, needed
    assert any("--bf16" not in c.flags for c in checked)  # and fp32


@pytest.mark.parametrize("name", [c.name for c in _checks(1)])
def test_estimate_matches_the_measured_peak(name, ds_config):
    """One rank, in this process: the trainer's real run, its peak from the CPU allocator."""
    from megatron_ext.planning.checks import CHECKS
    from megatron_ext.planning.measure import measure

    check = next(c for c in CHECKS if c.name == name)
    measured = measure(check.argv(ds_config), world_size=1)["peak_bytes"]
    _check_against(check, measured, ds_config)


@pytest.mark.slow
@pytest.mark.parametrize("name", [c.name for c in _checks(2)])
def test_estimate_matches_the_measured_peak_of_the_most_loaded_rank(name, ds_config, tmp_path):
    from megatron_ext.planning.checks import CHECKS

    check = next(c for c in CHECKS if c.name == name)
    out = str(tmp_path / "peak")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(check.ranks),
                    "--master_port", str(free_port()), "-m", "megatron_ext.planning.measure", *check.argv(ds_config),
                    "--measure-out", out], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600,
                   check=True)
    peaks = [json.load(open(f))["peak_bytes"] for f in sorted(glob.glob(out + ".rank*.json"))]
    assert len(peaks) == check.ranks
    _check_against(check, max(peaks), ds_config)


# --- the parameter inventory -------------------------------------------------------------------

INVENTORY_CASES = {
    "llama-gqa": ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4", "--num-key-value-heads",
                  "2"],
    "gpt2-tied-bias-qk-norm": ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4",
                               "--model-style", "gpt2", "--qk-layernorm"],
    "deepseek-mla-moe-mtp": ["--num-layers", "3", "--hidden-size", "128", "--ffn-hidden-size", "384",
                             "--num-attention-heads", "4", "--multi-latent-attention", "--q-lora-rank", "64",
                             "--kv-lora-rank", "32", "--qk-head-dim", "32", "--qk-pos-emb-head-dim", "16",
                             "--v-head-dim", "32", "--qk-layernorm", "--num-experts", "8", "--moe-router-topk", "2",
                             "--moe-ffn-hidden-size", "96", "--moe-shared-expert-intermediate-size", "96",
                             "--moe-first-k-dense", "1", "--mtp-num-layers", "1"],
}


@pytest.mark.parametrize("case", sorted(INVENTORY_CASES))
def test_the_parameter_inventory_is_the_models(case, mcore):
    from megatron_ext.models.gpt import build_model
    from megatron_ext.plan import parse_plan
    from megatron_ext.planning import features

    plan = parse_plan(INVENTORY_CASES[case] + ["--seq-length", "64", "--mock-data", "--train-iters", "1"], 1)
    model = build_model(plan.args, 1000)
    real = {n: tuple(p.shape) for n, p in model.named_parameters()}
    planned = {name: p.shape for p in features.parameters(plan.args, 1024) for name in p.names()}
    assert planned == real


# --- the command -----------------------------------------------------------------------------------

def plan_cmd(*argv):
    from megatron_ext.cli import main

    return run_in_process(main, ["plan", *argv])


SMALL = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8", "--seq-length", "128",
         "--micro-batch-size", "2", "--vocab-size", "1024"]


def test_plan_prints_every_term_with_its_formula_and_the_time():
    proc = plan_cmd(*SMALL, "--device", "h100", "--world-size", "8", "--tensor-model-parallel-size", "2",
                    "--zero-stage", "2", "--train-iters", "1000")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needed in ("memory/device (est.)", "weights", "fp32 master weights", "optimizer states",
                   "activations", "step time (est.)", "tokens/s (est.)",
                   "node-hours", "formulas:", "TP2 x PP1 x EP1 x SP1 x DP4"):
        assert needed in out, needed
    assert "989 TFLOPS" in out and "40%" in out


def test_plan_json_is_the_record_and_pipeline_layouts_are_planned(tmp_path):
    proc = plan_cmd(*SMALL, "--device", "h100", "--world-size", "8", "--pipeline-model-parallel-size", "2",
                    "--global-batch-size", "16", "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["layout"] == {"tp": 1, "pp": 2, "ep": 1, "sp": 1, "dp": 4, "world_size": 8}
    assert record["runnable"] is True and not any("not runnable today" in n for n in record["notes"])
    assert record["memory"]["peak_bytes"] == pytest.approx(sum(t["bytes"] for t in record["memory"]["terms"]))
    assert record["fits"] is True and record["refusal"] is None
    # 1F1B: the first stage holds PP micro-batches of activations, the last one one
    from megatron_ext.plan import parse_plan
    from megatron_ext.planning.layout import Layout
    from megatron_ext.planning.memory import _stage_plan, setup_from_plan

    plan = parse_plan(SMALL + ["--mock-data", "--train-iters", "1", "--global-batch-size", "16", "--bf16"], 4)
    setup = setup_from_plan(plan, "cuda", here=False, layout=Layout(pp=2, dp=4))
    first, last = _stage_plan(setup, 0), _stage_plan(setup, 1)
    assert (first.in_flight, last.in_flight) == (2, 1)
    assert first.rank_parameters < last.rank_parameters  # the last stage has the output layer (untied)


def test_search_proposes_only_runnable_layouts_ranked_by_throughput():
    proc = plan_cmd("--model", "70B", "--devices", "256", "--device", "h100", "--json")
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    layouts = found["layouts"]
    assert layouts and found["fitting"] >= len(layouts) and found["not_runnable"] > 0
    speeds = [x["time"]["tokens_per_second"] for x in layouts]
    assert speeds == sorted(speeds, reverse=True)
    assert any(x["layout"]["pp"] > 1 for x in layouts)  # our trainer's pipeline parallelism (docs/parallelism.md)
    for x in layouts:
        lay = x["layout"]
        assert (lay["ep"], lay["sp"]) == (1, 1) and lay["tp"] * lay["pp"] * lay["dp"] == 256
        assert lay["pp"] == 1 or x["zero_stage"] in (0, 1)  # DeepSpeed's rule with pipeline stages
        assert lay["pp"] == 1 or x["zero_stage"] > 0  # bf16 with pipeline stages needs ZeRO >= 1
        assert x["fits"] and x["memory"]["peak_bytes"] <= 0.9 * x["device"]["memory_bytes"]
        assert x["micro_batch"] * x["gradient_accumulation"] * lay["dp"] == 1024
        assert f"TP={lay['tp']}" in x["variables"] and "MODEL_ARCH=70B" in x["variables"]
    text = plan_cmd("--model", "70B", "--devices", "256", "--device", "h100", "--top", "3")
    assert text.returncode == 0 and text.stdout.count("MODEL_ARCH=70B") == 3


def test_search_keeps_the_dimensions_a_flag_fixes():
    proc = plan_cmd("--model", "7B", "--devices", "16", "--device", "aurora-tile", "--zero-stage", "1",
                    "--tensor-model-parallel-size", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    layouts = json.loads(proc.stdout)["layouts"]
    assert layouts and all(x["zero_stage"] == 1 and x["layout"]["tp"] == 2 for x in layouts)
    assert layouts[0]["device"]["peak_tflops"] == 419.4


def test_plot_draws_stacked_bars(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "plan.png"
    proc = plan_cmd("--model", "7B", "--devices", "64", "--device", "a100", "--top", "4", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, culprit", [
    (["--device", "h1000"], "unknown device 'h1000' (did you mean 'h100'?)"),
    (["--num-layers", "x"], "--num-layers"),
    (["--world-size", "3", "--tensor-model-parallel-size", "2"], "does not divide the world size 3"),
    (["--world-size", "4", "--pipeline-model-parallel-size", "3"], "does not divide --world-size 4"),
    (["--model", "71B", "--devices", "8"], "--model '71B' is not a preset"),
    (["--world-size", "2", "--devices", "4"], "not both"),
])
def test_bad_input_is_one_line_and_exit_2(argv, culprit):
    proc = plan_cmd(*SMALL, *argv)
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and culprit in lines[0], proc.stderr


# --- refusing what cannot fit -------------------------------------------------------------------------

def test_the_trainer_refuses_a_run_that_cannot_fit_and_runs_it_when_allowed(tmp_path):
    from megatron_ext.train import run

    argv = TINY + ["--mock-data", "--train-iters", "1", "--zero-stage", "0", "--device-memory", "0.0009765625"]
    proc = run_in_process(run, argv)
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "exceeds the device's 1.00 MiB" in lines[0] and "--allow-oversubscribe" in lines[0]
    assert lines[0].startswith("megatron_ext.train: error: the estimated peak memory")
    assert "the largest term is" in lines[0] and "try" in lines[0]
    proc = run_trainer(argv + ["--allow-oversubscribe"])
    assert "memory/device (est.)" in proc.stdout and "DOES NOT FIT" in proc.stdout
    assert "iteration=       1/       1" in proc.stdout


def test_the_refusal_names_the_fix_for_the_largest_term():
    proc = plan_cmd("--model", "70B", "--device", "h100", "--world-size", "8", "--zero-stage", "0", "--json")
    record = json.loads(proc.stdout)
    assert record["exceeds_device"] and record["memory"]["largest"] in ("states", "weights", "master", "gradients")
    assert "--zero-stage 1" in record["refusal"] or "--zero-stage 3" in record["refusal"]
    proc = plan_cmd("--model", "7B", "--device", "h100", "--world-size", "8", "--zero-stage", "3",
                    "--micro-batch-size", "64", "--global-batch-size", "512", "--json")
    record = json.loads(proc.stdout)
    assert record["memory"]["largest"] == "activations" and "--recompute-activations" in record["refusal"]


def test_dry_run_shows_the_plan_and_the_launcher_refuses_what_cannot_fit(tmp_path):
    from test_launcher import launch

    env = {"MODEL_ARCH": "tiny", "TRAIN_ITERS": "10", "ZERO_STAGE": "0", "SAVE": str(tmp_path / "run")}
    proc = launch(env)
    assert proc.returncode == 0, proc.stderr
    assert "memory/device (est.)" in proc.stdout and "optimizer states" in proc.stdout and "(fits)" in proc.stdout
    proc = launch(env, extra=["--device-memory", "0.001"])  # DRY_RUN shows what the launch would refuse
    assert proc.returncode == 0 and "DOES NOT FIT" in proc.stdout and "the launch would be refused" in proc.stdout
    proc = launch(env, extra=["--device-memory", "0.001"], dry_run=False)
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("train_alcf.sh: error: the estimated peak memory")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_plan_reads_a_launchers_variables(monkeypatch):
    for var in ("HOSTFILE", "PBS_NODEFILE", "DATA_FILE_LIST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MODEL_ARCH", "7B")
    monkeypatch.setenv("TP", "2")
    monkeypatch.setenv("NGPU_PER_HOST", "8")
    monkeypatch.setenv("TRAIN_ITERS", "100")
    proc = plan_cmd("--launcher", "--device", "h100", "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["layout"]["tp"] == 2 and record["layout"]["world_size"] == 8 and record["precision"] == "bf16"


def test_a_sweep_rejects_a_variant_that_cannot_fit(tmp_path, capsys):
    from megatron_ext.commands.sweep import run_argv

    base = TINY + ["--mock-data", "--zero-stage", "0", "--device-memory", "0.02"]
    code = run_argv(["--grid", "micro_batch_size=1,64", "--steps", "2", "--out", str(tmp_path / "s"),
                     "--dry-run", "--", *base])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "variant micro_batch_size=64" in err and "exceeds the device's" in err


def test_search_proposes_expert_parallel_layouts_for_a_mixture_of_experts():
    proc = plan_cmd("--model", "openseek-small", "--devices", "16", "--device", "h100", "--json")
    assert proc.returncode == 0, proc.stderr
    layouts = json.loads(proc.stdout)["layouts"]
    assert any(x["layout"]["ep"] > 1 for x in layouts)
    assert all(x["layout"]["tp"] == 1 and (x["layout"]["ep"] == 1 or x["zero_stage"] in (1, 2)) for x in layouts)
