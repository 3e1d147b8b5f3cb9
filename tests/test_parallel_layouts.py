"""Pipeline and expert parallelism (docs/parallelism.md): every layout reproduces the single-process
run (losses, gradient norms and validation to float rounding), every plug-in trains under them,
and what DeepSpeed cannot run is one line before any work.

The equivalence runs clip on every step (norms ~1-2 against --clip-grad 0.5), so a wrong global
norm changes the losses; the gradient norms are compared too (a wrong clipping norm moves the loss
by less than 1e-5 in a few steps)."""
import math

import pytest

from conftest import plan_error, read_metrics, run_layouts, run_trainer

STEPS = ["--mock-data", "--train-iters", "4", "--global-batch-size", "8", "--micro-batch-size", "2",
         "--seq-length", "32", "--lr", "3e-3", "--lr-warmup-iters", "1", "--clip-grad", "0.5",
         "--eval-interval", "2", "--eval-iters", "1", "--log-interval", "1"]
# llama style (untied embeddings, SwiGLU, RMSNorm, RoPE), grouped KV heads split by TP 2
LLAMA = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--num-key-value-heads", "2"] + STEPS
# gpt2 style: the output layer is the word embedding (a copy on the last stage), learned positions, biases
GPT2 = LLAMA + ["--model-style", "gpt2", "--hidden-dropout", "0", "--attention-dropout", "0"]
# 4 experts top-2 with the DeepSeek-V3 pieces: aux loss, expert bias (sigmoid scores), one MTP layer
MOE = LLAMA + ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "64",
               "--moe-aux-loss-coeff", "1e-2", "--moe-router-score-function", "sigmoid",
               "--moe-router-enable-expert-bias", "--mtp-num-layers", "1"]


# (Muon's Newton-Schulz in fp32: in bf16, where this CPU multiplies bf16 natively, its rounding moves
# the gradient norm by ~1e-4 between any two reduction orders, tensor parallel alone included.)
OPTIMIZERS = {"adamw": ["--optimizer", "adamw"], "muon": ["--optimizer", "muon", "--muon-ns-dtype", "fp32"]}


def assert_reproduces(got, reference, name):
    """Every logged iteration's loss and gradient norm (and every validation) within 1e-5."""
    train, ref = got["train"], reference["train"]
    assert sorted(train) == sorted(ref) == [1, 2, 3, 4], name
    worst = {field: max(abs(train[it][field] - ref[it][field]) / abs(ref[it][field]) for it in ref)
             for field in ("lm_loss", "grad_norm")}
    print(f"{name}: max relative difference: loss {worst['lm_loss']:.1e}, grad norm {worst['grad_norm']:.1e}")
    for it in ref:
        assert train[it]["lm_loss"] == pytest.approx(ref[it]["lm_loss"], rel=1e-5), (name, "loss", it)
        assert train[it]["grad_norm"] == pytest.approx(ref[it]["grad_norm"], rel=1e-5), (name, "grad norm", it)
        for key in ("moe_aux_loss", "mtp_loss"):
            if key in ref[it]:
                assert train[it][key] == pytest.approx(ref[it][key], rel=1e-5), (name, key, it)
        if "expert_load" in ref[it]:
            assert train[it]["expert_load"] == ref[it]["expert_load"], (name, "expert load", it)
            assert train[it]["expert_bias"] == ref[it]["expert_bias"], (name, "expert bias", it)
    assert sorted(got["validation"]) == sorted(reference["validation"]) == [2, 4], name
    for it, record in reference["validation"].items():
        assert got["validation"][it]["lm_loss"] == pytest.approx(record["lm_loss"], rel=1e-5), (name, "valid", it)
        assert got["validation"][it]["accuracy"] == record["accuracy"], (name, "accuracy", it)


def metrics(path):
    return {split: read_metrics(path, split) for split in ("train", "validation")}


def single_process(flags, path):
    run_trainer(flags + ["--zero-stage", "0", "--metrics-file", str(path)])
    return metrics(path)


# -- equivalence (slow: torchrun) -----------------------------------------------------------------
DENSE_LAYOUTS = {  # name: (model, optimizer, layout flags)
    "tp2xpp2 adamw zero0": (LLAMA, "adamw", ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                                            "--zero-stage", "0"]),
    "tp2xpp2 muon zero1": (LLAMA, "muon", ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                                          "--zero-stage", "1"]),
    "pp2xdp2 muon zero0": (LLAMA, "muon", ["--pipeline-model-parallel-size", "2", "--zero-stage", "0"]),
    "pp2xdp2 adamw zero1 tied": (GPT2, "adamw", ["--pipeline-model-parallel-size", "2", "--zero-stage", "1"]),
    "tp2xpp2 muon zero0 tied": (GPT2, "muon", ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                                              "--zero-stage", "0"]),
}


