"""Base class of hybrid optimizers (Muon, Shampoo): a matrix method for the hidden weight
matrices, AdamW for everything else, correct under ZeRO 0/1/2, bf16 and tensor parallelism.

A subclass gives two pieces:
* ``elementwise(p, group, state) -> [tensors]``: the element-wise part of its update (momentum,
  second moments...), on whatever the engine hands over (a weight, an fp32 copy, or ZeRO's flat
  partition). Element-wise state therefore stays sharded under ZeRO.
* ``matrix_updates(inputs, owners, group, states) -> [updates]``: ``inputs[k]`` is the list of the
  element-wise tensors of matrix ``k`` as WHOLE matrices (ZeRO partitions gathered, TP shards
  gathered by the subclass with ``tp_full``); it returns each matrix's update shaped like the
  matrix given (the subclass takes its TP shard back with ``tp_shard``). With
  ``keeps_matrix_state``, ``states[k]`` is a dict that persists across steps and checkpoints.
The base applies ``p <- p (1 - lr wd) - lr update``.

Without matrix state (Muon) the matrix work is split across the data-parallel ranks: every rank
would otherwise repeat the same Newton-Schulz on the same whole matrices. Each matrix gets one
owner rank (balanced by cost), only the owner computes its update, and one collective hands every
rank what it needs (reduce-scatter of its ZeRO partition, or all-reduce of the updates under ZeRO 0).
Shampoo keeps per-matrix preconditioners, which ZeRO 0 checkpoints store once for all ranks, so
its ranks all compute every matrix.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist

from megatron_ext.optimizers.common.closure import closure_loss
from megatron_ext.optimizers.common.full_matrices import flat_layouts, model_params_of, number_groups
from megatron_ext.registry import EngineSupport


def matrix_cost(shape: Sequence[int]) -> int:
    """Relative cost of a matrix update: Newton-Schulz on rows x cols is ~ rows * cols * min(rows, cols)."""
    rows, cols = shape[-2], shape[-1]
    return rows * cols * min(rows, cols)


def assign_owners(costs: Sequence[int], world: int) -> List[int]:
    """Owner rank of each matrix, greedy largest-first onto the least-loaded rank. Deterministic, so
    every rank (and every tensor-parallel peer, which must join the same collectives) agrees."""
    load = [0] * world
    owners = [0] * len(costs)
    for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[k] = rank
        load[rank] += costs[k]
    return owners


@functools.lru_cache(maxsize=None)
def _owners_of_shapes(shapes, world: int) -> List[int]:
    """The assignment of a group's matrices, computed once: shapes and world never change in a run,
    and the greedy pass is O(matrices x ranks) in Python, too slow to repeat every step at scale."""
    return assign_owners([matrix_cost(s) for s in shapes], world)


def _data_parallel_group(param_group):
    """The ranks holding the same copy of ``param_group``'s parameters: the data-parallel group, or
    for DeepSpeed-MoE's expert groups (``moe``, named by their expert-parallel size) the
    expert-data-parallel group: the other data-parallel ranks hold other experts."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        return None, 0, 1
    if param_group.get("moe"):
        from deepspeed.utils import groups

        group = groups._get_expert_data_parallel_group(param_group["name"])
    else:
        group = ps.get_data_parallel_group() if ps.model_parallel_is_initialized() else None
    return group, dist.get_rank(group=group), dist.get_world_size(group=group)


# Whole matrices are gathered from ZeRO 1/2 partitions on the accelerator; ZeRO 3 partitions each
# parameter and ZeRO-Offload steps on the CPU copy, where neither gathering is implemented.
WHOLE_MATRICES = EngineSupport(zero_stages=(0, 1, 2), cpu_offload=False, bf16_optimizer=False,
                               reason="whole matrices are gathered from ZeRO 0/1/2 layouts only")

