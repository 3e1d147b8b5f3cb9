"""What a parametrization does to a built megatron-core GPTModel that its TransformerConfig cannot
express: forward multipliers (megatron-core 0.16 has no muP knobs) and the output layer's own init
(megatron-core initialises the unembedding with the hidden ``init_method``)."""
from __future__ import annotations

from typing import List

import torch


def _scaled_output(multiplier: float):
    """A forward hook scaling a megatron-core ``(output, bias)`` pair."""

    def hook(module, inputs, output):
        out, bias = output
        return out * multiplier, (bias * multiplier if bias is not None else None)

    return hook


def residual_branches(model) -> List[torch.nn.Module]:
    """The modules whose outputs are added to the residual stream: each layer's attention and MLP
    (an MoE layer returns ``(output, None)`` like a dense MLP), in the decoder and in the MTP layers."""
    layers = list(model.decoder.layers)
    if getattr(model, "mtp", None) is not None:  # --mtp-num-layers: each MTP layer wraps one transformer layer
        layers += [mtp_layer.transformer_layer for mtp_layer in model.mtp.layers]
    return [m for layer in layers for m in (layer.self_attention, layer.mlp)]


def attach_multipliers(model, logit_multiplier: float, residual_multiplier: float) -> None:
    """x + r F(x) for every residual branch F, logits x l (hooks kept on ``model.parametrization_hooks``)."""
    handles = []
    if residual_multiplier != 1.0:
        for branch in residual_branches(model):
            handles.append(branch.register_forward_hook(_scaled_output(residual_multiplier)))
    if logit_multiplier != 1.0 and model.post_process:  # (a pipeline stage before the last has no output layer)
        handles.append(model.output_layer.register_forward_hook(_scaled_output(logit_multiplier)))
    model.parametrization_hooks = handles


@torch.no_grad()
def init_output_layer(model, std: float) -> None:
    """Re-draw the (untied) output layer from N(0, std), the same way megatron-core draws its weights:
    from one master matrix split across tensor-parallel ranks on CPU initialisation (so the result
    does not depend on the TP size), from the model-parallel RNG on the accelerator."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu, _initialize_affine_weight_gpu
    from megatron.core.utils import init_method_normal

    weight = model.output_layer.weight
    init = init_method_normal(std)
    if model.config.use_cpu_initialization:
        world = ps.get_tensor_model_parallel_world_size()
        _initialize_affine_weight_cpu(
            weight, weight.size(0) * world, weight.size(1), weight.size(0), 0, init,
            params_dtype=weight.dtype, rank=ps.get_tensor_model_parallel_rank(), world_size=world,
            skip_set_tensor_parallel_attributes=True,
        )
    else:
        _initialize_affine_weight_gpu(weight, init, partition_dim=0)
