"""Whole weight matrices for optimizers that need a matrix's 2-D shape (Muon, Shampoo), whatever
the engine did to it.

* ZeRO 1/2 (and DeepSpeed's bf16 optimizer) hand the base optimizer ONE flat 1-D fp32 partition
  per param group, this rank's slice of the group's parameters flattened end to end (padding at the
  end only). :class:`FlatLayout` knows which parameter lives where: it all-gathers the partitions
  into the group's full flat tensor and views each parameter in its shape again.
* Tensor parallelism splits a matrix across ranks along ``partition_dim`` (megatron-core's
  attribute). :func:`tp_full` all-gathers the shards into the whole matrix, :func:`tp_shard`
  takes this rank's shard back. Concatenated shards can be a row/column permutation of the TP=1
  matrix (SwiGLU's fused gate/up); the updates used here (Newton-Schulz, Shampoo's two-sided
  preconditioning) commute with such permutations, so the result equals the TP=1 one.
* bf16/fp16 without ZeRO: the optimizer holds fp32 copies that lost megatron's attributes; the
  model parameter each copy stands for is remembered (:func:`model_params_of`).

DeepSpeed's own Muon support works inside ZeRO's flattening and does not see megatron-core's
tensor-parallel shards, hence this module.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List

import torch
import torch.distributed as dist


@dataclasses.dataclass
class Entry:
    """One parameter inside a group's full flat tensor."""

    offset: int
    numel: int
    shape: torch.Size
    model_param: torch.Tensor  # carries megatron-core's TP attributes


class FlatLayout:
    """Where each parameter of a ZeRO 1/2 param group sits in the flat partitions."""

    def __init__(self, model_params: List[torch.Tensor], partition_size: int, group):
        self.partition_size = int(partition_size)
        self.group = group
        self.rank = dist.get_rank(group=group)
        self.world = dist.get_world_size(group=group)
        self.entries: List[Entry] = []
        offset = 0
        for p in model_params:
            self.entries.append(Entry(offset, p.numel(), p.shape, p))
            offset += p.numel()
        if offset > self.partition_size * self.world:
            raise RuntimeError("ZeRO flat layout does not match the group's parameters")

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's flat partition -> the group's full flat tensor (all ranks)."""
        if self.world == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local.contiguous(), group=self.group)  # (gloo lacks all_gather_into_tensor)
        return torch.cat(parts)

    def gather_many(self, locals_: List[torch.Tensor]) -> List[torch.Tensor]:
        """Several flat partitions at once (one collective) -> each one's full flat tensor."""
        n = len(locals_)
        gathered = self.gather(torch.cat(locals_))  # rank-major: [rank][tensor][partition]
        return list(gathered.view(self.world, n, self.partition_size).transpose(0, 1).reshape(n, -1))

    def local(self, full: torch.Tensor) -> torch.Tensor:
        return full.narrow(0, self.rank * self.partition_size, self.partition_size)


# Set on a parameter that carries the tensor-parallel attribute yet is whole on every tensor-parallel
# rank (Megatron-DeepSpeed's DeepSpeed-MoE experts without expert tensor parallelism): never gathered.
WHOLE_ON_TP_RANKS = "megatron_ext_whole_on_tp_ranks"


def is_tensor_parallel(model_param: torch.Tensor) -> bool:
    """Whether ``model_param`` is split across the tensor-parallel ranks (megatron's attribute)."""
    return bool(getattr(model_param, "tensor_model_parallel", False)) and not getattr(model_param, WHOLE_ON_TP_RANKS,
                                                                                      False)


def is_tp_sharded(model_param: torch.Tensor) -> bool:
    from megatron.core import parallel_state as ps

    return (is_tensor_parallel(model_param)
            and ps.model_parallel_is_initialized()
            and ps.get_tensor_model_parallel_world_size() > 1)


def tp_full(shard: torch.Tensor, model_param: torch.Tensor) -> torch.Tensor:
    """All-gather a tensor-parallel shard (shaped like the model's shard) into the whole matrix."""
    if not is_tp_sharded(model_param):
        return shard
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group=group))]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=model_param.partition_dim)


def tp_shard(full: torch.Tensor, model_param: torch.Tensor) -> torch.Tensor:
    if not is_tp_sharded(model_param):
        return full
    from megatron.core import parallel_state as ps

    world = ps.get_tensor_model_parallel_world_size()
    return full.chunk(world, dim=model_param.partition_dim)[ps.get_tensor_model_parallel_rank()]


def number_groups(param_groups) -> None:
    """Give every param group a ``group_index`` (its position at construction). Per-group lookups
    key on it, not on the list position or the dict's identity: ZeRO's step swaps in one group at a
    time (positions shift) and loading a checkpoint replaces the group dicts (ids change)."""
    for i, group in enumerate(param_groups):
        group.setdefault("group_index", i)


def model_params_of(engine, param_groups) -> Dict[int, List[torch.Tensor]]:
    """By ``group_index``: the model parameters behind the optimizer's tensors, in the order the
    engine laid them out (ZeRO's flattening order, or the fp32 copies' order)."""
    wrapper = engine.optimizer
    if hasattr(wrapper, "round_robin_bit16_groups"):  # ZeRO 1/2
        by_position = wrapper.round_robin_bit16_groups
    elif hasattr(wrapper, "fp16_groups"):  # FP16_UnfusedOptimizer (bf16/fp16 without ZeRO)
        by_position = wrapper.fp16_groups
    else:
        by_position = [list(g["params"]) for g in param_groups]
    return {g["group_index"]: list(params) for g, params in zip(param_groups, by_position)}


def flat_layouts(engine, param_groups) -> Dict[int, FlatLayout]:
    """ZeRO 1/2: the flat layout of every param group, by ``group_index``; empty when the engine
    does not flatten groups."""
    wrapper = engine.optimizer
    if not hasattr(wrapper, "round_robin_bit16_groups"):
        return {}
    model_params = model_params_of(engine, param_groups)
    return {g["group_index"]: FlatLayout(model_params[g["group_index"]], wrapper.partition_size[i],
                                         wrapper.real_dp_process_group[i])
            for i, g in enumerate(param_groups)}
