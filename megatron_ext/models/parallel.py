"""How the model is spread over ranks: pipeline stages (each rank builds the decoder layers of its
stage, the embedding on the first, the final norm and output layer on the last) and expert
parallelism (each rank builds its share of every MoE layer's experts).

Three rules keep every layout one model (docs/parallelism.md):

* **Single-process names.** megatron-core numbers a stage's layers from 0 on every stage
  (``decoder.layers.0``) and an expert-parallel rank's experts from 0 (``local_experts.0``).
  ``use_global_names`` re-keys both lists with their global numbers (indexing and iteration stay
  local, as megatron-core uses them), so every parameter, state-dict key, checkpoint file, param
  group and optimizer name is the single-process model's on every layout.
* **Pipeline replicas.** A pipeline-parallel model whose word embedding is needed on a later stage
  too (tied output layer, multi-token prediction) keeps a copy there (megatron-core syncs it at
  construction); the copy's gradient is summed with the first stage's (``sum_replica_grads``) so
  both take the same step, and it is marked ``ds_pipe_replicated`` so DeepSpeed's norms count it
  once.
* **Single-process weights on CPU.** With CPU initialisation (no accelerator) megatron-core draws
  every weight from one master matrix with the global RNG, so a tensor-parallel shard is a slice of
  the single-process weight; but a later stage or another expert-parallel rank would draw its
  weights where the single-process model drew the first ones. There each rank also builds the whole
  model once (its tensor-parallel shard, one stage, every expert) and keeps the part it holds: every
  layout starts from the single-process weights and can be checked against one process.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, Iterator, Tuple

import torch
from megatron_ext.platform.accelerator import current_device


def splits_model() -> bool:
    """Whether this run spreads the model's layers or experts over ranks."""
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_world_size() > 1 or ps.get_expert_model_parallel_world_size() > 1


def stage_flags() -> Tuple[bool, bool]:
    """(pre_process, post_process) of this rank's pipeline stage: embedding on the first, final norm,
    output layer and loss on the last."""
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()


def is_expert_parameter(p: torch.Tensor) -> bool:
    """An expert's weight: megatron-core marks them ``allreduce = False`` (reduced over the
    expert-data-parallel group, not the data-parallel one)."""
    return getattr(p, "allreduce", True) is False


def holds_spread_experts(model) -> bool:
    """Whether this rank's part of ``model`` holds experts spread over expert-parallel ranks (a
    pipeline stage without MoE layers holds none)."""
    return any(is_expert_parameter(p) for p in model.parameters())


# -- names ------------------------------------------------------------------------------------------
class OffsetModuleList(torch.nn.ModuleList):
    """A ModuleList whose children are registered under ``offset + i`` (their global numbers) while
    indexing, iteration and ``len`` stay local, as megatron-core's code uses them."""

    def __init__(self, modules, offset: int):
        torch.nn.Module.__init__(self)
        self.offset = offset
        for i, module in enumerate(modules):
            self.add_module(str(offset + i), module)

    def __getitem__(self, index):
        values = list(self._modules.values())
        return values[index] if isinstance(index, int) else torch.nn.ModuleList(values[index])

    def __iter__(self) -> Iterator[torch.nn.Module]:
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)


