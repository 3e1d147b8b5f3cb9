"""Every optimizer plug-in in the real trainer (DeepSpeed engine + megatron-core GPT on CPU): loss
falls, save/resume is bit-exact in fp32, schedule-free evaluates (and checkpoints) its averaged
weights under ZeRO 0/1/2 and bf16, SophiaG refreshes a real Hessian estimate on its interval.

To stay fast, the trainer runs in batches: one Python process runs many trainer invocations in a
row (``python tests/test_optimizer_training.py PLAN.json``; after the first, a run costs well under
a second instead of ~6 s of imports). Interrupted runs and their resumptions are in DIFFERENT
processes (phase 1 and phase 2), as in real use.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, TINY, _env, assert_same_run, layouts, read_metrics, run_metrics, run_trainer

ITERS, HALF = 12, 6

# name -> (lr, extra flags). ZeRO 1 is the trainer's default.
OPTIMIZERS = {
    "adam": ("3e-3", []),
    "sgd": ("0.5", ["--sgd-nesterov"]),
    "lion": ("1e-3", []),
    "adopt": ("1e-2", []),
    "lamb": ("2e-2", []),
    "adamwschedulefree": ("5e-3", []),
    "sgdschedulefree": ("2.0", []),
    "sophiag": ("3e-3", ["--sophiag-hessian-interval", "2"]),
}
BASE = TINY + ["--mock-data", "--lr-decay-style", "constant", "--eval-iters", "2"]


def _flags(opt, lr, extra, out, **kw):
    flags = BASE + ["--optimizer", opt, "--lr", lr, "--train-iters", str(kw.pop("iters", ITERS)),
                    "--metrics-file", os.path.join(out, "metrics.jsonl")] + extra
    for key, value in kw.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def plan(root):
    """(phase 1 runs, phase 2 runs, directories); a run is (name, argv)."""
    p1, p2, dirs = [], [], {}

    def d(name):
        dirs[name] = os.path.join(root, name)
        return dirs[name]

    def resume_triplet(tag, opt, lr, extra):
        # A: uninterrupted, no evaluation or save before the end. P: evaluates and saves at HALF,
        # stops. R (another process): resumes P to the end.
        p1.append((f"{tag}/A", _flags(opt, lr, extra, d(f"{tag}/A"), eval_interval=1000, save=dirs[f"{tag}/A"])))
        p1.append((f"{tag}/P", _flags(opt, lr, extra, d(f"{tag}/P"), eval_interval=HALF, save=dirs[f"{tag}/P"],
                                     save_interval=HALF, exit_interval=HALF)))
        p2.append((f"{tag}/R", _flags(opt, lr, extra, d(f"{tag}/R"), eval_interval=HALF, load=dirs[f"{tag}/P"],
                                     save=dirs[f"{tag}/R"])))

    for opt, (lr, extra) in OPTIMIZERS.items():
        resume_triplet(opt, opt, lr, extra)
    # Schedule-free under the other ZeRO stages (ZeRO 1 above), and in bf16.
    for z in (0, 2):
        resume_triplet(f"adamwschedulefree-z{z}", "adamwschedulefree", "5e-3", ["--zero-stage", str(z)])
    for z in (0, 1):
        tag = f"adamwschedulefree-bf16-z{z}"
        p1.append((f"{tag}/P", _flags("adamwschedulefree", "5e-3", ["--bf16", "--zero-stage", str(z)], d(f"{tag}/P"),
                                     iters=HALF, eval_interval=1000, save=dirs[f"{tag}/P"])))
    # Evaluation of a checkpoint's module weights alone: AdamW with lr 0 after --finetune (weights
    # only) changes nothing, so its final validation loss is the loss of exactly those weights.
    for tag in ("adamwschedulefree", "adamwschedulefree-z0", "adamwschedulefree-z2", "sgdschedulefree",
                "adamwschedulefree-bf16-z0", "adamwschedulefree-bf16-z1"):
        bf16 = ["--bf16", "--zero-stage", "0"] if "bf16" in tag else ["--zero-stage", "0"]
        p2.append((f"{tag}/B", _flags("adamw", "0", bf16 + ["--weight-decay", "0", "--finetune"], d(f"{tag}/B"),
                                     iters=1, eval_interval=1000, load=dirs[f"{tag}/P"])))
    # SophiaG's Hessian: interval 2, a checkpoint after every iteration (ZeRO 0); the first estimate
    # with tight gradient clipping and under ZeRO 1 and 2.
    soph = ["--sophiag-hessian-interval", "2"]
    p1.append(("hess/z0", _flags("sophiag", "3e-3", soph + ["--zero-stage", "0"], d("hess/z0"), iters=4,
                                 eval_interval=1000, save=dirs["hess/z0"], save_interval=1)))
    p1.append(("hess/clip", _flags("sophiag", "3e-3", soph + ["--zero-stage", "0", "--clip-grad", "1e-4"],
                                   d("hess/clip"), iters=1, eval_interval=1000, save=dirs["hess/clip"])))
    for z in (1, 2, 3):
        p1.append((f"hess/zero{z}", _flags("sophiag", "3e-3", soph + ["--zero-stage", str(z)], d(f"hess/zero{z}"),
                                         iters=1, eval_interval=1000, save=dirs[f"hess/zero{z}"])))
    # SophiaG, Hessian every step: the tensor-parallel run (in its test) must match this one.
    p1.append(("tp/1", _flags("sophiag", "3e-3", TP_FLAGS, d("tp/1"), iters=2, eval_interval=1000, save=dirs["tp/1"])))
    # ... and the data-parallel run must match this one (the same 4 samples as 2 accumulated micro-batches)
    p1.append(("dp/1", _flags("sophiag", "3e-3", TP_FLAGS + ["--global-batch-size", "4"], d("dp/1"), iters=2,
                              eval_interval=1000, save=dirs["dp/1"])))
    return p1, p2, dirs


TP_FLAGS = ["--sophiag-hessian-interval", "1", "--zero-stage", "1"]


def _run_phase(runs, path):
    with open(path, "w") as f:
        json.dump(runs, f)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), path], capture_output=True, text=True,
                          env=_env(), timeout=900, cwd=REPO)
    with open(path + ".out") as f:
        return json.load(f), proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("optimizer_runs"))
    p1, p2, dirs = plan(root)
    status1, proc1 = _run_phase(p1, os.path.join(root, "phase1.json"))
    status2, proc2 = _run_phase(p2, os.path.join(root, "phase2.json"))
    status = {**status1, **status2}
    log = proc1.stdout[-2000:] + proc1.stderr[-4000:] + proc2.stdout[-2000:] + proc2.stderr[-4000:]
    return dirs, status, log


def _ok(runs_, *names):
    dirs, status, log = runs_
    for name in names:
        assert status.get(name) == "ok", f"run {name}: {status.get(name)}\n{log}"
    return dirs


def _metrics(dirs, name, split="train"):
    return read_metrics(os.path.join(dirs[name], "metrics.jsonl"), split)


# -- every optimizer ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_short_run_decreases_loss(runs, opt):
    dirs = _ok(runs, f"{opt}/A")
    train = _metrics(dirs, f"{opt}/A")
    first = train[1]["lm_loss"]  # the untrained model: ~ln(vocab)
    final = _metrics(dirs, f"{opt}/A", "validation")[ITERS]["lm_loss"]
    assert final < first - 0.1, (opt, first, final)


@pytest.mark.slow
@pytest.mark.parametrize("tag", list(OPTIMIZERS) + ["adamwschedulefree-z0", "adamwschedulefree-z2"])
def test_resume_reproduces_uninterrupted_run_exactly(runs, tag):
    dirs = _ok(runs, f"{tag}/A", f"{tag}/P", f"{tag}/R")
    a, p, r = (_metrics(dirs, f"{tag}/{x}") for x in "APR")
    assert sorted(p) == list(range(1, HALF + 1)) and sorted(r) == list(range(HALF + 1, ITERS + 1))
    for it in range(1, ITERS + 1):
        # fp32: bit-identical, although P evaluated and saved (and R restarted) at HALF and A did not
        assert a[it]["lm_loss"] == (p if it <= HALF else r)[it]["lm_loss"], (tag, it)
    va, vr = _metrics(dirs, f"{tag}/A", "validation"), _metrics(dirs, f"{tag}/R", "validation")
    assert va[ITERS]["lm_loss"] == vr[ITERS]["lm_loss"]
    # and the final weights and optimizer state are bit-identical
    import torch

    (sa, ma), (sr, mr) = (optimizer_state(os.path.join(dirs[f"{tag}/{x}"], f"global_step{ITERS}")) for x in "AR")
    assert sorted(ma) == sorted(mr)
    for name in ma:
        if isinstance(ma[name], torch.Tensor):
            assert torch.equal(ma[name], mr[name]), (tag, name)
    assert sa["state"].keys() == sr["state"].keys()
    for i in sa["state"]:
        for key, value in sa["state"][i].items():
            other = sr["state"][i][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (tag, i, key)


# -- schedule-free: evaluation and checkpoints use the averaged weights -------------------------
def _load(path):
    import torch

    return torch.load(path, weights_only=False, map_location="cpu")


def optimizer_state(ckpt):
    """(base optimizer state_dict, module state_dict) of a single-rank DeepSpeed checkpoint."""
    zero3 = os.path.join(ckpt, "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    if not os.path.exists(os.path.join(ckpt, "mp_rank_00_model_states.pt")):  # ZeRO 3: partitioned module too
        return _load(zero3)["optimizer_state_dict"]["optimizer_state_dict"], None
    model = _load(os.path.join(ckpt, "mp_rank_00_model_states.pt"))
    for prefix in ("", "bf16_"):  # ZeRO 1/2; DeepSpeed's BF16 optimizer (bf16 + ZeRO 1)
        zero = os.path.join(ckpt, f"{prefix}zero_pp_rank_0_mp_rank_00_optim_states.pt")
        if os.path.exists(zero):
            return _load(zero)["optimizer_state_dict"]["base_optimizer_state"], model["module"]
    opt = model["optimizer"]
    return opt.get("optimizer_state_dict", opt), model["module"]


def _group_tensors(state, group, key):
    import torch

    return torch.cat([state["state"][i][key].flatten().float() for i in group["params"]])


@pytest.mark.slow
@pytest.mark.parametrize("tag", ["adamwschedulefree", "adamwschedulefree-z0", "adamwschedulefree-z2",
                                 "sgdschedulefree", "adamwschedulefree-bf16-z0", "adamwschedulefree-bf16-z1"])
def test_schedulefree_evaluates_and_saves_the_averaged_weights(runs, tag):
    """The checkpoint's model weights are the average x (not the training point y, which the
    checkpoint keeps in the optimizer state), and the validation loss the trainer logged is the
    loss of exactly those weights - under ZeRO 0/1/2 (master != model tensors) and bf16."""
    import torch

    dirs = _ok(runs, f"{tag}/P", f"{tag}/B")
    ckpt = os.path.join(dirs[f"{tag}/P"], f"global_step{HALF}")
    state, module = optimizer_state(ckpt)
    moved = 0.0
    for group in state["param_groups"]:
        assert group["train_mode"] is False  # saved in eval mode
        beta = group["betas"][0] if "betas" in group else group["momentum"]
        x = torch.cat([module[n].flatten().float() for n in group["param_names"]])
        y = _group_tensors(state, group, "train_weights")[: x.numel()]
        z = _group_tensors(state, group, "z")[: x.numel()]
        # schedule-free keeps y = beta*x + (1-beta)*z: the average x from the fp32 state ...
        x_true = (y - (1 - beta) * z) / beta
        # ... is what the model holds (bf16: x rounded to bf16, relative error <= 2^-9)
        rtol, atol = (2.0**-8, 1e-7) if "bf16" in tag else (1e-5, 1e-7)
        assert torch.allclose(x, x_true, rtol=rtol, atol=atol), (tag, group["role"], float((x - x_true).abs().max()))
        moved = max(moved, float((y - x_true).abs().max()))
    assert moved > 1e-4, moved  # x and y really differ, so evaluating y would be a different loss
    logged = _metrics(dirs, f"{tag}/P", "validation")[HALF]["lm_loss"]
    direct = _metrics(dirs, f"{tag}/B", "validation")[1]["lm_loss"]
    assert logged == pytest.approx(direct, rel=1e-6, abs=1e-6), (logged, direct)


# -- SophiaG: a real Hessian estimate on its interval -------------------------------------------
def _hessian(ckpt):
    import torch

    state, _ = optimizer_state(ckpt)
    h = torch.cat([s["hessian"].flatten().double() for s in state["state"].values() if "hessian" in s])
    return h, state["param_groups"][0]


@pytest.mark.slow
def test_sophiag_hessian_refreshes_on_its_interval_only(runs):
    dirs = _ok(runs, "hess/z0")
    hs = {it: _hessian(os.path.join(dirs["hess/z0"], f"global_step{it}")) for it in (1, 2, 3, 4)}
    # interval 2: passes before the steps of iterations 1 and 3 (optimizer steps 0 and 2)
    assert [hs[it][1]["hessian_updates"] for it in (1, 2, 3, 4)] == [1, 1, 2, 2]
    assert [hs[it][1]["step"] for it in (1, 2, 3, 4)] == [1, 2, 3, 4]
    h1, h2, h3, h4 = (hs[it][0] for it in (1, 2, 3, 4))
    assert h1.abs().sum() > 0 and (h1 >= 0).all()
    assert __import__("torch").equal(h1, h2) and __import__("torch").equal(h3, h4)
    assert not __import__("torch").equal(h2, h3)


@pytest.mark.slow
def test_sophiag_hessian_ignores_gradient_clipping_and_zero_partitioning(runs):
    """The first estimate is the same with --clip-grad 1e-4 (clipping is off for the Hessian pass)
    and under ZeRO 1/2/3 (flat 1-D partitions) as under ZeRO 0."""
    dirs = _ok(runs, "hess/z0", "hess/clip", "hess/zero1", "hess/zero2", "hess/zero3")
    ref = _hessian(os.path.join(dirs["hess/z0"], "global_step1"))[0]
    clipped = _hessian(os.path.join(dirs["hess/clip"], "global_step1"))[0]
    assert __import__("torch").allclose(clipped, ref, rtol=1e-5, atol=0)
    for z in (1, 2, 3):
        h = _hessian(os.path.join(dirs[f"hess/zero{z}"], "global_step1"))[0]
        assert float(h.sum()) == pytest.approx(float(ref.sum()), rel=1e-5)
        assert float(h.pow(2).sum()) == pytest.approx(float(ref.pow(2).sum()), rel=1e-4)


def _role_hessian_sums(ckpt, mp_rank, dp_rank=0):
    path = os.path.join(ckpt, f"zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_optim_states.pt")
    state = _load(path)["optimizer_state_dict"]["base_optimizer_state"]
    return {g["role"]: float(sum(state["state"][i]["hessian"].double().sum() for i in g["params"]))
            for g in state["param_groups"]}


@pytest.mark.slow
def test_sophiag_hessian_pass_with_tensor_parallelism_matches_single_process(runs, tmp_path):
    """TP=2 shards the vocabulary: labels are sampled from the full softmax, identically on both
    shards, so the Hessian estimate (summed over the shards) and the losses match TP=1."""
    dirs = _ok(runs, "tp/1")
    out = str(tmp_path / "tp2")
    run_trainer(_flags("sophiag", "3e-3", TP_FLAGS + ["--tensor-model-parallel-size", "2"], out, iters=2,
                       eval_interval=1000, save=out), nproc=2)
    ref = _role_hessian_sums(os.path.join(dirs["tp/1"], "global_step2"), 0)
    shards = [_role_hessian_sums(os.path.join(out, "global_step2"), r) for r in (0, 1)]
    assert set(ref) == set(shards[0]) and "norm" in ref and "hidden" in ref
    for role, total in ref.items():
        assert total > 0
        if role in ("norm", "final_norm"):  # replicated on both tensor-parallel ranks
            # squared per-element gradients of the small norm gains amplify TP's other reduction order
            assert shards[0][role] == pytest.approx(total, rel=1e-3) and shards[1][role] == pytest.approx(total, rel=1e-3)
        else:  # split between them
            assert shards[0][role] + shards[1][role] == pytest.approx(total, rel=1e-4), role
    a, b = _metrics(dirs, "tp/1"), read_metrics(os.path.join(out, "metrics.jsonl"))
    for it in (1, 2):
        assert b[it]["lm_loss"] == pytest.approx(a[it]["lm_loss"], rel=1e-5)


@pytest.mark.slow
def test_sophiag_hessian_pass_with_data_parallelism_matches_single_process(runs, tmp_path):
    """DP=2 (ZeRO 1 partitions the Hessian between the ranks) against 1 process accumulating the
    same 2 micro-batches: labels are drawn per place in the global batch, so the estimate matches."""
    dirs = _ok(runs, "dp/1")
    out = str(tmp_path / "dp2")
    run_trainer(_flags("sophiag", "3e-3", TP_FLAGS + ["--global-batch-size", "4"], out, iters=2,
                       eval_interval=1000, save=out), nproc=2)
    ref = _role_hessian_sums(os.path.join(dirs["dp/1"], "global_step2"), 0)
    parts = [_role_hessian_sums(os.path.join(out, "global_step2"), 0, r) for r in (0, 1)]
    for role, total in ref.items():
        assert total > 0 and parts[0][role] + parts[1][role] == pytest.approx(total, rel=1e-4), role
    a, b = _metrics(dirs, "dp/1"), read_metrics(os.path.join(out, "metrics.jsonl"))
    for it in (1, 2):
        assert b[it]["lm_loss"] == pytest.approx(a[it]["lm_loss"], rel=1e-5)


# -- the batch driver ---------------------------------------------------------------------------
def _drive(plan_path):
    """Run every (name, argv) of the plan in this process; record 'ok' or the failure."""
    import traceback

    from megatron_ext.train import run

    with open(plan_path) as f:
        runs_ = json.load(f)
    status = {}
    for name, argv in runs_:
        print(f"=== {name}: {' '.join(argv)}", flush=True)
        try:
            code = run(argv)
            status[name] = "ok" if code == 0 else f"exit {code}"
        except SystemExit as e:
            status[name] = f"exit {e.code}"
        except Exception:
            status[name] = traceback.format_exc()[-3000:]
            print(status[name], flush=True)
    with open(plan_path + ".out", "w") as f:
        json.dump(status, f)


if __name__ == "__main__":
    _drive(sys.argv[1])


LAMB_STEPS = TINY + ["--mock-data", "--train-iters", "4", "--global-batch-size", "4", "--lr", "2e-2",
                     "--optimizer", "lamb", "--eval-iters", "0"]


@pytest.mark.parametrize("name, extra, nproc", layouts("zero1", "dp2-zero1", "dp2-zero2", "tp2-zero1"))
def test_lamb_per_tensor_trust_ratios_under_zero_match_zero0(tmp_path, name, extra, nproc):
    """ZeRO 1/2 flatten the groups; the trust ratio must still be per tensor (norms completed
    across the data- and tensor-parallel ranks), so every setting reproduces ZeRO 0."""
    a, _ = run_metrics(LAMB_STEPS + ["--zero-stage", "0", "--micro-batch-size", "4"], tmp_path / "z0.jsonl")
    b, _ = run_metrics(LAMB_STEPS + extra, tmp_path / "m.jsonl", nproc)
    assert_same_run(b, a, (2, 3, 4), rel=1e-5, name=name)
