"""Universal checkpoints through the real trainer and DeepSpeed's own converter: a DP=2 ZeRO-1 run
converted and resumed at DP=1 and at DP=2 ZeRO-2, a TP=2 run resumed at TP=1 (losses as the
native continuation's, fp32, 1e-5); --finetune, --no-load-optim and --no-load-rng honoured on
universal checkpoints; Muon's momentum carried, Shampoo's factors re-created with one warning;
one-line errors for shape mismatches, layouts a native checkpoint cannot load at, and bad
converter input (nothing written)."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from conftest import REPO, TINY, _env, error_lines, read_metrics, run_module, run_trainer, tree_digest

ITERS = ["--mock-data", "--train-iters", "8", "--global-batch-size", "4"]  # 2 ranks x micro batch 2
TOL = 1e-5


def convert(args, tool=False):
    """Run the converter (tools/ds_to_universal.py or megatron-ext to-universal)."""
    if tool:
        cmd = [sys.executable, os.path.join(REPO, "tools", "ds_to_universal.py"), *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120, cwd=REPO)
    return run_module("megatron_ext.cli", ["to-universal", *args])


def losses(path):
    return {it: r["lm_loss"] for it, r in read_metrics(path).items()}


def assert_continues(resumed, reference, iterations):
    assert sorted(resumed) == iterations
    for it in iterations:
        got, ref = resumed[it], reference[it]
        assert got["consumed_samples"] == ref["consumed_samples"], it
        assert got["learning_rate"] == pytest.approx(ref["learning_rate"], rel=1e-12), it
        assert abs(got["lm_loss"] - ref["lm_loss"]) <= TOL, (it, got["lm_loss"], ref["lm_loss"])


def native_dir(root, tag_dir):
    """A load directory whose ``latest`` names ``tag_dir`` (a link to it)."""
    root.mkdir()
    (root / tag_dir.name).symlink_to(tag_dir)
    (root / "latest").write_text(tag_dir.name)
    return root


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    """DP=2 ZeRO-1 run of 8 iterations (checkpoints at 4 and 8), its step 4 converted."""
    root = tmp_path_factory.mktemp("dp2")
    base, uni = root / "base", root / "uni"
    run_trainer(TINY + ITERS + ["--zero-stage", "1", "--save", str(base), "--save-interval", "4"], nproc=2)
    uni.mkdir()
    before = tree_digest(base / "global_step4")
    out = convert(["--input_folder", str(base / "global_step4"), "--output_folder",
                   str(uni / "global_step4_universal")], tool=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return types.SimpleNamespace(base=base, uni=uni, ref=read_metrics(base / "metrics.jsonl"), stdout=out.stdout,
                                 source_unchanged=before == tree_digest(base / "global_step4"),
                                 native4=native_dir(root / "native4", base / "global_step4"))


@pytest.mark.slow
def test_conversion_writes_universal_checkpoint_and_keeps_client_state(dp2):
    out = dp2.uni / "global_step4_universal"
    assert dp2.source_unchanged  # the converter works on a staged copy
    assert (dp2.uni / "latest_universal").read_text().strip() == "global_step4_universal"
    assert sorted(os.listdir(dp2.uni)) == ["global_step4_universal", "latest_universal"]  # no staging left
    assert f"wrote {out}" in dp2.stdout and "iteration 4" in dp2.stdout and "--universal-checkpoint" in dp2.stdout
    record = json.loads((out / "universal_conversion.json").read_text())
    assert (record["iteration"], record["consumed_samples"], record["data_parallel_size"]) == (4, 16, 2)
    assert record["not_carried"] == []
    fc1 = out / "zero" / "decoder.layers.0.mlp.linear_fc1.weight"
    assert sorted(os.listdir(fc1)) == ["exp_avg.pt", "exp_avg_sq.pt", "fp32.pt", "step.pt"]
    assert torch.load(fc1 / "fp32.pt", weights_only=False)["param"].shape == (384, 64)
    client = torch.load(out / "mp_rank_00_model_states.pt", weights_only=False)
    assert (client["iteration"], client["consumed_samples"], client["tokens"]) == (4, 16, 16 * 64)
    assert client["lr_scheduler"]["schedule"]["style"] == "cosine"
    assert len(client["rng_state"]) == 2
    assert all(v is not None for v in client["module"].values())  # megatron-core's None _extra_state dropped


@pytest.mark.slow
def test_resume_at_dp1_continues_like_native_dp2(dp2, tmp_path):
    run_trainer(TINY + ITERS + ["--load", str(dp2.uni), "--universal-checkpoint",
                                "--metrics-file", str(tmp_path / "m.jsonl")])
    assert_continues(read_metrics(tmp_path / "m.jsonl"), dp2.ref, [5, 6, 7, 8])


@pytest.mark.slow
def test_resume_at_dp2_zero2_continues_like_native(dp2, tmp_path):
    run_trainer(TINY + ITERS + ["--zero-stage", "2", "--load", str(dp2.uni), "--universal-checkpoint",
                                "--metrics-file", str(tmp_path / "m.jsonl")], nproc=2)
    assert_continues(read_metrics(tmp_path / "m.jsonl"), dp2.ref, [5, 6, 7, 8])


@pytest.mark.slow
def test_tp2_to_tp1_continues_like_native_tp2(tmp_path):
    base, uni = tmp_path / "base", tmp_path / "uni"
    flags = TINY + ["--mock-data", "--train-iters", "8"]  # TP=2 on 2 ranks: DP=1, global batch 2
    run_trainer(flags + ["--tensor-model-parallel-size", "2", "--save", str(base), "--save-interval", "4"], nproc=2)
    uni.mkdir()
    out = convert(["--input_folder", str(base / "global_step4"), "--output_folder", str(uni / "global_step4_universal")])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TP=2" in out.stdout
    run_trainer(flags + ["--load", str(uni), "--universal-checkpoint", "--metrics-file", str(tmp_path / "m.jsonl")])
    assert_continues(read_metrics(tmp_path / "m.jsonl"), read_metrics(base / "metrics.jsonl"), [5, 6, 7, 8])


@pytest.mark.slow
def test_finetune_from_universal_resets_iteration_optimizer_and_schedule(dp2, tmp_path):
    flags = TINY + ITERS + ["--finetune", "--exit-interval", "3"]
    run_trainer(flags + ["--load", str(dp2.uni), "--universal-checkpoint", "--metrics-file", str(tmp_path / "u.jsonl")])
    run_trainer(flags + ["--load", str(dp2.native4), "--metrics-file", str(tmp_path / "n.jsonl")])
    uni, native = read_metrics(tmp_path / "u.jsonl"), read_metrics(tmp_path / "n.jsonl")
    assert sorted(uni) == [1, 2, 3]  # iteration 0 again
    for it in uni:
        assert uni[it]["consumed_samples"] == 4 * it  # data from the start
        assert uni[it]["learning_rate"] == pytest.approx(dp2.ref[it]["learning_rate"], rel=1e-12)  # fresh schedule
        # a fresh optimizer, as DeepSpeed's module-only load of the native checkpoint gives
        assert abs(uni[it]["lm_loss"] - native[it]["lm_loss"]) <= TOL, it
    assert uni[1]["lm_loss"] < dp2.ref[1]["lm_loss"] - 0.1  # the trained weights, on the same first batch


@pytest.mark.slow
def test_no_load_optim_from_universal_starts_a_fresh_optimizer(dp2, tmp_path):
    flags = TINY + ITERS + ["--no-load-optim", "--exit-interval", "6"]
    run_trainer(flags + ["--load", str(dp2.uni), "--universal-checkpoint", "--metrics-file", str(tmp_path / "u.jsonl")])
    run_trainer(flags + ["--load", str(dp2.native4), "--metrics-file", str(tmp_path / "n.jsonl")])
    uni, native = read_metrics(tmp_path / "u.jsonl"), read_metrics(tmp_path / "n.jsonl")
    assert sorted(uni) == [5, 6]  # iteration, data position and schedule continue
    for it in (5, 6):
        assert uni[it]["consumed_samples"] == dp2.ref[it]["consumed_samples"]
        assert uni[it]["learning_rate"] == pytest.approx(dp2.ref[it]["learning_rate"], rel=1e-12)
        assert abs(uni[it]["lm_loss"] - native[it]["lm_loss"]) <= TOL, it
    assert abs(uni[5]["lm_loss"] - dp2.ref[5]["lm_loss"]) <= TOL  # same weights before the first update
    assert abs(uni[6]["lm_loss"] - dp2.ref[6]["lm_loss"]) > 1e-4  # ... but not the loaded Adam moments


def test_rng_restored_from_universal_unless_no_load_rng(tmp_path):
    """gpt2 style has dropout: the loss depends on every random stream (also the TP tracker's)."""
    base, uni = tmp_path / "base", tmp_path / "uni"
    flags = TINY + ["--mock-data", "--train-iters", "6", "--model-style", "gpt2"]
    run_trainer(flags + ["--save", str(base), "--save-interval", "3"])
    uni.mkdir()
    assert convert(["--input_folder", str(base / "global_step3"), "--output_folder", str(uni / "u")]).returncode == 0
    ref = losses(base / "metrics.jsonl")
    for extra, name in (([], "rng"), (["--no-load-rng"], "fresh")):
        run_trainer(flags + ["--load", str(uni), "--universal-checkpoint", "--metrics-file", str(tmp_path / name), *extra])
    restored, fresh = losses(tmp_path / "rng"), losses(tmp_path / "fresh")
    assert all(abs(restored[it] - ref[it]) <= TOL for it in (4, 5, 6)), (restored, ref)
    assert abs(fresh[4] - ref[4]) > 1e-4


def test_muon_momentum_survives_conversion(tmp_path):
    base, uni = tmp_path / "base", tmp_path / "uni"
    flags = TINY + ["--mock-data", "--train-iters", "8", "--optimizer", "muon"]
    run_trainer(flags + ["--save", str(base), "--save-interval", "4"])
    uni.mkdir()
    out = convert([str(base / "global_step4"), "--output_folder", str(uni / "global_step4_universal")])
    assert out.returncode == 0, out.stderr[-3000:]
    hidden = uni / "global_step4_universal" / "zero" / "decoder.layers.0.self_attention.linear_qkv.weight"
    assert sorted(os.listdir(hidden)) == ["exp_avg.pt", "fp32.pt"]  # Muon's momentum; no placeholder moment left
    run_trainer(flags + ["--load", str(uni), "--universal-checkpoint", "--metrics-file", str(tmp_path / "m.jsonl")])
    assert_continues(read_metrics(tmp_path / "m.jsonl"), read_metrics(base / "metrics.jsonl"), [5, 6, 7, 8])


def test_shampoo_reinitialises_its_factors_with_one_warning(tmp_path):
    base = tmp_path / "base"
    flags = TINY + ["--mock-data", "--train-iters", "6", "--optimizer", "shampoo",
                    "--dshampooadamw-precondition-freq", "2", "--dshampooadamw-eps", "1e-6"]
    run_trainer(flags + ["--save", str(base), "--save-interval", "4"])
    run_dir = native_dir(tmp_path / "run", base / "global_step4")
    out = convert([str(run_dir)])  # a run directory: its latest checkpoint, into <tag>_universal beside it
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run_dir / "latest_universal").read_text() == "global_step4_universal"
    assert "not carried (the optimizer re-creates them on load): matrices" in out.stdout
    proc = run_trainer(flags + ["--load", str(run_dir), "--universal-checkpoint",
                                "--metrics-file", str(tmp_path / "m.jsonl")])
    warnings = [l for l in proc.stdout.splitlines() if "shampoo" in l and "re-initialised" in l]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ")
    resumed, ref = losses(tmp_path / "m.jsonl"), losses(base / "metrics.jsonl")
    assert sorted(resumed) == [5, 6]
    assert abs(resumed[5] - ref[5]) <= TOL  # weights and element-wise state loaded
    assert abs(resumed[6] - ref[6]) < 0.05  # the step without the old preconditioners stays close


