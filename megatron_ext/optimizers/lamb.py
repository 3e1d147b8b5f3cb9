"""``lamb`` (alias ``ds.fusedlamb``): LAMB (You et al. 2019, arXiv 1904.00962), written here.

Why not a library: DeepSpeed's ``FusedLamb`` (what Megatron-DeepSpeed's ``ds.fusedlamb`` builds)
is a CUDA kernel; ``pytorch-optimizer``'s ``Lamb`` skips bias correction and clamps the weight norm
rather than the trust ratio, so it would not be the update ``ds.fusedlamb`` users run. This one
follows FusedLamb's definition, per parameter tensor, at step t::

    m = beta1*m + (1-beta1)*g          v = beta2*v + (1-beta2)*g^2
    u = (m/(1-beta1^t)) / (sqrt(v/(1-beta2^t)) + eps) + wd*p      (bias correction optional)
    r = ||p|| / ||u||  clamped to [--lamb-min-coeff, --lamb-max-coeff]  (1 if either norm is 0)
    p -= lr * r * u

The trust ratio is a per-TENSOR norm ratio. DeepSpeed ZeRO 1/2 flatten each param group into one
1-D partition per rank, so there the optimizer learns the flat layout (``full_matrices.FlatLayout``,
in the ``engine_ready`` hook): each rank sums the squares of its slice of every tensor, one
all-reduce over the data-parallel group completes the per-tensor norms, and each slice is scaled by
its own tensor's ratio. ZeRO 3 (per-parameter partitioning) is refused. With tensor parallelism a
sharded matrix's norms are taken over the full matrix (all-reduced across the tensor-parallel group).
"""
import argparse

import torch

from megatron_ext.optimizers import OPTIMIZERS
from megatron_ext.optimizers.adamw import ADAM_ARGS, validate_adam_args
from megatron_ext.optimizers.common.closure import closure_loss
from megatron_ext.optimizers.common.full_matrices import flat_layouts, is_tensor_parallel, number_groups
from megatron_ext.optimizers.common.state_memory import TWO_MOMENTS
from megatron_ext.registry import Arg, EngineSupport

LAMB_ARGS = ADAM_ARGS + (
    Arg("--lamb-min-coeff", type=float, default=0.01, help="lower clamp of the LAMB trust ratio (DeepSpeed 0.01)"),
    Arg("--lamb-max-coeff", type=float, default=10.0, help="upper clamp of the LAMB trust ratio (DeepSpeed 10)"),
    Arg("--lamb-bias-correction", action=argparse.BooleanOptionalAction, default=True,
        help="Adam bias correction of m and v (default on, as DeepSpeed's FusedLamb)"),
)

# Per-tensor norms are completed over ZeRO 1/2's flat partitions; ZeRO 3 partitions per parameter.
LAMB_ENGINE = EngineSupport(zero_stages=(0, 1, 2), bf16_optimizer=False,
                            reason="per-tensor trust ratios over ZeRO 3 partitions")


def validate_lamb_args(args):
    validate_adam_args(args)
    if not 0.0 <= args.lamb_min_coeff <= args.lamb_max_coeff:
        raise ValueError(
            f"--lamb-min-coeff ({args.lamb_min_coeff}) must be >= 0 and <= --lamb-max-coeff ({args.lamb_max_coeff})"
        )


