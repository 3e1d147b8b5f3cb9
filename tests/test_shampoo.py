"""Shampoo with Adam grafting: the update against a direct float64 evaluation (with and without
blocking), and the real trainer under ZeRO 0/1, DP=2 and TP=2, with exact resume."""
import pytest
import torch

from conftest import TINY, assert_same_run, error_lines, layouts, read_metrics, run_metrics, run_trainer
from megatron_ext.optimizers.shampoo import Shampoo


def reference_steps(w, grads, lr, wd, b1, b2, bg, eps, eps_g, max_dim):
    """Shampoo + Adam grafting written out directly in float64, preconditioning from step 1."""
    w = w.double().clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    rows, cols = w.shape
    spans = [(r, min(r + max_dim, rows), c, min(c + max_dim, cols))
             for r in range(0, rows, max_dim) for c in range(0, cols, max_dim)]
    L = {s: torch.zeros(s[1] - s[0], s[1] - s[0], dtype=torch.float64) for s in spans}
    R = {s: torch.zeros(s[3] - s[2], s[3] - s[2], dtype=torch.float64) for s in spans}

    def root(a):
        e, q = torch.linalg.eigh(a)
        return q @ torch.diag((e.clamp(min=0) + eps) ** -0.25) @ q.T

    for t, g in enumerate(grads, 1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = bg * v + (1 - bg) * g * g
        m_hat = m / (1 - b1 ** t)
        graft = m_hat / ((v / (1 - bg ** t)).sqrt() + eps_g)
        update = torch.empty_like(w)
        for s in spans:
            r0, r1, c0, c1 = s
            gb = g[r0:r1, c0:c1]
            L[s] = b2 * L[s] + (1 - b2) * gb @ gb.T
            R[s] = b2 * R[s] + (1 - b2) * gb.T @ gb
            p = root(L[s] / (1 - b2 ** t)) @ m_hat[r0:r1, c0:c1] @ root(R[s] / (1 - b2 ** t))
            update[r0:r1, c0:c1] = p * graft[r0:r1, c0:c1].norm() / p.norm()
        w = w * (1 - lr * wd) - lr * update
    return w


@pytest.mark.parametrize("shape, max_dim", [((6, 4), 8192), ((6, 5), 4)])
def test_two_steps_equal_a_direct_evaluation(shape, max_dim):
    torch.manual_seed(0)
    w0 = torch.randn(*shape, dtype=torch.float64)
    grads = [torch.randn(*shape, dtype=torch.float64) for _ in range(2)]
    p = torch.nn.Parameter(w0.clone())
    opt = Shampoo([{"params": [p], "use_matrix": True}], lr=0.1, weight_decay=0.01, betas=(0.9, 0.99), eps=1e-6,
                  grafting_beta2=0.999, grafting_eps=1e-8, max_preconditioner_dim=max_dim,
                  precondition_frequency=1, start_preconditioning_step=1)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = reference_steps(w0, grads, 0.1, 0.01, 0.9, 0.99, 0.999, 1e-6, 1e-8, max_dim)
    torch.testing.assert_close(p.data, expected, rtol=1e-9, atol=1e-10)
    n_blocks = len(opt.state[p]["matrix"]["L"])
    assert n_blocks == (1 if max_dim > 6 else 4)


def test_grafting_only_before_preconditioning_starts():
    torch.manual_seed(1)
    w0, g = torch.randn(5, 3), torch.randn(5, 3)
    p = torch.nn.Parameter(w0.clone())
    p.grad = g.clone()
    opt = Shampoo([{"params": [p], "use_matrix": True}], lr=0.1, precondition_frequency=10)
    opt.step()  # step 1 < start (10): the Adam direction, m_hat / (sqrt(v_hat) + eps) = sign-like
    torch.testing.assert_close(p.data, w0 - 0.1 * g / (g.abs() + 1e-8), rtol=1e-6, atol=1e-7)
    assert opt.state[p]["matrix"]["L_root"] == [None]


# eps 1e-6 rather than the default 1e-12: inverse 4th roots of near-singular factors amplify the
# rounding of a different reduction order (DP, TP) to ~1e-4 in four steps; with 1e-6 they agree to 1e-7.
STEPS = TINY + ["--mock-data", "--train-iters", "4", "--global-batch-size", "4", "--lr", "1e-2", "--optimizer",
                "shampoo", "--dshampooadamw-precondition-freq", "1", "--dshampooadamw-start-preconditioning-step", "1",
                "--dshampooadamw-eps", "1e-6"]


@pytest.fixture(scope="module")
def zero0(tmp_path_factory):
    path = tmp_path_factory.mktemp("sh") / "m.jsonl"
    run_trainer(STEPS + ["--micro-batch-size", "4", "--zero-stage", "0", "--metrics-file", str(path)])
    return read_metrics(path)


@pytest.mark.parametrize("name, extra, nproc", layouts("zero1", "dp2-zero1", "tp2"))
def test_engine_settings_match_zero0(tmp_path, zero0, name, extra, nproc):
    m, _ = run_metrics(STEPS + extra, tmp_path / "m.jsonl", nproc)
    assert_same_run(m, zero0, (1, 2, 3, 4), rel=1e-5, name=name)
    assert m[4]["lm_loss"] < m[1]["lm_loss"] - 0.1


def test_resume_is_exact(tmp_path):
    ck = tmp_path / "ck"
    common = STEPS + ["--micro-batch-size", "4", "--zero-stage", "1"]
    run_trainer(common + ["--save", str(ck), "--load", str(ck), "--save-interval", "2", "--exit-interval", "2"])
    run_trainer(common + ["--save", str(ck), "--load", str(ck), "--save-interval", "2"])
    full = tmp_path / "full.jsonl"
    run_trainer(common + ["--metrics-file", str(full)])
    resumed, uninterrupted = read_metrics(ck / "metrics.jsonl"), read_metrics(full)
    assert [resumed[i]["lm_loss"] for i in (1, 2, 3, 4)] == [uninterrupted[i]["lm_loss"] for i in (1, 2, 3, 4)]


@pytest.mark.parametrize("extra, message", [
    (["--zero-stage", "3"], "--optimizer shampoo supports --zero-stage 0, 1 and 2, not 3"),
    (["--dshampooadamw-beta2", "1.0"], "--dshampooadamw-beta2 must be in [0, 1)"),
    (["--dshampooadamw-eps", "0"], "--dshampooadamw-eps must be > 0"),
    (["--dshampooadamw-precondition-freq", "0"], "argument --dshampooadamw-precondition-freq"),
])
def test_bad_values_are_one_line(extra, message):
    proc = run_trainer(STEPS + ["--micro-batch-size", "4"] + extra, check=False)
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def test_bf16_tracks_fp32(tmp_path, zero0):
    path = tmp_path / "m.jsonl"
    run_trainer(STEPS + ["--micro-batch-size", "4", "--zero-stage", "1", "--bf16", "--metrics-file", str(path)])
    m = read_metrics(path)
    assert m[4]["lm_loss"] == pytest.approx(zero0[4]["lm_loss"], abs=5e-3)
