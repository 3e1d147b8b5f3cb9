"""The model: megatron-core ``GPTModel``, its ``TransformerConfig`` and layer specs with what each
model feature contributes (megatron_ext/models/features: the attention backend, multi-latent
attention, MoE/MTP)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_ext.models import features, parallel
from megatron_ext.models.specs import mtp_layers_with_groups
from megatron_ext.platform import cpu_compat
from megatron_ext.parametrizations import parametrization_for
from megatron_ext.platform.accelerator import has_gpu


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron pads the vocabulary so every tensor-parallel shard has the same width."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def transformer_config(args, parametrization):

    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    kwargs = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_key_value_heads,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        add_bias_linear=args.add_bias_linear,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        init_method_std=args.init_method_std,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        params_dtype=dtype,
        pipeline_dtype=dtype,  # the activations pipeline stages send each other
        # batched send/receive between stages ends in torch.cuda.synchronize()
        batch_p2p_comm=has_gpu(),
        bf16=args.bf16,
        fp16=args.fp16,
        # Initialising on the CPU from one master weight makes the model independent of the
        # TP size (TP=2 starts from exactly the TP=1 weights); on accelerators it costs start-up
        # time, so it is the default only on CPU.
        use_cpu_initialization=not has_gpu(),
        # Fusions need apex / Transformer Engine / CUDA; the plain paths work everywhere.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
    )
    if args.recompute_activations:
        kwargs.update(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=args.recompute_num_layers)
    kwargs.update(features.config_kwargs(args))
    return features.config_class(args)(**parametrization.configure_model(kwargs))


def build_model(args, vocab_size: int, parametrization=None):
    """A GPTModel for this rank's part of the model (its tensor-parallel shard, pipeline stage and
    experts: ``models.parallel``), initialised and wired by the parametrization (default: the one
    ``args`` select). ``vocab_size`` is the unpadded size."""
    from megatron.core.models.gpt import GPTModel

    parametrization = parametrization or parametrization_for(args)
    padded = padded_vocab_size(vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)

    def build(config, pre_process: bool, post_process: bool, pg_collection):
        spec, mtp_spec = features.layer_specs(config, args)
        if pg_collection is not None and mtp_spec is not None:
            mtp_spec = mtp_layers_with_groups(mtp_spec, pg_collection)
        with cpu_compat.cuda_moves_stay_on_host():  # (a tied embedding's first sync at pipeline parallel > 1)
            model = GPTModel(
                config=config,
                transformer_layer_spec=spec,
                mtp_block_spec=mtp_spec,
                vocab_size=padded,
                max_sequence_length=args.max_position_embeddings,
                pre_process=pre_process,
                post_process=post_process,
                parallel_output=True,
                share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                position_embedding_type=args.position_embedding_type,
                rotary_base=int(args.rope_theta),
                rope_scaling=getattr(args, "use_rope_scaling", False),  # absent from checkpoints saved before the flag
                rope_scaling_factor=getattr(args, "rope_scaling_factor", 8.0),
                pg_collection=pg_collection,
            )
        parametrization.attach(model)
        return model

    return parallel.build_stage(build, transformer_config(args, parametrization))