class Lamb(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 bias_correction=True, min_coeff=0.01, max_coeff=10.0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, min_coeff=min_coeff, max_coeff=max_coeff)
        super().__init__(params, defaults)
        # Whether each tensor is a tensor-parallel shard, by position: DeepSpeed's bf16/fp16
        # wrappers replace the params by fp32 copies (same order) that lack megatron's attribute.
        self._tp_flags = [[is_tensor_parallel(p) for p in g["params"]] for g in self.param_groups]
        self._tp_group = None
        number_groups(self.param_groups)
        self._layouts = {}  # ZeRO 1/2 flat layouts, by group_index

    # hook protocol (megatron_ext.optimizers.common.hooks)
    def engine_ready(self, engine):
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
            self._tp_group = ps.get_tensor_model_parallel_group()
        self._layouts = flat_layouts(engine, self.param_groups)

    def _flat_ratios(self, layout, p, update, group) -> torch.Tensor:
        """Per-element trust ratios for a ZeRO flat partition: each element gets its tensor's."""
        start = layout.rank * layout.partition_size
        pieces = []  # (entry, local offset, length) of each tensor's part in this partition
        for e in layout.entries:
            lo, hi = max(e.offset, start), min(e.offset + e.numel, start + layout.partition_size)
            pieces.append((e, lo - start, max(0, hi - lo)))
        sq = torch.zeros(len(pieces), 2, dtype=torch.float32, device=p.device)
        for k, (_, off, n) in enumerate(pieces):
            if n:
                sq[k, 0] = p.narrow(0, off, n).float().pow(2).sum()
                sq[k, 1] = update.narrow(0, off, n).float().pow(2).sum()
        if layout.world > 1:
            torch.distributed.all_reduce(sq, group=layout.group)
        if self._tp_group is not None:
            tp = torch.tensor([is_tensor_parallel(e.model_param) for e, _, _ in pieces], device=p.device)
            summed = sq.clone()
            torch.distributed.all_reduce(summed, group=self._tp_group)
            sq = torch.where(tp[:, None], summed, sq)
        norms = sq.sqrt()
        ratios = torch.ones_like(p)
        for k, (_, off, n) in enumerate(pieces):
            w_norm, u_norm = norms[k]
            if n and w_norm > 0 and u_norm > 0:
                ratios.narrow(0, off, n).fill_(float((w_norm / u_norm).clamp(group["min_coeff"], group["max_coeff"])))
        return ratios

    def _norms(self, p, u, tensor_parallel):
        sq = torch.stack([p.float().pow(2).sum(), u.float().pow(2).sum()])
        if tensor_parallel and self._tp_group is not None:
            torch.distributed.all_reduce(sq, group=self._tp_group)
        return sq.sqrt()

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for gi, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            layout = self._layouts.get(group["group_index"])
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                if group["bias_correction"]:
                    c1, c2 = 1 - beta1 ** t, 1 - beta2 ** t
                else:
                    c1 = c2 = 1.0
                update = (m / c1) / ((v / c2).sqrt() + group["eps"])
                if group["weight_decay"] != 0:
                    update.add_(p, alpha=group["weight_decay"])
                if layout is not None:  # ZeRO 1/2: p is this rank's flat partition of the group
                    p.addcmul_(update, self._flat_ratios(layout, p, update, group), value=-group["lr"])
                    continue
                w_norm, u_norm = self._norms(p, update, self._tp_flags[gi][pi])
                if w_norm > 0 and u_norm > 0:
                    ratio = float((w_norm / u_norm).clamp(group["min_coeff"], group["max_coeff"]))
                else:
                    ratio = 1.0
                state["trust_ratio"] = ratio
                p.add_(update, alpha=-group["lr"] * ratio)
        return loss


def lamb_width_lr_exponents(args):
    """muP for LAMB: the trust ratio sets |update| = lr |w|; a hidden matrix's |w|_F grows like
    sqrt(width) under muP's init while Adam's muP update needs entries ~ 1/width, hence lr x m_N^-1/2.
    Other roles: |w| and |u| grow alike, so their LR stays."""
    return {"hidden": -0.5}


@OPTIMIZERS.register(
    "lamb",
    description="LAMB: Adam update scaled per tensor by a clamped trust ratio ||p||/||u|| "
    "(own, DeepSpeed FusedLamb semantics; ZeRO 0/1/2)",
    aliases=("ds.fusedlamb",),
    arguments=LAMB_ARGS,
    validate=validate_lamb_args,
    width_lr_exponents=lamb_width_lr_exponents,
    engine=LAMB_ENGINE,
    memory=TWO_MOMENTS,
)
def build_lamb(param_groups, args):
    return Lamb(
        param_groups,
        lr=args.lr,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_eps,
        weight_decay=args.weight_decay,
        bias_correction=args.lamb_bias_correction,
        min_coeff=args.lamb_min_coeff,
        max_coeff=args.lamb_max_coeff,
    )
