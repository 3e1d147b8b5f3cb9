"""``shampoo`` (alias ``dshampooadamw``): Shampoo with Adam grafting on the hidden weight matrices,
AdamW for everything else (the AdamW-replacement settings of Meta's Distributed Shampoo).

Written here: Meta's Distributed Shampoo is not on the package index, and pytorch-optimizer's
Shampoo variants take each weight as one local tensor, which ZeRO 1/2 (flat partitions) and tensor
parallelism (shards) do not give; ``hybrid.HybridMatrixOptimizer`` hands over whole matrices.

Per hidden matrix, split into blocks of at most ``--dshampooadamw-max-preconditioner-dim`` rows
and columns; for each block with gradient G (t = step):
  L <- b2 L + (1 - b2) G G^T,  R <- b2 R + (1 - b2) G^T G                     (b2: --dshampooadamw-beta2)
  every --dshampooadamw-precondition-freq steps from --dshampooadamw-start-preconditioning-step:
      L^-1/4, R^-1/4 of L/(1 - b2^t), R/(1 - b2^t) by eigendecomposition, eigenvalues + eps
  m <- b1 m + (1 - b1) g,  m_hat = m / (1 - b1^t)                            (element-wise, sharded)
  Adam grafting: v <- bg v + (1 - bg) g^2,  A = m_hat / (sqrt(v / (1 - bg^t)) + eps_g)
  P = L^-1/4 m_hat R^-1/4, rescaled to the Frobenius norm of A on the block (before the first
  preconditioner: P = A)
  p <- p (1 - lr wd) - lr P                                                  (decoupled weight decay)
Preconditioners are computed from the whole matrix on every data-parallel rank (replicated state).
Without blocking the result does not depend on the tensor-parallel size (Shampoo's two-sided
preconditioning commutes with the row/column permutations TP shards introduce); with blocking,
blocks follow the gathered (TP rank-ordered) matrix.
"""
from __future__ import annotations

from typing import List

import torch

from megatron_ext.argtypes import nonneg_int, positive_int
from megatron_ext.optimizers import OPTIMIZERS
from megatron_ext.optimizers.common.full_matrices import tp_full, tp_shard
from megatron_ext.optimizers.common.hybrid import WHOLE_MATRICES, HybridMatrixOptimizer
from megatron_ext.optimizers.common.state_memory import OptimizerMemory, StepContext, constant
from megatron_ext.optimizers.common.validation import check_betas, check_positive
from megatron_ext.registry import Arg

SHAMPOO_ARGS = (
    Arg("--dshampooadamw-max-preconditioner-dim", type=positive_int, default=8192,
        help="matrices larger than this along a dimension are split into blocks"),
    Arg("--dshampooadamw-precondition-freq", type=positive_int, default=100,
        help="steps between recomputations of the inverse 4th roots"),
    Arg("--dshampooadamw-start-preconditioning-step", type=nonneg_int, default=None,
        help="first step that uses the preconditioners (default: the precondition frequency); "
             "before it the Adam grafting direction is used"),
    Arg("--dshampooadamw-eps", type=float, default=1e-12, help="added to the factor eigenvalues"),
    Arg("--dshampooadamw-beta1", type=float, default=0.9, help="momentum of the gradient"),
    Arg("--dshampooadamw-beta2", type=float, default=0.999, help="EMA of the factor matrices"),
    Arg("--dshampooadamw-grafting-beta2", type=float, default=0.999,
        help="second moment of the Adam grafting (and of the AdamW part)"),
    Arg("--dshampooadamw-grafting-eps", type=float, default=1e-8, help="epsilon of the Adam grafting"),
)


def inverse_fourth_root(m: torch.Tensor, eps: float) -> torch.Tensor:
    """(m + eps I)^(-1/4) of a symmetric PSD matrix, by eigendecomposition in float64."""
    values, vectors = torch.linalg.eigh(m.double())
    values = values.clamp(min=0.0) + eps
    return ((vectors * values.pow(-0.25)) @ vectors.T).to(m.dtype)


