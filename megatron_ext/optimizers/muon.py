"""``muon``: Muon for the hidden weight matrices, AdamW for everything else.

Written here rather than taken from a library: torch.optim.Muon, the reference ``muon-optimizer``
and DeepSpeed's ZeRO-integrated Muon all expect each weight as one local 2-D tensor, which ZeRO 1/2
(flat partitions) and megatron-core tensor parallelism (shards) do not give. This one gets the
whole matrix back through ``full_matrices`` and so updates every matrix as a whole under ZeRO 0/1/2,
fp32 and bf16, data and tensor parallel.

Update of a hidden matrix (Keller Jordan's Muon; Moonlight's RMS matching, arXiv 2502.16982):
  m = beta m + (1 - beta) g;  u = (1 - beta) g + beta m  (Nesterov) or u = m
  for each block B of u (the whole matrix, or the parts of a fused one: Q, K, V of the fused QKV
  as megatron-core does by default, or every head; gate and up of a fused SwiGLU fc1):
    O = NewtonSchulz5(B)       X0 = B / (||B||_F + 1e-7), transposed when rows > cols,
                               X <- aX + (b A + c A^2) X with A = X X^T, (a, b, c) = (3.4445, -4.7750, 2.0315)
                               (or the Gram iteration on A alone: the same polynomial, fewer FLOPs
                               when cols > rows)
    scale = 0.2 sqrt(max(rows, cols))  (moonlight: update RMS of AdamW's, so AdamW's lr/wd carry over)
          | max(1, rows / cols)^0.5    (keller), of the block
  p <- p (1 - lr wd);  p <- p - lr * lr_scale * scale * O
Roles come from the shared param grouping (``role == "hidden"``), never from sizes; the blocks of
a matrix from its megatron-core name (``common/matrix_blocks.py``). MoE experts are separate
parameters (megatron-core's SequentialMLP), so each expert is orthogonalised on its own. The
momentum is element-wise, so under ZeRO it stays on this rank's shard; only the Nesterov direction
is gathered for Newton-Schulz, which runs on every block, batched by shape. Under fp16 a step whose
gradient is not finite leaves the momentum as it was (the loss scaler skips that step).

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
from megatron_ext.optimizers.common.full_matrices import is_tp_sharded, tp_full, tp_shard
from megatron_ext.optimizers.common.hybrid import WHOLE_MATRICES, HybridMatrixOptimizer
from megatron_ext.optimizers.common.matrix_blocks import WHOLE, MatrixBlocks
from megatron_ext.optimizers.common.state_memory import OptimizerMemory, StepContext, largest_batch, per_role
from megatron_ext.optimizers.common.validation import check_betas, check_positive
from megatron_ext.registry import Arg
from megatron_ext.platform.accelerator import native_bf16_matmul

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
    Arg("--muon-ns-dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
        help="precision of the Newton-Schulz iteration; auto: bf16 where the device multiplies bf16 "
             "natively (CUDA, XPU, CPUs with AVX512-BF16/AMX), fp32 elsewhere (the start-up table says which)"),
    Arg("--muon-ns-method", choices=["standard", "gram"], default="standard",
        help="standard: the quintic iteration on X; gram: the same polynomial iterated on the small Gram "
             "matrix X X^T (fewer FLOPs for rectangular blocks; restarted once for stability)"),
    Arg("--muon-split-qkv", action=argparse.BooleanOptionalAction, default=True,
        help="orthogonalise Q, K and V of the fused QKV matrix separately (megatron-core's default); "
             "--no-muon-split-qkv: the fused matrix as one"),
    Arg("--muon-per-head", action="store_true", default=False,
        help="orthogonalise every query, key and value head of the fused QKV matrix on its own"),
    Arg("--muon-split-swiglu", action=argparse.BooleanOptionalAction, default=False,
        help="orthogonalise gate and up of a fused SwiGLU fc1 separately (default: as one matrix, "
             "like megatron-core)"),
    Arg("--muon-scaling", choices=["moonlight", "keller"], default="moonlight",
        help="moonlight: 0.2*sqrt(max(rows,cols)), AdamW's lr and weight decay carry over; "
             "keller: max(1,rows/cols)^0.5, wants a larger lr (see --muon-lr-scale)"),
    Arg("--muon-lr-scale", type=nonneg_float, default=1.0,
        help="the Muon (hidden-matrix) groups' lr = --lr x this (the schedule moves it with --lr)"),
    Arg("--muonadamw-beta1", type=float, default=0.9, help="beta1 of the AdamW part"),
    Arg("--muonadamw-beta2", type=float, default=0.95, help="beta2 of the AdamW part"),
    Arg("--muonadamw-eps", type=float, default=1e-8, help="epsilon of the AdamW part"),
)


NS_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GRAM_RESTART = 2  # the Gram iteration re-forms X and X X^T once, before this iteration


def newton_schulz(g: torch.Tensor, steps: int = 5, coefficients=NS_COEFFICIENTS,
                  dtype: torch.dtype = torch.bfloat16, method: str = "standard") -> torch.Tensor:
    """Approximate the orthogonal factor U V^T of ``g`` ([..., rows, cols], batched) by the quintic
    Newton-Schulz iteration in ``dtype``; returns ``g``'s dtype. ``g`` is normalised in its own
    precision before the cast (an fp16 norm of a large gradient would overflow)."""
    a, b, c = coefficients
    transposed = g.size(-2) > g.size(-1)
    x = g.mT if transposed else g
    x = (x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)).to(dtype)
    if method == "gram" and x.size(-2) < x.size(-1):
        x = _gram_iterations(x, steps, a, b, c)
    else:
        for _ in range(steps):
            gram = x @ x.mT
            x = a * x + (b * gram + c * gram @ gram) @ x
    if transposed:
        x = x.mT
    return x.to(g.dtype)


def _gram_iterations(x: torch.Tensor, steps: int, a: float, b: float, c: float) -> torch.Tensor:
    """The standard iteration's result for a wide ``x`` (rows n < cols m) computed on n x n matrices.

    Each standard step multiplies X on the left by P(R) = aI + bR + cR^2 with R = X X^T. All these
    polynomials are polynomials in R0 = X0 X0^T, so they commute: after k steps X_k = Q X0 with
    Q = P(R_{k-1}) ... P(R_0), and R_{k+1} = P(R_k)^2 R_k. Iterating on Q and R costs O(n^3) per
    step instead of O(n^2 m); X is formed once at the end. Rounding accumulates in R, so at
    ``GRAM_RESTART`` X and R are formed afresh from the product so far."""
    r = x @ x.mT
    q = None
    for i in range(steps):
        if i == GRAM_RESTART and q is not None:
            x = q @ x
            r = x @ x.mT
            q = None
        z = b * r + c * r @ r  # P(R) - aI
        if q is None:
            q = z.clone()
            q.diagonal(dim1=-2, dim2=-1).add_(a)
        else:
            q = a * q + z @ q
        if i + 1 < steps and i + 1 != GRAM_RESTART:
            pr = a * r + z @ r
            r = a * pr + z @ pr  # P(R) R P(R) = P(R)^2 R
    return q @ x


def ns_dtype_for(choice: str):
    """``(torch dtype, why)`` of --muon-ns-dtype; ``auto`` asks the platform whether bf16 matrix
    multiplication is native here."""
    if choice != "auto":
        return NS_DTYPES[choice], "requested"

    native, why = native_bf16_matmul()
    return (torch.bfloat16 if native else torch.float32), f"auto: {why}"


def blocks_for(name: str, args) -> MatrixBlocks:
    """How Muon splits the hidden matrix called ``name`` (megatron-core's parameter name)."""
    if name.endswith("self_attention.linear_qkv.weight") and (args.muon_split_qkv or args.muon_per_head):
        heads, groups = args.num_attention_heads, args.num_key_value_heads or args.num_attention_heads
        head_dim = getattr(args, "kv_channels", None) or args.hidden_size // heads
        return MatrixBlocks("heads" if args.muon_per_head else "qkv", groups=groups,
                            heads_per_group=heads // groups, head_dim=head_dim)
    if args.muon_split_swiglu and args.swiglu and name.endswith("linear_fc1.weight"):
        return MatrixBlocks("gate_up")
    return WHOLE


def shape_scale(rows: int, cols: int, scaling: str) -> float:
    if scaling == "moonlight":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


class Muon(HybridMatrixOptimizer):
    """Hybrid optimizer: groups with ``use_matrix`` get Muon, the others AdamW. ``blocks`` maps a
    hidden parameter (the model's tensor, by id) to how its matrix splits (default: whole)."""

    name = "muon"

    def __init__(self, param_groups, lr=1e-3, weight_decay=0.0, momentum=0.95, nesterov=True, ns_steps=5,
                 ns_coefficients=NS_COEFFICIENTS, ns_dtype=torch.bfloat16, scaling="moonlight",
                 adam_betas=(0.9, 0.95), adam_eps=1e-8, ns_method="standard", blocks=None, finite_momentum=False):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        betas=adam_betas, eps=adam_eps, use_matrix=False)
        super().__init__(param_groups, defaults)
        self.ns_steps, self.ns_coefficients, self.ns_dtype, self.scaling = ns_steps, ns_coefficients, ns_dtype, scaling
        self.ns_method = ns_method
        self.blocks = dict(blocks or {})
        self.finite_momentum = finite_momentum  # fp16: a non-finite gradient leaves the momentum as it was

    def elementwise(self, p, group, state):
        """Momentum (on this rank's shard) and the Nesterov direction."""
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p)
        m = state["exp_avg"]
        beta = group["momentum"]
        g = p.grad
        if self.finite_momentum:
            # Decided on the device (no host sync). A non-finite direction is passed on, so the
            # overflow still shows in the update as it does in the gradient.
            finite = torch.isfinite(g).all()
            m.copy_(torch.where(finite, m.lerp(g, 1 - beta), m))
            return [torch.where(finite, g.lerp(m, beta) if group["nesterov"] else m, g)]
        m.lerp_(g, 1 - beta)
        return [g.lerp(m, beta) if group["nesterov"] else m.clone()]

    def matrix_updates(self, inputs, owners, group, states):
        """Newton-Schulz on every block of every whole matrix (TP shards gathered), batched by shape."""
        from megatron.core import parallel_state as ps

        layouts, parts = [], []
        for (direction,), owner in zip(inputs, owners):
            full = tp_full(direction, owner)
            if full.dim() != 2:
                raise RuntimeError(f"muon: hidden parameter of shape {tuple(full.shape)} is not a matrix")
            shards = ps.get_tensor_model_parallel_world_size() if is_tp_sharded(owner) else 1
            blocks = self.blocks.get(id(owner), WHOLE)
            layouts.append((blocks, shards))
            parts.append(blocks.split(full, shards))
        by_shape = defaultdict(list)  # (rows, cols) -> [(matrix, part)]
        for i, matrix_parts in enumerate(parts):
            for j, part in enumerate(matrix_parts):
                by_shape[tuple(part.shape[-2:])].append((i, j))
        results: List[List[Optional[torch.Tensor]]] = [[None] * len(p) for p in parts]
        for (rows, cols), where in by_shape.items():
            batch = torch.cat([parts[i][j] for i, j in where])
            ortho = newton_schulz(batch, self.ns_steps, self.ns_coefficients, self.ns_dtype, self.ns_method)
            ortho.mul_(shape_scale(rows, cols, self.scaling))
            for (i, j), piece in zip(where, ortho.split([parts[i][j].size(0) for i, j in where])):
                results[i][j] = piece
        return [tp_shard(blocks.merge(res, shards), owner)
                for (blocks, shards), res, owner in zip(layouts, results, owners)]


