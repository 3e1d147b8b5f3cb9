"""``muon``: Muon for the hidden weight matrices, AdamW for everything else.

Written here rather than taken from a library: torch.optim.Muon, the reference ``muon-optimizer``
and DeepSpeed's ZeRO-integrated Muon all expect each weight as one local 2-D tensor, which ZeRO 1/2
(flat partitions) and megatron-core tensor parallelism (shards) do not give. This one gets the
whole matrix back through ``full_matrices`` and so updates every matrix as a whole under ZeRO 0/1/2,
fp32 and bf16, data and tensor parallel.

Update of a hidden matrix (Keller Jordan's Muon; Moonlight's RMS matching, arXiv 2502.16982):
  m = beta m + (1 - beta) g;  u = (1 - beta) g + beta m  (Nesterov) or u = m
  O = NewtonSchulz5(u)         X0 = u / (||u||_F + 1e-7), transposed when rows > cols,
                               X <- aX + (b A + c A^2) X with A = X X^T, (a, b, c) = (3.4445, -4.7750, 2.0315)
  scale = 0.2 sqrt(max(rows, cols))  (moonlight: update RMS of AdamW's, so AdamW's lr/wd carry over)
        | max(1, rows / cols)^0.5    (keller)
  p <- p (1 - lr wd);  p <- p - lr * lr_scale * scale * O
Roles come from the shared param grouping (``role == "hidden"``), never from sizes. The momentum
is element-wise, so under ZeRO it stays on this rank's shard; only the Nesterov direction is
gathered for Newton-Schulz, which runs on every matrix, batched by shape.

The state is named like AdamW's (``exp_avg`` for the momentum) so DeepSpeed's universal checkpoint
conversion, which knows Adam's state names, carries it.
"""
from __future__ import annotations

import argparse
import math
from collections import defaultdict
from typing import List, Optional, Tuple

import torch

from megatron_ext.argtypes import nonneg_float, positive_int
from megatron_ext.optimizers import OPTIMIZERS
from megatron_ext.optimizers.common.full_matrices import tp_full, tp_shard
from megatron_ext.optimizers.common.hybrid import WHOLE_MATRICES, HybridMatrixOptimizer
from megatron_ext.optimizers.common.validation import check_betas, check_positive
from megatron_ext.registry import Arg

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def _coefficients(text: str) -> Tuple[float, float, float]:
    try:
        a, b, c = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers a,b,c, got {text!r}") from None
    return a, b, c


MUON_ARGS = (
    Arg("--muon-momentum", type=float, default=0.95, help="Muon momentum beta"),
    Arg("--muon-nesterov", action=argparse.BooleanOptionalAction, default=True,
        help="Nesterov momentum (--no-muon-nesterov: plain momentum)"),
    Arg("--muon-ns-steps", type=positive_int, default=5, help="Newton-Schulz iterations"),
    Arg("--muon-ns-coefficients", type=_coefficients, default=NS_COEFFICIENTS,
        help="Newton-Schulz quintic coefficients a,b,c"),
    Arg("--muon-ns-dtype", choices=["bf16", "fp32"], default="bf16",
        help="precision of the Newton-Schulz iteration (bf16 as in the reference)"),
    Arg("--muon-scaling", choices=["moonlight", "keller"], default="moonlight",
        help="moonlight: 0.2*sqrt(max(rows,cols)), AdamW's lr and weight decay carry over; "
             "keller: max(1,rows/cols)^0.5, wants a larger lr (see --muon-lr-scale)"),
    Arg("--muon-lr-scale", type=nonneg_float, default=1.0,
        help="the Muon (hidden-matrix) groups' lr = --lr x this (the schedule moves it with --lr)"),
    Arg("--muonadamw-beta1", type=float, default=0.9, help="beta1 of the AdamW part"),
    Arg("--muonadamw-beta2", type=float, default=0.95, help="beta2 of the AdamW part"),
    Arg("--muonadamw-eps", type=float, default=1e-8, help="epsilon of the AdamW part"),
)


