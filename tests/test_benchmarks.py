"""The benchmark scripts that have no CPU number to show still run here: benchmarks/mfu.py counts
FLOPs from the model's real matrices, knows the accelerators' peaks, and runs end to end on tiny
shapes (its GPU numbers are measured on GPUs; no timing is asserted). benchmarks/megatron_deepspeed.py
runs its three sides (the Megatron-DeepSpeed fixture alone, with the plug-ins, our trainer) on the
tiny model."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, _env


def _mfu_module():
    spec = importlib.util.spec_from_file_location("bench_mfu", os.path.join(REPO, "benchmarks", "mfu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_flops_count_the_matrices_the_model_has(mcore):
    from megatron_ext.launcher.presets import MODEL_PRESETS
    from megatron_ext.models.gpt import build_model

    mfu = _mfu_module()
    flags = mfu.train_flags("tiny", "sdpa", 1, 128, type("O", (), dict(iters=1, log_interval=1, dtype="fp32"))())
    from megatron_ext.plan import parse_args

    model = build_model(parse_args(flags, world_size=1), mfu.VOCAB)
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "word_embeddings" not in n)
    padded_extra = (model.output_layer.weight.size(0) - mfu.VOCAB) * model.config.hidden_size  # vocabulary padding
    shape = MODEL_PRESETS["tiny"]
    attention = 12 * shape["num_layers"] * shape["hidden_size"] * 128
    assert mfu.model_flops_per_token(shape, 128) == 6 * (matrices - padded_extra) + attention


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA A100-SXM4-40GB", 312.0), ("NVIDIA H200", 989.0),
                                        ("AMD Instinct MI250X", 191.5), ("AMD Instinct MI300X", 1307.4),
                                        ("Intel(R) Data Center GPU Max 1550", 419.4), ("cpu", None)])
def test_peak_flops_table_knows_the_centres_accelerators(name, peak):
    assert _mfu_module().peak_tflops(name) == peak


@pytest.mark.slow
def test_mfu_script_runs_end_to_end_on_tiny_shapes(tmp_path):
    out = tmp_path / "mfu.json"
    proc = subprocess.run([sys.executable, "benchmarks/mfu.py", "--presets", "tiny", "--backends", "sdpa", "local",
                           "--micro-batch", "1", "--iters", "4", "--log-interval", "2", "--peak-tflops", "1",
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["backend"] for r in result["rows"]] == ["sdpa", "local"]
    for r in result["rows"]:
        assert r["micro_batch"] == 1 and r["tokens_per_second"] > 0 and 0 < r["mfu"] < 1
    assert "MFU" in proc.stdout and "vs local" in proc.stdout


@pytest.mark.slow
def test_megatron_deepspeed_benchmark_runs_in_a_tiny_form(tmp_path):
    from megatron_deepspeed import fork_harness

    if not os.path.isdir(os.path.join(fork_harness.fixture_dir(), "megatron")):
        pytest.skip(f"the Megatron-DeepSpeed fixture is not at {fork_harness.fixture_dir()}")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "benchmarks/megatron_deepspeed.py", "--tiny", "--single", "--iters", "4",
                           "--warmup", "1", "--work", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, env=_env(), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for clock in ("time", "cpu"):  # wall and CPU time per iteration
        assert set(result["ms_per_iteration"][clock]) == {"fork", "fork+plugins", "ours"}
        assert all(ms > 0 for ms in result["ms_per_iteration"][clock].values())
    assert result["iterations"] == {"fork": 3, "fork+plugins": 3, "ours": 3}  # iterations 2..4 of each run
    assert all(result[f"{ratio}_{name}"] > 0 for ratio in ("ours_speedup", "plugin_cost") for name in ("wall", "CPU"))
    assert "ours vs the fork" in proc.stdout and "plug-ins in the fork" in proc.stdout


@pytest.mark.slow
def test_parallel_layouts_benchmark_runs_in_a_tiny_form(tmp_path):
    """EP 2 of the MoE against the same MoE at data parallelism, 3 iterations on 2 gloo ranks: both
    layouts are measured in the run and the ratios are of those measurements (no timing asserted)."""
    out = tmp_path / "layouts.json"
    proc = subprocess.run([sys.executable, "benchmarks/parallel_layouts.py", "--layouts", "ep2-moe", "--iters", "3",
                           "--warmup", "1", "--out", str(out)], capture_output=True, text=True, cwd=REPO, env=_env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["layouts"]
    assert list(rows) == ["dp2-moe", "ep2-moe"] and rows["ep2-moe"]["baseline"] == "dp2-moe"
    for r in rows.values():
        assert r["tokens_per_second"] > 0 and len(r["peak_bytes_per_rank"]) == 2
        assert all(p > 0 for p in r["peak_bytes_per_rank"])
    ep, dp = rows["ep2-moe"], rows["dp2-moe"]
    assert ep["speed_ratio"] == ep["tokens_per_second"] / dp["tokens_per_second"]
    assert ep["memory_ratio"] == max(ep["peak_bytes_per_rank"]) / max(dp["peak_bytes_per_rank"])
    assert "ep2-moe" in proc.stdout and "base" in proc.stdout


def test_parallel_layouts_benchmark_refuses_a_warmup_that_leaves_nothing_to_time():
    proc = subprocess.run([sys.executable, "benchmarks/parallel_layouts.py", "--iters", "3", "--warmup", "3"],
                          capture_output=True, text=True, cwd=REPO, env=_env(), timeout=60)
    assert proc.returncode == 2 and "--warmup 3 leaves no iteration of --iters 3 to time" in proc.stderr
