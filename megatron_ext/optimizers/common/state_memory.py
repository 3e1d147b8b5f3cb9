"""What an optimizer keeps in memory, declared by its plug-in (the record's ``memory`` field) and
read by the memory plan (``megatron_ext.planning``), so a new optimizer states its own footprint
instead of the planner keeping a table of optimizer names.

All state is fp32 (the optimizers here run on DeepSpeed's fp32 master copies, or on fp32 weights).
Three kinds of memory:

* ``state(args, role)``: state elements per parameter element, by parameter role (``param_groups.ROLES``):
  Adam's two moments are 2, Muon's momentum is 1 on hidden matrices and AdamW's 2 elsewhere.
  Element-wise state lives wherever the optimizer's tensor lives, so ZeRO 1-3 divide it by the
  data-parallel size.
* ``matrix_state(args, rows, cols)``: elements kept per WHOLE hidden matrix on every data-parallel
  rank (Shampoo's factors and their inverse roots). Not divided by ZeRO.
* ``workspace(args, StepContext)``: what one step holds at once on top: an element-wise update's
  temporaries of the tensor it updates (a flat ZeRO partition: the whole partition), a whole-matrix
  optimizer's gathered matrices and Newton-Schulz or eigendecomposition buffers.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Sequence, Tuple

Shape = Tuple[int, int]


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What one optimizer step works on, on this rank (element counts, fp32)."""

    largest_tensor: int  # the largest tensor one element-wise update touches (ZeRO 1/2: a flat group partition)
    hidden_partition: int  # this rank's element-wise share of the hidden matrices (ZeRO: / data-parallel size)
    hidden_whole: int  # the hidden matrices this rank holds (its tensor/pipeline shard), whole
    hidden_shapes: Sequence[Tuple[Shape, int]]  # (full matrix shape, how many) of the hidden matrices here
    zero_stage: int
    data_parallel: int
    foreach: bool  # torch's multi-tensor update (the CUDA default) rather than one tensor at a time


@dataclasses.dataclass(frozen=True)
class OptimizerMemory:
    state: Callable[[object, str], float]  # (args, role) -> fp32 state elements per parameter element
    # fp32 elements the step holds at once on top of the state: ``workspace(args, StepContext)``
    workspace: Callable[[object, StepContext], float]
    # fp32 elements kept per WHOLE hidden matrix (rows, cols) on every data-parallel rank
    matrix_state: Optional[Callable[[object, int, int], int]] = None
    notes: str = ""


def elementwise_temporaries(single: float, foreach: float) -> Callable[[object, StepContext], float]:
    """An element-wise update's temporaries, in copies of the largest tensor it updates: torch's
    single-tensor Adam holds sqrt(v) and sqrt(v)/c at once (2), its foreach version one list (1)."""
    return lambda args, ctx: (foreach if ctx.foreach else single) * ctx.largest_tensor


def per_role(hidden: float, other: float) -> Callable[[object, str], float]:
    """State elements per parameter element: ``hidden`` on the hidden matrices, ``other`` elsewhere."""
    return lambda args, role: hidden if role == "hidden" else other


def constant(elements: float) -> Callable[[object, str], float]:
    return lambda args, role: elements


def largest_batch(shapes: Sequence[Tuple[Shape, int]]) -> Tuple[int, int]:
    """(elements, elements of its Gram matrices) of the largest batch of same-shaped matrices: what
    a batched Newton-Schulz or factor update works on at once."""
    best = (0, 0)
    for (rows, cols), count in shapes:
        best = max(best, (rows * cols * count, min(rows, cols) ** 2 * count))
    return best


# Adam, AdamW, ADOPT, LAMB: first and second moment.
TWO_MOMENTS = OptimizerMemory(state=constant(2), workspace=elementwise_temporaries(2, 1),
                              notes="exp_avg and exp_avg_sq")


def describe(memory: Optional[OptimizerMemory], args, roles: Dict[str, int]) -> str:
    """One line: the state per parameter of the roles present (for the plan's formula column)."""
    if memory is None:
        return "not declared by the plug-in"
    counts = sorted({memory.state(args, r) for r in roles})
    per = "/".join(f"{c:g}" for c in counts)
    return f"{per} fp32 per parameter" + (f" ({memory.notes})" if memory.notes else "")