@pytest.mark.slow
def test_pipeline_layouts_reproduce_the_single_process_run(tmp_path):
    references = {}
    for model, optimizer, _ in DENSE_LAYOUTS.values():
        key = (id(model), optimizer)
        if key not in references:
            references[key] = single_process(model + OPTIMIZERS[optimizer], tmp_path / f"ref{len(references)}.jsonl")
    runs = [model + OPTIMIZERS[optimizer] + layout + ["--metrics-file", tmp_path / f"{i}.jsonl"]
            for i, (model, optimizer, layout) in enumerate(DENSE_LAYOUTS.values())]
    run_layouts(runs, 4, tmp_path)
    for i, (name, (model, optimizer, _)) in enumerate(DENSE_LAYOUTS.items()):
        assert_reproduces(metrics(tmp_path / f"{i}.jsonl"), references[(id(model), optimizer)], name)


MOE_LAYOUTS = {  # name: (ranks, optimizer, layout flags)
    "ep2 adamw zero0": (2, "adamw", ["--expert-model-parallel-size", "2", "--zero-stage", "0"]),
    "ep2 muon zero1": (2, "muon", ["--expert-model-parallel-size", "2", "--zero-stage", "1"]),
    "ep2xedp2 adamw zero2": (4, "adamw", ["--expert-model-parallel-size", "2", "--zero-stage", "2"]),
    "ep2xedp2 muon zero0": (4, "muon", ["--expert-model-parallel-size", "2", "--zero-stage", "0"]),
    "pp2xep2 muon zero1": (4, "muon", ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2",
                                       "--zero-stage", "1"]),
}


@pytest.mark.slow
def test_expert_parallel_layouts_reproduce_the_data_parallel_run(tmp_path):
    references = {opt: single_process(MOE + OPTIMIZERS[opt], tmp_path / f"ref-{opt}.jsonl")
                  for opt in ("adamw", "muon")}
    for ranks in (2, 4):
        chosen = [(i, name, opt, layout) for i, (name, (n, opt, layout)) in enumerate(MOE_LAYOUTS.items()) if n == ranks]
        folder = tmp_path / f"ranks{ranks}"
        folder.mkdir()
        proc = run_layouts([MOE + OPTIMIZERS[opt] + layout + ["--metrics-file", tmp_path / f"{i}.jsonl"]
                            for i, _, opt, layout in chosen], ranks, folder)
        assert "expert-parallel size" in proc.stdout and "2 experts a rank" in proc.stdout
        for i, name, opt, _ in chosen:
            assert_reproduces(metrics(tmp_path / f"{i}.jsonl"), references[opt], name)


PLUGINS = [["--optimizer", name] for name in ("adam", "adamw", "adamwschedulefree", "adopt", "lamb", "lion", "muon",
                                               "sgd", "sgdschedulefree", "shampoo")]
PLUGINS += [["--optimizer", "sophiag", "--sophiag-hessian-interval", "1"],
            ["--parametrization", "mup", "--mup-base-hidden", "32", "--optimizer", "muon"],
            ["--parametrization", "completep", "--mup-base-hidden", "32", "--depth-base", "2"],
            ["--lr-decay-style", "wsd", "--lr-wsd-decay-iters", "1"]]


