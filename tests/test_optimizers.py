"""Optimizer plug-ins without the trainer: their flags parse (Megatron-DeepSpeed spellings), bad
values give one-line errors, ``megatron-ext list -v`` shows them, and one step on fixed gradients
equals a direct evaluation of each published update. The optimizers are built through the registry
from parsed flags, so the flags really reach the update."""
import contextlib
import copy
import io

import pytest
import torch

from conftest import TINY, error_lines, run_module
from megatron_ext.plan import parse_args
from megatron_ext.optimizers import OPTIMIZERS

BASE = ["--mock-data", "--train-iters", "10"]
ADDED = ["adam", "sgd", "lion", "adopt", "lamb", "adamwschedulefree", "sgdschedulefree", "sophiag"]


def build(name, *flags, shapes=((3, 4),), seed=0):
    """(optimizer, params, args): the plug-in's optimizer over fresh params, one group per tensor,
    with lr / weight decay set as the LR scheduler sets them."""
    args = parse_args(BASE + ["--optimizer", name, *flags], world_size=1)
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
    groups = [{"params": [p], "lr_mult": 1.0, "wd_mult": 1.0, "role": "hidden"} for p in params]
    opt = OPTIMIZERS.get(args.optimizer).obj(groups, args)
    for g in opt.param_groups:
        g["lr"], g["weight_decay"] = args.lr, args.weight_decay
    return opt, params, args


def grads(params, seed):
    gen = torch.Generator().manual_seed(1000 + seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return [p.grad.clone() for p in params]


def step(opt, params, seed):
    g = grads(params, seed)
    opt.step()
    return g


# -- flags ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, attrs", [
    (["--optimizer", "adam", "--adam-beta1", "0.8", "--adam-eps", "1e-6"], dict(optimizer="adam", adam_beta1=0.8, adam_eps=1e-6)),
    (["--optimizer", "sgd", "--sgd-momentum", "0.5", "--sgd-nesterov"], dict(optimizer="sgd", sgd_momentum=0.5, sgd_nesterov=True)),
    (["--optimizer", "apex.sgd"], dict(optimizer="sgd", sgd_nesterov=False, sgd_momentum=0.9)),
    (["--optimizer", "lion", "--lion-beta1", "0.95", "--lion-beta2", "0.98"], dict(optimizer="lion", lion_beta1=0.95, lion_beta2=0.98)),
    (["--optimizer", "adopt", "--adopt-beta2", "0.999", "--adopt-clip-exponent", "-1",
      "--no-adopt-decoupled-weight-decay"], dict(optimizer="adopt", adopt_beta2=0.999, adopt_clip_exponent=-1.0,
                                                 adopt_decoupled_weight_decay=False)),
    (["--optimizer", "ds.fusedlamb", "--zero-stage", "0", "--lamb-max-coeff", "5", "--no-lamb-bias-correction"],
     dict(optimizer="lamb", lamb_max_coeff=5.0, lamb_bias_correction=False)),
    (["--optimizer", "adamwschedulefree", "--schedulefree-warmup-steps", "5", "--schedulefree-r", "1",
      "--no-schedulefree-for-each"], dict(optimizer="adamwschedulefree", schedulefree_warmup_steps=5,
                                          schedulefree_r=1.0, schedulefree_for_each=False)),
    (["--optimizer", "sfadamw"], dict(optimizer="adamwschedulefree", schedulefree_weight_lr_power=2.0)),
    (["--optimizer", "sgdschedulefree", "--sgd-momentum", "0.8"], dict(optimizer="sgdschedulefree", sgd_momentum=0.8)),
    (["--optimizer", "schedulefree_sgd"], dict(optimizer="sgdschedulefree")),
    (["--optimizer", "SophiaG", "--sophiag_beta1", "0.96", "--sophiag-beta2", "0.99", "--sophiag-rho", "0.04",
      "--sophiag-hessian-interval", "3"], dict(optimizer="sophiag", sophiag_beta1=0.96, sophiag_beta2=0.99,
                                              sophiag_rho=0.04, sophiag_hessian_interval=3)),
])
def test_flags_parse(argv, attrs):
    args = parse_args(BASE + argv, world_size=1)
    for key, value in attrs.items():
        assert getattr(args, key) == value, key


def test_megatron_deepspeed_defaults():
    a = parse_args(BASE + ["--optimizer", "sophiag"], world_size=1)
    assert (a.sophiag_beta1, a.sophiag_beta2, a.sophiag_rho, a.sophiag_hessian_interval) == (0.9, 0.95, 0.01, 10)
    assert parse_args(BASE + ["--optimizer", "sgd"], world_size=1).sgd_momentum == 0.9


