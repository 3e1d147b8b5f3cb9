"""DeepSpeed asks its ``mpu`` for the old Megatron ``get_model_parallel_*`` names, which
megatron-core's ``parallel_state`` no longer has; this adapter maps them.

DeepSpeed reads three things from it:
* the tensor-parallel rank/group: replicated parameters are counted on tensor-parallel rank 0 in
  its gradient norms;
* the model-parallel rank/group: megatron-core's model-parallel group, tensor x pipeline. DeepSpeed
  names its checkpoint files by this rank (``mp_rank_XX``: one per pipeline stage and tensor shard,
  ``XX = stage x TP + tensor rank``) and sums its ZeRO gradient norms over this group (every stage
  in the clipping norm);
* the data-parallel rank/group: the ranks holding the same dense weights (expert-parallel ranks
  included; experts reduce over their own group: ``training/expert_parallel.py``).
"""
import torch
from megatron.core import parallel_state as ps


def _model_parallel_rank() -> int:
    return torch.distributed.get_rank(ps.get_model_parallel_group())


def _model_parallel_world_size() -> int:
    return torch.distributed.get_world_size(ps.get_model_parallel_group())


class MegatronCoreMPU:
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_model_parallel_rank = staticmethod(_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(_model_parallel_world_size)
    get_model_parallel_group = staticmethod(ps.get_model_parallel_group)
    get_slice_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_slice_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_slice_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