def validate_muon_args(args) -> None:
    check_betas(args, "--muon-momentum", "--muonadamw-beta1", "--muonadamw-beta2")
    check_positive(args, "--muonadamw-eps")
    if args.muon_per_head and not args.muon_split_qkv:
        raise ValueError("--muon-per-head splits the fused QKV matrix, but --no-muon-split-qkv keeps it whole; "
                         "drop one of them")


def muon_summary(args) -> str:
    """The start-up table's line: the Newton-Schulz precision (and why), method and splits."""
    dtype, why = ns_dtype_for(args.muon_ns_dtype)
    qkv = "per head" if args.muon_per_head else "Q, K, V" if args.muon_split_qkv else "whole"
    swiglu = "; SwiGLU fc1 as gate, up" if args.muon_split_swiglu and args.swiglu else ""
    return (f"Newton-Schulz in {str(dtype).replace('torch.', '')} ({why}), {args.muon_ns_method} iteration; "
            f"QKV: {qkv}{swiglu}")


def muon_width_lr_exponents(args):
    """muP for Muon's hidden matrices. The orthogonalised update has spectral norm 1; Keller's
    max(1, rows/cols)^0.5 is the spectral condition muP asks for, so its LR needs no width factor.
    Moonlight's 0.2 sqrt(max(rows, cols)) grows like sqrt(width): m_N^-1/2 cancels it. Applying
    Adam's 1/m_N on top would scale twice. The AdamW part keeps Adam's rules."""
    return {"hidden": 0.0 if args.muon_scaling == "keller" else -0.5}