@pytest.mark.slow
def test_choose_checkpoint_prefers_the_runs_own_newer_native_checkpoint(dp2, tmp_path):
    from megatron_ext.training.checkpoint_loading import choose_checkpoint

    load = tmp_path / "load"
    load.mkdir()
    for name in ("global_step4_universal", "latest_universal"):
        (load / name).symlink_to(dp2.uni / name)
    (load / "global_step8").symlink_to(dp2.base / "global_step8")
    (load / "latest").write_text("global_step8")
    args = lambda dp, stage, tp=1: types.SimpleNamespace(  # noqa: E731
        load=str(load), universal_checkpoint=True, tensor_model_parallel_size=tp, data_parallel_size=dp,
        zero_stage=stage)
    said = []
    # at the saving layout (DP=2, ZeRO 1 or 2) the newer native checkpoint is the run's progress
    assert choose_checkpoint(args(2, 2), load_optim=True, say=said.append) == ("global_step8", False)
    assert said and "global_step8" in said[0]
    # at another DP size it cannot load its optimizer partitions: the universal one
    assert choose_checkpoint(args(1, 1), load_optim=True, say=said.append) == ("global_step4_universal", True)
    assert choose_checkpoint(args(1, 1, tp=2), load_optim=False) == ("global_step4_universal", True)
    no_flag = types.SimpleNamespace(load=str(load), universal_checkpoint=False)
    assert choose_checkpoint(no_flag, load_optim=True) == ("global_step8", False)