def blocks(shape, max_dim: int):
    """Row/column slices of the blocks of a matrix."""
    rows, cols = shape
    return [(slice(r, min(r + max_dim, rows)), slice(c, min(c + max_dim, cols)))
            for r in range(0, rows, max_dim) for c in range(0, cols, max_dim)]


class Shampoo(HybridMatrixOptimizer):
    name = "shampoo"
    keeps_matrix_state = True

    def __init__(self, param_groups, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-12,
                 grafting_beta2=0.999, grafting_eps=1e-8, max_preconditioner_dim=8192,
                 precondition_frequency=100, start_preconditioning_step=None):
        defaults = dict(lr=lr, weight_decay=weight_decay, shampoo_betas=betas, shampoo_eps=eps,
                        betas=(betas[0], grafting_beta2), eps=grafting_eps, use_matrix=False)
        super().__init__(param_groups, defaults)
        self.max_dim = max_preconditioner_dim
        self.frequency = precondition_frequency
        self.start = precondition_frequency if start_preconditioning_step is None else start_preconditioning_step

    def universal_checkpoint_loaded(self) -> str:
        """Hook (optimizers/hooks.py): a universal checkpoint carries the element-wise state only.
        The factors are whole matrices laid out for the saving run's TP sharding and cannot be
        resharded, so they start afresh (their own step count too: grafting until recomputed)."""
        for state in self.state.values():
            state.pop("matrices", None)  # ZeRO 1/2: one list per flat partition
            state.pop("matrix", None)
        return ("shampoo: the preconditioner factors (L, R and their inverse roots) cannot be resharded and were "
                "re-initialised; momentum and the Adam-grafting moments were loaded from the universal checkpoint "
                f"(Adam-grafted steps until the factors are recomputed, {self.start} steps from now)")

    def elementwise(self, p, group, state):
        """Momentum and the Adam grafting direction, on this rank's shard; returns [g, m_hat, A]."""
        beta1, _ = group["shampoo_betas"]
        _, graft_beta2 = group["betas"]
        if "exp_avg" not in state:
            self.start_step_count(p, state)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        t = self.next_step(p, state)
        g = p.grad
        state["exp_avg"].lerp_(g, 1 - beta1)
        state["exp_avg_sq"].mul_(graft_beta2).addcmul_(g, g, value=1 - graft_beta2)
        m_hat = state["exp_avg"] / (1 - beta1 ** t)
        graft = m_hat / ((state["exp_avg_sq"] / (1 - graft_beta2 ** t)).sqrt_().add_(group["eps"]))
        return [g, m_hat, graft]

    def matrix_updates(self, inputs, owners, group, states) -> List[torch.Tensor]:
        _, beta2 = group["shampoo_betas"]
        out = []
        for (g, m_hat, graft), owner, st in zip(inputs, owners, states):
            g, m_hat, graft = (tp_full(x, owner) for x in (g, m_hat, graft))
            if g.dim() != 2:
                raise RuntimeError(f"shampoo: hidden parameter of shape {tuple(g.shape)} is not a matrix")
            parts = blocks(g.shape, self.max_dim)
            if "L" not in st:
                st["t"] = 0
                st["L"] = [g.new_zeros(r.stop - r.start, r.stop - r.start) for r, _ in parts]
                st["R"] = [g.new_zeros(c.stop - c.start, c.stop - c.start) for _, c in parts]
                st["L_root"], st["R_root"] = [None] * len(parts), [None] * len(parts)
            st["t"] += 1
            t = st["t"]
            refresh = t >= self.start and (t - self.start) % self.frequency == 0
            update = torch.empty_like(g)
            for b, (rs, cs) in enumerate(parts):
                gb = g[rs, cs]
                st["L"][b].mul_(beta2).addmm_(gb, gb.T, alpha=1 - beta2)
                st["R"][b].mul_(beta2).addmm_(gb.T, gb, alpha=1 - beta2)
                if refresh:
                    correction = 1 - beta2 ** t
                    st["L_root"][b] = inverse_fourth_root(st["L"][b] / correction, group["shampoo_eps"])
                    st["R_root"][b] = inverse_fourth_root(st["R"][b] / correction, group["shampoo_eps"])
                a = graft[rs, cs]
                if st["L_root"][b] is None:
                    update[rs, cs] = a
                    continue
                pb = st["L_root"][b] @ m_hat[rs, cs] @ st["R_root"][b]
                update[rs, cs] = pb * (a.norm() / pb.norm().clamp(min=1e-30))
            out.append(tp_shard(update, owner))
        return out