def offsets(model) -> Tuple[int, int]:
    """(first global layer number, first global expert number) of this rank's part of ``model``."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = model.config
    layer = get_transformer_layer_offset(config) if ps.get_pipeline_model_parallel_world_size() > 1 else 0
    expert = 0
    if config.num_moe_experts:
        per_rank = config.num_moe_experts // ps.get_expert_model_parallel_world_size()
        expert = ps.get_expert_model_parallel_rank() * per_rank
    return layer, expert


def use_global_names(model) -> None:
    """Re-key this stage's decoder layers and this rank's experts with their global numbers."""
    layer, expert = offsets(model)
    if layer and getattr(model, "decoder", None) is not None:
        model.decoder.layers = OffsetModuleList(list(model.decoder.layers), layer)
    if expert:
        for module in list(model.modules()):
            if isinstance(getattr(module, "local_experts", None), torch.nn.ModuleList):
                module.local_experts = OffsetModuleList(list(module.local_experts), expert)


# -- pipeline replicas of the word embedding --------------------------------------------------------
def _shares_embedding(model) -> bool:
    """Whether the word embedding is needed on the last stage too (megatron-core's rule)."""
    return bool(model.share_embeddings_and_output_weights or getattr(model.config, "mtp_num_layers", None))


def embedding_replica(model):
    """The copy of the first stage's word embedding a later stage holds (tied output layer or
    multi-token prediction at pipeline-parallel size > 1), else None."""
    from megatron.core import parallel_state as ps

    if not _shares_embedding(model) or ps.get_pipeline_model_parallel_world_size() == 1 or ps.is_pipeline_first_stage():
        return None
    return model.shared_embedding_or_output_weight()


def mark_pipeline_replicas(model) -> None:
    replica = embedding_replica(model)
    if replica is not None:
        replica.ds_pipe_replicated = True  # DeepSpeed's ZeRO / bf16 norms count the first stage's only


def sum_replica_grads(model) -> None:
    """Sum the word embedding's gradient over the stages holding it (megatron-core's
    ``finalize_model_grads`` does this on its own grad buffers, which DeepSpeed replaces)."""
    from megatron.core import parallel_state as ps

    if (ps.get_pipeline_model_parallel_world_size() == 1 or not _shares_embedding(model)
            or not ps.is_rank_in_embedding_group()):
        return
    weight = model.shared_embedding_or_output_weight()
    if weight is None:
        return
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    torch.distributed.all_reduce(weight.grad, group=ps.get_embedding_group())


# -- counting ---------------------------------------------------------------------------------------
def parameter_counts(model) -> Tuple[int, int]:
    """(all parameters, routed-expert parameters) of the whole model, summed over tensor-parallel
    shards, pipeline stages and expert-parallel ranks; replicas counted once."""
    from megatron.core import parallel_state as ps

    replica = embedding_replica(model)
    tp_rank = ps.get_tensor_model_parallel_rank()
    # [all, routed experts] of the parameters every expert-parallel rank holds alike, and of the
    # experts spread over expert-parallel ranks (megatron-core marks those allreduce = False)
    shared = torch.zeros(2, dtype=torch.long, device=current_device())  # nccl reduces device tensors only
    spread = torch.zeros(1, dtype=torch.long, device=current_device())
    for name, p in model.named_parameters():
        if p is replica:
            continue
        if is_expert_parameter(p):
            spread += p.numel()
        elif getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
            shared += torch.tensor([p.numel(), p.numel() if ".mlp.experts." in name else 0], device=shared.device)
    if torch.distributed.is_initialized():
        for count, group in ((shared, ps.get_model_parallel_group()),  # tensor x pipeline
                             (spread, ps.get_expert_tensor_model_pipeline_parallel_group())):
            if torch.distributed.get_world_size(group) > 1:
                torch.distributed.all_reduce(count, group=group)
    (total, routed), (experts,) = shared.tolist(), spread.tolist()
    return total + experts, routed + experts


# -- single-process weights on CPU ------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _own_group():
    """A process group of this rank alone (created collectively, once)."""
    group, _ = torch.distributed.new_subgroups(group_size=1)
    return group


def _single_process_groups():
    """megatron-core's process groups as one pipeline stage and one expert-parallel rank see them,
    keeping the tensor-parallel and data-parallel ones."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    groups = ProcessGroupCollection.use_mpu_process_groups()
    own = _own_group()
    groups.pp = groups.ep = own
    groups.mp = groups.tp_ep = groups.tp_ep_pp = groups.tp
    groups.expt_dp = groups.dp
    groups.embd = groups.pos_embd = None
    return groups


def single_process_copy(config):
    """``config`` as the single-process model's (one pipeline stage, one expert-parallel rank)."""
    import dataclasses

    changes = dict(pipeline_model_parallel_size=1, expert_model_parallel_size=1)
    if config.num_moe_experts:
        changes["moe_token_dispatcher_type"] = "allgather"
    return dataclasses.replace(config, **changes)


def build_stage(build: Callable, config):
    """This rank's part of the model: ``build(config, pre_process, post_process, pg_collection)``
    for its stage, under single-process names, its pipeline replicas marked, and on CPU with the
    weights the single-process model draws for its part (module docstring)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    rng, streams = torch.get_rng_state(), {k: v.clone() for k, v in tracker.get_states().items()}
    model = build(config, *stage_flags(), None)
    use_global_names(model)
    mark_pipeline_replicas(model)
    if splits_model() and config.use_cpu_initialization:
        torch.set_rng_state(rng)  # draw again from where this model started, as one process would
        tracker.set_states(streams)
        whole = build(single_process_copy(config), True, True, _single_process_groups())
        _copy_weights(whole, model)
    return model


@torch.no_grad()
def _copy_weights(whole, model) -> None:
    source: Dict[str, torch.Tensor] = dict(whole.named_parameters())
    replica = embedding_replica(model)
    for name, p in model.named_parameters():
        if p is replica:  # the later stage's copy of the word embedding
            name = "embedding.word_embeddings.weight"
        p.copy_(source[name])