class HybridMatrixOptimizer(torch.optim.Optimizer):
    name = "hybrid"
    keeps_matrix_state = False  # True: matrix_updates gets a persistent dict per matrix

    def __init__(self, param_groups, defaults):
        super().__init__(param_groups, defaults)
        number_groups(self.param_groups)
        self._layouts: Dict[int, object] = {}  # ZeRO 1/2 flat layouts, by group_index
        self._model_params: Dict[int, List[torch.Tensor]] = {}  # the model tensors behind ours
        self._host_steps: Dict[int, tuple] = {}  # id(param) -> (its state["step"] object, the count)

    # -- optimizer hook protocol (megatron_ext/optimizers/hooks.py) -----------------------------
    def engine_ready(self, engine) -> None:
        self._layouts = flat_layouts(engine, self.param_groups)
        self._model_params = model_params_of(engine, self.param_groups)

    # -- subclass interface ---------------------------------------------------------------------
    def elementwise(self, p: torch.Tensor, group, state) -> List[torch.Tensor]:
        raise NotImplementedError

    def matrix_updates(self, inputs, owners, group, states) -> List[torch.Tensor]:
        raise NotImplementedError

    # -- the step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            if group["use_matrix"]:
                self._matrix_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _matrix_group(self, group) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        layout = self._layouts.get(group["group_index"])
        if layout is not None:  # ZeRO 1/2: one flat partition holds the whole group
            (flat,) = params
            state = self.state[flat]
            local = self.elementwise(flat, group, state)
            full = layout.gather_many(local)
            entries = layout.entries
            inputs = [[f.narrow(0, e.offset, e.numel).view(e.shape) for f in full] for e in entries]
            matrices = (state.setdefault("matrices", [{} for _ in entries]) if self.keeps_matrix_state
                        else [None] * len(entries))
            mine = self._my_matrices([e.shape for e in entries], layout.rank, layout.world)
            updates = self.matrix_updates([inputs[k] for k in mine], [entries[k].model_param for k in mine],
                                          group, [matrices[k] for k in mine])
            full_update = torch.zeros_like(full[0])
            for k, u in zip(mine, updates):
                full_update.narrow(0, entries[k].offset, entries[k].numel).copy_(u.reshape(-1))
            if self._splits_work(layout.world):  # the other owners' updates: sum of zeros and one owner's
                local = torch.empty_like(flat)
                dist.reduce_scatter_tensor(local, full_update, group=layout.group)
            else:
                local = layout.local(full_update)
            self._apply(flat, local, group)
            return
        owners = self._model_params.get(group["group_index"], group["params"])
        owner_of = {id(p): o for p, o in zip(group["params"], owners)}
        inputs = [self.elementwise(p, group, self.state[p]) for p in params]
        matrices = [self.state[p].setdefault("matrix", {}) if self.keeps_matrix_state else None for p in params]
        dp_group, dp_rank, dp_world = _data_parallel_group(group)
        mine = self._my_matrices([p.shape for p in params], dp_rank, dp_world)
        updates = self.matrix_updates([inputs[k] for k in mine], [owner_of.get(id(params[k]), params[k]) for k in mine],
                                      group, [matrices[k] for k in mine])
        if self._splits_work(dp_world):  # ZeRO 0: every rank holds every weight; share the owners' updates
            flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
            views = flat.split([p.numel() for p in params])
            for k, u in zip(mine, updates):
                views[k].copy_(u.reshape(-1))
            dist.all_reduce(flat, group=dp_group)
            updates, mine = views, range(len(params))
        for k, u in zip(mine, updates):
            self._apply(params[k], u, group)

    def _splits_work(self, world: int) -> bool:
        return world > 1 and not self.keeps_matrix_state

    def _my_matrices(self, shapes, rank: int, world: int) -> List[int]:
        """Indices of the matrices this rank computes (all of them unless the work is split)."""
        if not self._splits_work(world):
            return list(range(len(shapes)))
        owners = _owners_of_shapes(tuple(tuple(s) for s in shapes), world)
        return [k for k, r in enumerate(owners) if r == rank]

    @staticmethod
    def _apply(p: torch.Tensor, update: torch.Tensor, group) -> None:
        lr = group["lr"]
        if group["weight_decay"]:
            p.mul_(1 - lr * group["weight_decay"])
        p.add_(update.reshape(p.shape), alpha=-lr)

    def start_step_count(self, p: torch.Tensor, state) -> None:
        """A new ``state["step"]`` at 0 (known on the host: nothing to read back)."""
        state["step"] = torch.zeros((), dtype=torch.float32)
        self._host_steps[id(p)] = (state["step"], 0.0)

    def next_step(self, p: torch.Tensor, state) -> float:
        """Advance ``state["step"]`` (a CPU tensor, saved in checkpoints under Adam's name) and return
        the new count, kept on the host: reading the tensor back for every parameter every step
        would be a host round trip per parameter (a device sync, were the tensor on the
        accelerator). The tensor is read again only when it was replaced (a checkpoint was loaded)."""
        step = state["step"]
        known = self._host_steps.get(id(p))
        count = known[1] if known is not None and known[0] is step else float(step)
        if not torch.is_tensor(step):  # a loader may put a plain number back
            step = state["step"] = torch.tensor(float(step), dtype=torch.float32)
        step += 1
        self._host_steps[id(p)] = (step, count + 1)
        return count + 1

    def _adamw_group(self, group) -> None:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                self.start_step_count(p, state)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            step = self.next_step(p, state)
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** step))