@pytest.mark.parametrize("argv, message", [
    (["--optimizer", "adam", "--adam-beta1", "1.0"], "--adam-beta1 must be in [0, 1), got 1.0"),
    (["--optimizer", "adam", "--adam-eps", "0"], "--adam-eps must be > 0"),
    (["--optimizer", "sgd", "--sgd-momentum", "-0.1"], "--sgd-momentum must be in [0, 1), got -0.1"),
    (["--optimizer", "sgd", "--sgd-momentum", "0", "--sgd-nesterov"], "--sgd-nesterov needs --sgd-momentum > 0"),
    (["--optimizer", "lion", "--lion-beta2", "1.5"], "--lion-beta2 must be in [0, 1), got 1.5"),
    (["--optimizer", "adopt", "--adopt-beta1", "-0.5"], "--adopt-beta1 must be in [0, 1)"),
    (["--optimizer", "adopt", "--adopt-eps", "0"], "--adopt-eps must be > 0"),
    (["--optimizer", "lamb", "--zero-stage", "0", "--adam-beta2", "1"], "--adam-beta2 must be in [0, 1)"),
    (["--optimizer", "lamb", "--zero-stage", "0", "--lamb-min-coeff", "2", "--lamb-max-coeff", "1"],
     "--lamb-min-coeff (2.0) must be >= 0 and <= --lamb-max-coeff (1.0)"),
    (["--optimizer", "lamb", "--zero-stage", "3"], "--optimizer lamb supports --zero-stage 0, 1 and 2, not 3"),
    (["--optimizer", "adamwschedulefree", "--adam-beta1", "0"], "--adam-beta1 must be in (0, 1) for adamwschedulefree"),
    (["--optimizer", "adamwschedulefree", "--schedulefree-warmup-steps", "-1"], "--schedulefree-warmup-steps must be >= 0"),
    (["--optimizer", "adamwschedulefree", "--schedulefree-weight-lr-power", "-2"], "--schedulefree-weight-lr-power must be >= 0"),
    (["--optimizer", "adamwschedulefree", "--zero-stage", "3"], "--optimizer adamwschedulefree supports --zero-stage 0, 1 and 2, not 3"),
    (["--optimizer", "sgdschedulefree", "--sgd-momentum", "0"], "--sgd-momentum must be in (0, 1) for sgdschedulefree"),
    (["--optimizer", "sgdschedulefree", "--zero-stage", "3"], "--optimizer sgdschedulefree supports --zero-stage 0, 1 and 2, not 3"),
    (["--optimizer", "sophiag", "--sophiag-beta1", "1"], "--sophiag-beta1 must be in [0, 1), got 1.0"),
    (["--optimizer", "sophiag", "--sophiag-beta2", "-0.1"], "--sophiag-beta2 must be in [0, 1)"),
    (["--optimizer", "sophiag", "--sophiag-rho", "-0.01"], "--sophiag-rho must be > 0, got -0.01"),
    (["--optimizer", "sophiag", "--sophiag-eps", "0"], "--sophiag-eps must be > 0"),
    (["--optimizer", "sophiag", "--sophiag-hessian-interval", "0"], "--sophiag-hessian-interval must be a positive integer, got 0"),
])
def test_bad_values_give_one_line_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(BASE + argv, world_size=1)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_bad_value_from_the_command_line_stops_before_any_work():
    proc = run_module("megatron_ext.train", TINY + BASE + ["--optimizer", "sophiag", "--sophiag-hessian-interval", "-2"])
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "--sophiag-hessian-interval must be a positive integer, got -2" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "iteration=" not in proc.stdout


def test_list_shows_each_optimizer_with_description_and_flags():
    from megatron_ext.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["list", "-v"]) == 0
    text = out.getvalue()
    for name in ADDED:
        plugin = OPTIMIZERS.get(name)
        line = next(l for l in text.splitlines() if l.strip().startswith(name + " "))
        assert plugin.description in line
        for flag in plugin.flag_names():
            assert f"      {flag} (default" in text, flag
    assert "(aliases: ds.fusedlamb)" in text and "(aliases: apex.sgd)" in text


