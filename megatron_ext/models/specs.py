"""megatron-core layer specs: the ones a model config asks for, and a copy of a spec with its core
attention replaced (what the attention backends and multi-latent attention rewrite)."""
from __future__ import annotations

import dataclasses


def base_layer_specs(config, normalization: str, use_transformer_engine: bool = False):
    """``(decoder spec, MTP block spec or None)`` from megatron-core's local (non-TE) specs, or its
    Transformer Engine specs (``--attention-backend te``; the attention-backend feature asks for
    them). MoE layers (per ``moe_layer_freq``), MTP, multi-latent attention and qk-layernorm come
    from the config (the features' ``config_kwargs``).

    Dense without MTP keeps the single layer spec (unchanged parameter names and init)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
        get_gpt_mtp_block_spec,
    )

    te = use_transformer_engine
    attention = dict(qk_layernorm=config.qk_layernorm, multi_latent_attention=config.multi_latent_attention)
    if config.num_moe_experts is None:  # (Transformer Engine reads the norm type from the config)
        spec = (get_gpt_layer_with_transformer_engine_spec(**attention) if te else
                get_gpt_layer_local_spec(normalization=normalization, **attention))
    else:  # per-layer MoE or dense MLP following config.moe_layer_freq
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=te, normalization=normalization)
    mtp = None
    if config.mtp_num_layers is not None:
        mtp = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=te)
    return spec, mtp


def with_core_attention(spec, core_attention):
    """A copy of a megatron-core spec tree (ModuleSpec / submodule dataclasses / lists) with every
    ``core_attention`` that is megatron-core's local ``DotProductAttention`` replaced."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.spec_utils import ModuleSpec

    def is_local(value) -> bool:
        return value is DotProductAttention or (isinstance(value, ModuleSpec) and value.module is DotProductAttention)

    def walk(node):
        if isinstance(node, (list, tuple)):
            new = [walk(n) for n in node]
            return node if all(a is b for a, b in zip(new, node)) else type(node)(new)
        if not dataclasses.is_dataclass(node) or isinstance(node, type):
            return node
        changes = {}
        for field in dataclasses.fields(node):
            value = getattr(node, field.name)
            if field.name == "core_attention" and is_local(value):
                changes[field.name] = core_attention
            else:
                new = walk(value)
                if new is not value:
                    changes[field.name] = new
        return dataclasses.replace(node, **changes) if changes else node

    return walk(spec)


def mtp_layers_with_groups(mtp_spec, pg_collection):
    """A copy of an MTP block spec whose transformer layers are built with ``pg_collection``:
    megatron-core 0.16.1 builds them with the default (parallel_state) groups whatever groups the
    model is given (``models.parallel`` builds a model under other groups)."""
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec

    def with_groups(layer_spec):
        layer = layer_spec.submodules.transformer_layer
        layer = dataclasses.replace(layer, params={**(layer.params or {}), "pg_collection": pg_collection})
        return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules,
                                                                             transformer_layer=layer))

    assert all(isinstance(spec, ModuleSpec) for spec in mtp_spec.layer_specs)
    return dataclasses.replace(mtp_spec, layer_specs=[with_groups(spec) for spec in mtp_spec.layer_specs])