def muon_workspace(args, ctx: StepContext) -> float:
    """What a Muon step holds at once (fp32 elements; Newton-Schulz in fp32, its bf16 run needs
    less). Over ZeRO 1/2's flat partition: this rank's Nesterov directions and the gathered whole
    group, then either the largest batch of same-shaped blocks in Newton-Schulz (the batch, X and
    X's products: ~5 copies, the Gram matrix and its square: ~3) or, after it, the matrices'
    updates and the group-size buffer they are scattered from. At ZeRO 0 every direction at once
    and the updates (and the flat all-reduce buffer when the data-parallel ranks split the work)."""
    batch, gram = largest_batch(ctx.hidden_shapes)
    newton_schulz = 5 * batch + 3 * gram
    if ctx.zero_stage in (1, 2):
        return ctx.hidden_partition + ctx.hidden_whole + max(2 * ctx.hidden_whole, newton_schulz)
    return ctx.hidden_whole + max((1 + (ctx.data_parallel > 1)) * ctx.hidden_whole, newton_schulz)


# momentum on the hidden matrices, AdamW's two moments elsewhere
MUON_MEMORY = OptimizerMemory(state=per_role(1, 2), workspace=muon_workspace,
                              notes="momentum on hidden matrices, exp_avg and exp_avg_sq elsewhere")