def newton_schulz(g: torch.Tensor, steps: int = 5, coefficients=NS_COEFFICIENTS,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximate the orthogonal factor U V^T of ``g`` ([..., rows, cols], batched) by the quintic
    Newton-Schulz iteration; returns ``g``'s dtype."""
    a, b, c = coefficients
    x = g.to(dtype)
    transposed = g.size(-2) > g.size(-1)
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transposed:
        x = x.mT
    return x.to(g.dtype)


def shape_scale(rows: int, cols: int, scaling: str) -> float:
    if scaling == "moonlight":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


class Muon(HybridMatrixOptimizer):
    """Hybrid optimizer: groups with ``use_matrix`` get Muon, the others AdamW."""

    name = "muon"

    def __init__(self, param_groups, lr=1e-3, weight_decay=0.0, momentum=0.95, nesterov=True, ns_steps=5,
                 ns_coefficients=NS_COEFFICIENTS, ns_dtype=torch.bfloat16, scaling="moonlight",
                 adam_betas=(0.9, 0.95), adam_eps=1e-8):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        betas=adam_betas, eps=adam_eps, use_matrix=False)
        super().__init__(param_groups, defaults)
        self.ns_steps, self.ns_coefficients, self.ns_dtype, self.scaling = ns_steps, ns_coefficients, ns_dtype, scaling

    def elementwise(self, p, group, state):
        """Momentum (on this rank's shard) and the Nesterov direction."""
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p)
        m = state["exp_avg"]
        beta = group["momentum"]
        m.lerp_(p.grad, 1 - beta)
        return [p.grad.lerp(m, beta) if group["nesterov"] else m.clone()]

    def matrix_updates(self, inputs, owners, group, states):
        """Newton-Schulz on every whole matrix (TP shards gathered), batched by shape."""
        full = [tp_full(direction, o) for (direction,), o in zip(inputs, owners)]
        by_shape = defaultdict(list)
        for i, f in enumerate(full):
            if f.dim() != 2:
                raise RuntimeError(f"muon: hidden parameter of shape {tuple(f.shape)} is not a matrix")
            by_shape[tuple(f.shape)].append(i)
        out: List[Optional[torch.Tensor]] = [None] * len(full)
        for (rows, cols), idx in by_shape.items():
            ortho = newton_schulz(torch.stack([full[i] for i in idx]), self.ns_steps, self.ns_coefficients,
                                  self.ns_dtype)
            ortho.mul_(shape_scale(rows, cols, self.scaling))
            for k, i in enumerate(idx):
                out[i] = tp_shard(ortho[k], owners[i])
        return out


def validate_muon_args(args) -> None:
    check_betas(args, "--muon-momentum", "--muonadamw-beta1", "--muonadamw-beta2")
    check_positive(args, "--muonadamw-eps")


def muon_width_lr_exponents(args):
    """muP for Muon's hidden matrices. The orthogonalised update has spectral norm 1; Keller's
    max(1, rows/cols)^0.5 is the spectral condition muP asks for, so its LR needs no width factor.
    Moonlight's 0.2 sqrt(max(rows, cols)) grows like sqrt(width): m_N^-1/2 cancels it. Applying
    Adam's 1/m_N on top would scale twice. The AdamW part keeps Adam's rules."""
    return {"hidden": 0.0 if args.muon_scaling == "keller" else -0.5}


@OPTIMIZERS.register("muon", aliases=["muonadamw"], arguments=MUON_ARGS,
                     description="Muon (Newton-Schulz orthogonalised momentum) on hidden matrices, AdamW on the "
                                 "rest; whole matrices under ZeRO 0/1/2 and tensor parallel",
                     validate=validate_muon_args, width_lr_exponents=muon_width_lr_exponents, engine=WHOLE_MATRICES)
def build_muon(param_groups, args):
    for group in param_groups:
        group["use_matrix"] = group.get("role") == "hidden"
        if group["use_matrix"]:
            group["lr_mult"] = group.get("lr_mult", 1.0) * args.muon_lr_scale
    return Muon(param_groups, lr=args.lr, weight_decay=args.weight_decay, momentum=args.muon_momentum,
                nesterov=args.muon_nesterov, ns_steps=args.muon_ns_steps, ns_coefficients=args.muon_ns_coefficients,
                ns_dtype=torch.bfloat16 if args.muon_ns_dtype == "bf16" else torch.float32,
                scaling=args.muon_scaling, adam_betas=(args.muonadamw_beta1, args.muonadamw_beta2),
                adam_eps=args.muonadamw_eps)