@pytest.mark.slow
def test_every_plugin_trains_under_pipeline_and_expert_parallelism(tmp_path):
    """Each optimizer, parametrization and a schedule at PP 2 x EP 2 (ZeRO 1), and the LR finder."""
    layout = (MOE[:MOE.index("--train-iters")] + ["--train-iters", "2"] + MOE[MOE.index("--train-iters") + 2:]
              + ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2", "--zero-stage", "1"])
    runs = [layout + ["--metrics-file", tmp_path / f"{i}.jsonl"] + extra for i, extra in enumerate(PLUGINS)]
    runs.append(layout + ["--lr-finder", "--lr-finder-iters", "3", "--save", tmp_path / "lrf"])
    run_layouts(runs, 4, tmp_path)
    for i, extra in enumerate(PLUGINS):
        train = read_metrics(tmp_path / f"{i}.jsonl")
        assert sorted(train) == [1, 2] and all(math.isfinite(r["lm_loss"]) and math.isfinite(r["grad_norm"])
                                               for r in train.values()), extra
    import json

    with open(tmp_path / "lrf" / "lr_finder" / "lr_finder.json") as f:
        assert json.load(f)["iterations_run"] == 3


# -- bad input (fast: the run plan) ---------------------------------------------------------------
@pytest.mark.parametrize("argv, world, message", [
    (["--num-layers", "3", "--pipeline-model-parallel-size", "2"], 2,
     "--pipeline-model-parallel-size 2 does not divide --num-layers 3"),
    (["--pipeline-model-parallel-size", "2"], 3,
     "--tensor-model-parallel-size 1 x --pipeline-model-parallel-size 2 = 2 does not divide the world size 3"),
    (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 6,
     "--tensor-model-parallel-size 2 x --pipeline-model-parallel-size 2 = 4 does not divide the world size 6"),
    (["--num-experts", "6", "--expert-model-parallel-size", "4"], 4, "--expert-model-parallel-size 4 does not divide "
                                                                     "--num-experts 6"),
    (["--num-experts", "4", "--expert-model-parallel-size", "4"], 2, "--expert-model-parallel-size 4 does not divide "
                                                                     "the data-parallel size 2"),
    (["--num-experts", "4", "--expert-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 2,
     "--expert-model-parallel-size 2 does not divide the data-parallel size 1"),
    (["--expert-model-parallel-size", "2"], 2, "--expert-model-parallel-size 2 needs --num-experts"),
    (["--pipeline-model-parallel-size", "2", "--zero-stage", "2"], 2,
     "--pipeline-model-parallel-size 2 runs with --zero-stage 0 or 1, not 2"),
    (["--pipeline-model-parallel-size", "2", "--zero-stage", "3"], 2,
     "--pipeline-model-parallel-size 2 runs with --zero-stage 0 or 1, not 3"),
    (["--num-experts", "4", "--expert-model-parallel-size", "2", "--zero-stage", "3"], 2,
     "--expert-model-parallel-size 2 runs with --zero-stage 0, 1 or 2, not 3"),
    (["--pipeline-model-parallel-size", "2", "--fp16"], 2, "--pipeline-model-parallel-size 2 with --fp16: not supported"),
    (["--pipeline-model-parallel-size", "2", "--bf16", "--zero-stage", "0"], 2,
     "--pipeline-model-parallel-size with --bf16 needs --zero-stage 1 or more"),
    (["--num-experts", "4", "--expert-model-parallel-size", "2", "--fp16", "--zero-stage", "0"], 2,
     "--expert-model-parallel-size with --fp16 needs --zero-stage 1 or more"),
    (["--pipeline-model-parallel-size", "2", "--cpu-optimizer"], 2,
     "--pipeline-model-parallel-size with --cpu-optimizer: not supported"),
])
def test_layouts_deepspeed_cannot_run_are_one_line(capsys, argv, world, message):
    assert message in plan_error(capsys, ["--mock-data", "--train-iters", "4"] + argv, world)


def test_a_zero_stage_from_the_users_deepspeed_json_is_checked_too(capsys, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text('{"zero_optimization": {"stage": 2}}')
    line = plan_error(capsys, ["--mock-data", "--train-iters", "4", "--pipeline-model-parallel-size", "2",
                               "--zero-stage", "1", "--deepspeed-config", str(config)], 2)
    assert "--pipeline-model-parallel-size 2 runs with --zero-stage 0 or 1, not 2" in line


def test_a_plugin_declares_the_layouts_it_cannot_run():
    """The registry's engine support refuses pipeline or expert parallelism for a plug-in that
    declares it cannot run there (no plug-in of the package needs it today)."""
    from megatron_ext import registry
    from megatron_ext.registry import EngineSettings, EngineSupport

    support = EngineSupport(pipeline_parallel=False, expert_parallel=False, reason="needs the whole model")
    assert support.problem("--optimizer x", EngineSettings(pipeline_parallel=2)) == \
        "--optimizer x does not support --pipeline-model-parallel-size > 1 (needs the whole model)"
    assert "--expert-model-parallel-size > 1" in support.problem("--optimizer x", EngineSettings(expert_parallel=2))
    assert support.problem("--optimizer x", EngineSettings()) is None
    assert "no pipeline parallel, no expert parallel" in support.describe()
    layouts = EngineSettings(zero_stage=1, pipeline_parallel=2, expert_parallel=2)
    for family in registry.families().values():
        for plugin in family.plugins():
            assert plugin.engine.problem(plugin.name, layouts) is None, plugin.name


def test_the_plan_shows_the_layout():
    from megatron_ext.plan import build_plan
    from megatron_ext.arguments import build_parser

    args = build_parser().parse_args(["--mock-data", "--train-iters", "4", "--num-layers", "4", "--num-experts", "4",
                                      "--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2"])
    plan = build_plan(args, world_size=8)
    rows = dict(plan.rows())
    assert rows["data-parallel size"] == 4 and plan.engine.pipeline_parallel == 2 and plan.engine.expert_parallel == 2
    assert rows["pipeline-parallel size"] == "2 (2 layers a stage)"
    assert rows["expert-parallel size"] == "2 (2 experts a rank, expert-data-parallel size 2)"
    assert plan.ds_config["managed_gradient_accumulation"] is False