def bad_run(args):
    proc = run_trainer(TINY + ITERS + args, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [l for l in error_lines(proc.stderr) if "error" in l.lower()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_shape_mismatch_names_the_first_tensor_and_both_shapes(dp2):
    want = "decoder.layers.0.mlp.linear_fc1.weight: shape (384, 64) in the checkpoint, (512, 64) in the model"
    line = bad_run(["--ffn-hidden-size", "256", "--load", str(dp2.uni), "--universal-checkpoint"])
    assert want in line and "global_step4_universal" in line
    line = bad_run(["--ffn-hidden-size", "256", "--load", str(dp2.base), "--no-load-optim"])
    assert want in line and "global_step8" in line


@pytest.mark.slow
def test_native_checkpoint_at_another_layout_points_to_conversion(dp2):
    line = bad_run(["--load", str(dp2.base)])  # DP=2 ZeRO-1 optimizer partitions, loaded at DP=1
    assert "data-parallel size 2" in line and "megatron-ext to-universal" in line and "--no-load-optim" in line
    line = bad_run(["--load", str(dp2.base), "--universal-checkpoint"])  # nothing converted there
    assert "latest_universal" in line and "megatron-ext to-universal" in line
    line = bad_run(["--load", str(dp2.uni), "--universal-checkpoint", "--zero-stage", "0"])
    assert "--universal-checkpoint needs --zero-stage 1 or 2" in line


@pytest.mark.parametrize("case", ["no input", "missing folder", "not a checkpoint", "unreadable", "zero 0",
                                  "output exists", "output inside input"])
@pytest.mark.slow
def test_converter_bad_input_is_one_line_and_writes_nothing(case, dp2, tmp_path):
    junk, z0 = tmp_path / "junk", tmp_path / "z0"
    junk.mkdir()
    (junk / "mp_rank_00_model_states.pt").write_text("not a checkpoint")
    z0.mkdir()
    torch.save({"module": {}, "args": {"zero_stage": 0}, "iteration": 3}, z0 / "mp_rank_00_model_states.pt")
    (tmp_path / "taken").mkdir()
    args, culprit = {
        "no input": ([], "nothing to convert"),
        "missing folder": (["--input_folder", str(tmp_path / "nope")], "nope: no such directory"),
        "not a checkpoint": ([str(tmp_path / "taken")], "not a checkpoint"),
        "unreadable": (["--input_folder", str(junk)], "cannot read"),
        "zero 0": (["--input_folder", str(z0)], "--zero-stage 0"),
        "output exists": (["--input_folder", str(dp2.base / "global_step4"), "--output_folder", str(tmp_path / "taken")],
                          "already exists"),
        "output inside input": (["--input_folder", str(dp2.base / "global_step4"), "--output_folder",
                                 str(dp2.base / "global_step4" / "u")], "inside the input checkpoint"),
    }[case]
    before = tree_digest(tmp_path), tree_digest(dp2.base)
    proc = convert(args)
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and culprit in lines[0], proc.stderr
    assert proc.stdout == ""
    assert (tree_digest(tmp_path), tree_digest(dp2.base)) == before
