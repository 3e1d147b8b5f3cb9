"""DeepSpeed asks its ``mpu`` for the old Megatron ``get_model_parallel_*`` names, which
megatron-core's ``parallel_state`` no longer has; this adapter maps them."""
from megatron.core import parallel_state as ps


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
    # Pipeline parallelism is 1 here, so "model parallel" is the tensor-parallel group.
    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_slice_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_slice_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_slice_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