@OPTIMIZERS.register("muon", aliases=["muonadamw"], arguments=MUON_ARGS,
                     description="Muon (Newton-Schulz orthogonalised momentum) on hidden matrices, AdamW on the "
                                 "rest; whole matrices under ZeRO 0/1/2 and tensor parallel",
                     validate=validate_muon_args, width_lr_exponents=muon_width_lr_exponents, engine=WHOLE_MATRICES,
                     summary=muon_summary, memory=MUON_MEMORY)
def build_muon(param_groups, args):
    blocks = {}
    for group in param_groups:
        group["use_matrix"] = group.get("role") == "hidden"
        if group["use_matrix"]:
            group["lr_mult"] = group.get("lr_mult", 1.0) * args.muon_lr_scale
            for p, name in zip(group["params"], group.get("param_names", [""] * len(group["params"]))):
                blocks[id(p)] = blocks_for(name, args)
    ns_dtype, _ = ns_dtype_for(args.muon_ns_dtype)
    return Muon(param_groups, lr=args.lr, weight_decay=args.weight_decay, momentum=args.muon_momentum,
                nesterov=args.muon_nesterov, ns_steps=args.muon_ns_steps, ns_coefficients=args.muon_ns_coefficients,
                ns_dtype=ns_dtype, scaling=args.muon_scaling, adam_betas=(args.muonadamw_beta1, args.muonadamw_beta2),
                adam_eps=args.muonadamw_eps, ns_method=args.muon_ns_method, blocks=blocks, finite_momentum=args.fp16)
