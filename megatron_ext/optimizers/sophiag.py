"""``sophiag``: Sophia with the Gauss-Newton-Bartlett Hessian estimator (Liu et al. 2023,
arXiv 2305.14342, Algorithm 3), written here (no maintained package ships SophiaG;
``pytorch-optimizer``'s ``SophiaH`` is the Hutchinson variant, which needs Hessian-vector
products through the whole model).

Per element, at every training step::

    m = beta1*m + (1-beta1)*g
    p *= 1 - lr*wd                                              (decoupled weight decay)
    p -= lr * clip(m / max(rho*h, eps), -1, 1)

and every ``--sophiag-hessian-interval`` steps (before the step, starting with the first) the
trainer runs a curvature pass (``megatron_ext.training.curvature_pass``): labels sampled
from the model's own softmax, the loss on them back-propagated through the DeepSpeed engine, and
this optimizer's ``step`` then only refreshes ``h = beta2*h + (1-beta2) * B * g_hat**2`` where
``g_hat`` is that gradient and ``B`` the number of loss tokens in the global batch (the estimator
``B * grad(L_hat) (.) grad(L_hat)``). Megatron-DeepSpeed's SophiaG never refreshed ``h``, so it
degenerated to sign momentum; this one does, on its interval and only then.

Element-wise, so exact on DeepSpeed's flat ZeRO 1/2/3 partitions. DeepSpeed's gradient clipping is
switched off for the curvature pass only (clipping would rescale the estimate).
"""
import torch

from megatron_ext.optimizers import OPTIMIZERS
from megatron_ext.optimizers.common.closure import closure_loss
from megatron_ext.optimizers.common.state_memory import OptimizerMemory, constant, elementwise_temporaries
from megatron_ext.optimizers.common.validation import check_betas, check_positive
from megatron_ext.registry import Arg
from megatron_ext.optimizers.common.hooks import UnsupportedEngineSetting, zero_stage

SOPHIAG_ARGS = (
    Arg("--sophiag-beta1", type=float, default=0.9, help="SophiaG momentum (Megatron-DeepSpeed default 0.9)"),
    Arg("--sophiag-beta2", type=float, default=0.95, help="SophiaG Hessian EMA decay (Megatron-DeepSpeed default 0.95)"),
    Arg("--sophiag-rho", type=float, default=0.01, help="SophiaG clipping scale gamma/rho (Megatron-DeepSpeed default 0.01)"),
    Arg("--sophiag-eps", type=float, default=1e-12, help="SophiaG floor of rho*h (paper 1e-12)"),
    Arg("--sophiag-hessian-interval", type=int, default=10,
        help="refresh the Hessian estimate every this many steps (paper k=10)"),
)


def validate_sophiag_args(args):
    check_betas(args, "--sophiag-beta1", "--sophiag-beta2")
    check_positive(args, "--sophiag-rho", "--sophiag-eps")
    if args.sophiag_hessian_interval <= 0:
        raise ValueError(f"--sophiag-hessian-interval must be a positive integer, got {args.sophiag_hessian_interval}")


class SophiaG(torch.optim.Optimizer):
    """State per element: ``exp_avg`` (m), ``hessian`` (h). Per group: ``step`` (training steps
    taken) and ``hessian_updates`` (curvature refreshes), saved with the optimizer state."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.95), rho=0.01, eps=1e-12, weight_decay=0.0,
                 hessian_interval=10):
        defaults = dict(lr=lr, betas=betas, rho=rho, eps=eps, weight_decay=weight_decay,
                        hessian_interval=hessian_interval, step=0, hessian_updates=0)
        super().__init__(params, defaults)
        self._curvature_tokens = None  # set during a curvature pass
        self._refresh_due = False  # an extra curvature pass before the next step (after a universal load)

    # -- hook protocol (megatron_ext.optimizers.common.hooks) ----------------------------------------
    def engine_ready(self, engine):

        # ZeRO 3 steps each param group's sub-groups in turn; the per-group counters assume one.
        sub_groups = getattr(engine.optimizer, "fp16_groups", None)
        if zero_stage(engine) == 3 and sub_groups is not None and len(sub_groups) != len(self.param_groups):
            raise UnsupportedEngineSetting(
                "--optimizer sophiag under ZeRO 3 needs one sub-group per param group; raise "
                "zero_optimization.sub_group_size in the DeepSpeed config"
            )

    def curvature_pass_due(self) -> bool:
        group = self.param_groups[0]
        return self._refresh_due or group["step"] % group["hessian_interval"] == 0

    def begin_curvature_pass(self, num_tokens: float) -> None:
        self._curvature_tokens = float(num_tokens)

    def end_curvature_pass(self) -> None:
        self._curvature_tokens = None
        self._refresh_due = False

    def universal_checkpoint_loaded(self) -> str:
        """DeepSpeed's universal conversion carries ``exp_avg`` but not the Hessian estimate: it
        starts from zero and is refreshed before the next step."""
        for state in self.state.values():
            if "exp_avg" in state and "hessian" not in state:
                state["hessian"] = torch.zeros_like(state["exp_avg"])
        self._refresh_due = True
        return ("sophiag: the universal checkpoint does not carry the Hessian estimate; it was re-initialised "
                "and is refreshed before the next step (momentum was loaded)")

    # -- update -------------------------------------------------------------------------------
    @staticmethod
    def _state(state, p):
        if len(state) == 0:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def update_hessian(self, num_tokens: float) -> None:
        """h = beta2*h + (1-beta2) * B * g^2 from the gradients now in ``p.grad``."""
        for group in self.param_groups:
            beta2 = group["betas"][1]
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                h = self._state(self.state[p], p)["hessian"]
                h.mul_(beta2).addcmul_(p.grad, p.grad, value=(1 - beta2) * num_tokens)
            if params:  # ZeRO 3 steps one group at a time with the others' params emptied
                group["hessian_updates"] += 1

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        if self._curvature_tokens is not None:
            self.update_hessian(self._curvature_tokens)
            return loss
        for group in self.param_groups:
            beta1 = group["betas"][0]
            lr, rho, eps, wd = group["lr"], group["rho"], group["eps"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self._state(self.state[p], p)
                m, h = state["exp_avg"], state["hessian"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                if wd != 0:
                    p.mul_(1 - lr * wd)
                ratio = (m / (rho * h).clamp(min=eps)).clamp_(-1.0, 1.0)
                p.add_(ratio, alpha=-lr)
            if params:
                group["step"] += 1
        return loss


@OPTIMIZERS.register(
    "sophiag",
    description="SophiaG: clipped m/(rho*h) with a Gauss-Newton-Bartlett Hessian EMA refreshed every "
    "--sophiag-hessian-interval steps (own)",
    arguments=SOPHIAG_ARGS,
    validate=validate_sophiag_args,
    # m and h; the update's ratio m / max(rho h, eps) is built in two temporaries
    memory=OptimizerMemory(state=constant(2), workspace=elementwise_temporaries(2, 2), notes="exp_avg and hessian"),
)
def build_sophiag(param_groups, args):
    return SophiaG(
        param_groups,
        lr=args.lr,
        betas=(args.sophiag_beta1, args.sophiag_beta2),
        rho=args.sophiag_rho,
        eps=args.sophiag_eps,
        weight_decay=args.weight_decay,
        hessian_interval=args.sophiag_hessian_interval,
    )
