"""Expert parallelism (``--expert-model-parallel-size``) inside DeepSpeed's engine.

megatron-core spreads each MoE layer's experts over the expert-parallel group and routes tokens to
them with its all-to-all dispatcher; it marks the experts' weights ``allreduce = False``. Their
gradients must then be reduced over the expert-data-parallel group (the ranks holding the same
experts), not the data-parallel one: DeepSpeed does that for its own MoE parameters, so the experts
become DeepSpeed MoE parameters over megatron-core's groups (``platform/deepspeed_compat.py``:
``adopt_expert_groups``), and the optimizer's param groups keep experts in groups of their own
(``optimizers/common/param_groups.py``), which ZeRO 1/2 partition over the expert-data-parallel
group. With ZeRO 0 DeepSpeed averages expert gradients over the whole data-parallel size, which is
right: the all-to-all already summed every data-parallel rank's tokens into them.
"""
from __future__ import annotations
from megatron_ext.models.parallel import holds_spread_experts
from megatron_ext.platform import deepspeed_compat


def wire_expert_parallel(model, args) -> None:
    """Before the optimizer and engine are built: let DeepSpeed treat the experts as its own (on a
    pipeline stage without MoE layers there are none: its engine stays a plain one)."""

    if not holds_spread_experts(model):
        return
    from megatron.core import parallel_state as ps

    deepspeed_compat.adopt_expert_groups(model, ps.get_expert_model_parallel_group(),
                                         ps.get_expert_data_parallel_group(), args.num_experts)