# -- one step against the published formulas ---------------------------------------------------------
def test_adam_is_l2_coupled_and_differs_from_adamw():
    lr, wd, b1, b2, eps = 0.01, 0.1, 0.9, 0.999, 1e-8
    flags = ["--lr", str(lr), "--weight-decay", str(wd)]
    adam, (p,), _ = build("adam", *flags)
    adamw, (q,), _ = build("adamw", *flags)
    p0 = p.detach().clone()
    (g,) = step(adam, [p], 1)
    step(adamw, [q], 1)
    gl = g + wd * p0  # L2: decay enters the gradient, then the adaptive normalisation
    m, v = (1 - b1) * gl, (1 - b2) * gl * gl
    expected = p0 - lr * (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + eps)
    assert torch.allclose(p.detach(), expected, rtol=1e-6, atol=1e-7)
    m, v = (1 - b1) * g, (1 - b2) * g * g  # AdamW: decay applied to the weights directly
    expected_w = p0 * (1 - lr * wd) - lr * (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + eps)
    assert torch.allclose(q.detach(), expected_w, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(p.detach(), q.detach(), rtol=1e-4, atol=1e-5)


def test_sgd_nesterov_matches_formula():
    lr, wd, mu = 0.1, 0.01, 0.9
    opt, (p,), _ = build("sgd", "--lr", str(lr), "--weight-decay", str(wd), "--sgd-momentum", str(mu), "--sgd-nesterov")
    p0 = p.detach().clone()
    g1 = step(opt, [p], 1)[0] + wd * p0
    b = g1
    p1 = p0 - lr * (g1 + mu * b)
    assert torch.allclose(p.detach(), p1, rtol=1e-6, atol=1e-7)
    g2 = step(opt, [p], 2)[0] + wd * p1
    b = mu * b + g2
    assert torch.allclose(p.detach(), p1 - lr * (g2 + mu * b), rtol=1e-6, atol=1e-7)


def test_lion_matches_formula():
    lr, wd, b1, b2 = 0.01, 0.5, 0.9, 0.99
    opt, (p,), _ = build("lion", "--lr", str(lr), "--weight-decay", str(wd))
    x, m = p.detach().clone(), torch.zeros_like(p)
    for s in range(3):
        g = step(opt, [p], s)[0]
        x = x * (1 - lr * wd) - lr * torch.sign(b1 * m + (1 - b1) * g)
        m = b2 * m + (1 - b2) * g
        assert torch.allclose(p.detach(), x, rtol=1e-6, atol=1e-7), s


@pytest.mark.parametrize("clip_exponent", [0.25, -1.0])
def test_adopt_matches_formula(clip_exponent):
    lr, wd, b1, b2, eps = 0.01, 0.1, 0.9, 0.9999, 1e-6
    opt, (p,), _ = build("adopt", "--lr", str(lr), "--weight-decay", str(wd),
                         "--adopt-clip-exponent", str(clip_exponent), shapes=((5, 7),))
    x, m, v = p.detach().clone(), torch.zeros_like(p), None
    for t in range(1, 5):
        g = step(opt, [p], t)[0]
        x = x * (1 - lr * wd)  # decoupled decay, every step
        if t == 1:
            v = g * g  # the first step only initialises the second moment
        else:
            n = g / torch.clamp(v.sqrt(), min=eps)  # normalised by the PREVIOUS second moment
            if clip_exponent >= 0:
                n = n.clamp(-(t ** clip_exponent), t ** clip_exponent)
            m = b1 * m + (1 - b1) * n
            x = x - lr * m
            v = b2 * v + (1 - b2) * g * g
        assert torch.allclose(p.detach(), x, rtol=1e-5, atol=1e-7), t


def test_adopt_clipping_bites():
    """Same gradients with and without clipping give different steps (the clip is active)."""
    a, (p,), _ = build("adopt", "--lr", "0.01", shapes=((50,),))
    b, (q,), _ = build("adopt", "--lr", "0.01", "--adopt-clip-exponent", "-1", shapes=((50,),))
    for opt, prm in ((a, p), (b, q)):
        prm.grad = torch.full_like(prm, 1e-3)
        opt.step()
        prm.grad = torch.linspace(-1, 1, 50)  # |g|/sqrt(v) up to 1000 >> 2^0.25
        opt.step()
    assert not torch.allclose(p, q)


@pytest.mark.parametrize("flags", [[], ["--no-lamb-bias-correction", "--lamb-max-coeff", "0.5"]])
def test_lamb_matches_formula(flags):
    lr, wd, b1, b2, eps = 0.01, 0.1, 0.9, 0.999, 1e-8
    opt, params, args = build("lamb", "--zero-stage", "0", "--lr", str(lr), "--weight-decay", str(wd), *flags,
                              shapes=((4, 6), (6,)))
    xs = [p.detach().clone() for p in params]
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    for t in (1, 2):
        gs = step(opt, params, t)
        for i, g in enumerate(gs):
            ms[i] = b1 * ms[i] + (1 - b1) * g
            vs[i] = b2 * vs[i] + (1 - b2) * g * g
            c1, c2 = (1 - b1 ** t, 1 - b2 ** t) if args.lamb_bias_correction else (1.0, 1.0)
            u = (ms[i] / c1) / ((vs[i] / c2).sqrt() + eps) + wd * xs[i]
            r = min(max(float(xs[i].norm() / u.norm()), args.lamb_min_coeff), args.lamb_max_coeff)
            xs[i] = xs[i] - lr * r * u
            assert torch.allclose(params[i].detach(), xs[i], rtol=1e-6, atol=1e-7), (t, i)
            assert opt.state[params[i]]["trust_ratio"] == pytest.approx(r, rel=1e-6)


def test_lamb_trust_ratio_is_per_tensor():
    """Scaling one tensor's weights scales its step, not the other tensor's (a per-group or
    flattened ratio would couple them)."""
    opt, (a, b), _ = build("lamb", "--zero-stage", "0", "--lr", "0.01", "--weight-decay", "0", shapes=((8,), (8,)))
    with torch.no_grad():
        a.copy_(torch.ones(8))
        b.copy_(torch.ones(8) * 100)
    a.grad, b.grad = torch.ones(8), torch.ones(8)
    opt.step()
    # a: ratio ||a||/||u|| = sqrt(8)/sqrt(8) = 1; b: ratio 100, clamped to 10 (u = 1 per element)
    assert float(1 - a.detach()[0]) == pytest.approx(0.01, rel=1e-4)
    assert float(100 - b.detach()[0]) == pytest.approx(0.01 * 10, rel=1e-4)


# -- SophiaG --------------------------------------------------------------------------------------
def test_sophiag_step_matches_published_update():
    """Algorithm 3 of Liu et al.: h from a curvature pass = (1-b2) * B * g_hat^2; then
    m = (1-b1) g; p = p(1 - lr wd) - lr clip(m / max(rho h, eps), 1)."""
    lr, wd, b1, b2, rho, B = 0.01, 0.1, 0.9, 0.95, 0.01, 256.0
    opt, (p,), _ = build("sophiag", "--lr", str(lr), "--weight-decay", str(wd), shapes=((6, 5),))
    p0 = p.detach().clone()
    assert opt.curvature_pass_due()
    g_hat = torch.randn(p.shape, generator=torch.Generator().manual_seed(7))
    opt.begin_curvature_pass(B)
    p.grad = g_hat.clone()
    opt.step()
    opt.end_curvature_pass()
    assert torch.equal(p.detach(), p0)  # the curvature pass never moves the weights
    h = (1 - b2) * B * g_hat * g_hat
    assert torch.allclose(opt.state[p]["hessian"], h, rtol=1e-6, atol=0)
    g = step(opt, [p], 8)[0]
    m = (1 - b1) * g
    ratio = (m / torch.clamp(rho * h, min=1e-12)).clamp(-1, 1)
    assert (ratio.abs() < 1).any() and (ratio.abs() == 1).any()  # both regimes exercised
    assert torch.allclose(p.detach(), p0 * (1 - lr * wd) - lr * ratio, rtol=1e-6, atol=1e-8)


def test_sophiag_curvature_pass_due_on_its_interval():
    opt, (p,), _ = build("sophiag", "--sophiag-hessian-interval", "3")
    due = []
    for s in range(7):
        due.append(opt.curvature_pass_due())
        if due[-1]:
            opt.begin_curvature_pass(10.0)
            step(opt, [p], 100 + s)
            opt.end_curvature_pass()
        step(opt, [p], s)
    assert due == [True, False, False, True, False, False, True]
    assert opt.param_groups[0]["hessian_updates"] == 3 and opt.param_groups[0]["step"] == 7


# -- schedule-free: the exact mode switch -------------------------------------------------------------
@pytest.mark.parametrize("name", ["adamwschedulefree", "sgdschedulefree"])
def test_schedulefree_switch_is_exact_and_evaluates_the_average(name):
    lr = "0.01" if name == "adamwschedulefree" else "0.5"
    opt, (p,), _ = build(name, "--lr", lr)
    for s in range(3):
        step(opt, [p], s)
    y = p.detach().clone()
    z = opt.state[p]["z"].clone()
    beta = opt.param_groups[0]["betas"][0] if "betas" in opt.param_groups[0] else opt.param_groups[0]["momentum"]
    assert opt.eval_mode() is True
    assert torch.allclose(p.detach(), (y - (1 - beta) * z) / beta, rtol=1e-5, atol=1e-7)  # x
    saved = copy.deepcopy(opt.state_dict())  # a checkpoint written in eval mode carries y exactly
    assert opt.train_mode() is True
    assert torch.equal(p.detach(), y)  # bit-exact (the library's interpolation alone is not)
    assert opt.train_mode() is False  # already training: nothing to do

    fresh, (q,), _ = build(name, "--lr", lr)
    with torch.no_grad():
        q.copy_(torch.zeros_like(q))  # whatever the model holds: the saved y wins
    fresh.load_state_dict(saved)
    assert fresh.train_mode() is True and torch.equal(q.detach(), y)
    g = grads([p], 9)[0]
    q.grad = g.clone()
    opt.step()
    fresh.step()
    assert torch.equal(p.detach(), q.detach())