def validate_shampoo_args(args) -> None:
    check_betas(args, "--dshampooadamw-beta1", "--dshampooadamw-beta2", "--dshampooadamw-grafting-beta2")
    check_positive(args, "--dshampooadamw-eps", "--dshampooadamw-grafting-eps")


def shampoo_matrix_state(args, rows: int, cols: int) -> int:
    """Per whole hidden matrix (every data-parallel rank keeps them): L and R of every block and
    their inverse 4th roots, fp32."""
    return 2 * sum((r.stop - r.start) ** 2 + (c.stop - c.start) ** 2
                   for r, c in blocks((rows, cols), args.dshampooadamw_max_preconditioner_dim))


def shampoo_workspace(args, ctx: StepContext) -> float:
    """What a Shampoo step holds at once (fp32 elements): m_hat and the grafting direction of this
    rank's elements (and sqrt(v)); over ZeRO 1/2's flat partition the three inputs gathered whole,
    the updates and the group-size buffer; at ZeRO 0 both directions and the updates of every
    matrix. Then one factor's inverse root by eigendecomposition in float64 (~8 fp32 copies of the
    largest factor)."""
    largest = max((min(max(r, c), args.dshampooadamw_max_preconditioner_dim) ** 2
                   for (r, c), _ in ctx.hidden_shapes), default=0)
    if ctx.zero_stage in (1, 2):
        return 3 * ctx.hidden_partition + 5 * ctx.hidden_whole + 8 * largest
    return 3 * ctx.hidden_whole + 8 * largest


# momentum and the Adam-grafting second moment everywhere (AdamW's two moments off the matrices)
SHAMPOO_MEMORY = OptimizerMemory(state=constant(2), workspace=shampoo_workspace, matrix_state=shampoo_matrix_state,
                                 notes="exp_avg and exp_avg_sq; factors and roots per matrix, every rank")


@OPTIMIZERS.register("shampoo", aliases=["dshampooadamw", "distributed-shampoo"], arguments=SHAMPOO_ARGS,
                     description="Shampoo with Adam grafting and blocking on hidden matrices, AdamW on the rest; "
                                 "whole matrices under ZeRO 0/1/2 and tensor parallel",
                     validate=validate_shampoo_args, engine=WHOLE_MATRICES, memory=SHAMPOO_MEMORY)
def build_shampoo(param_groups, args):
    for group in param_groups:
        group["use_matrix"] = group.get("role") == "hidden"
    return Shampoo(param_groups, lr=args.lr, weight_decay=args.weight_decay,
                   betas=(args.dshampooadamw_beta1, args.dshampooadamw_beta2), eps=args.dshampooadamw_eps,
                   grafting_beta2=args.dshampooadamw_grafting_beta2, grafting_eps=args.dshampooadamw_grafting_eps,
                   max_preconditioner_dim=args.dshampooadamw_max_preconditioner_dim,
                   precondition_frequency=args.dshampooadamw_precondition_freq,
                   start_preconditioning_step=args.dshampooadamw_start_preconditioning_step)
