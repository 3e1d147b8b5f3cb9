"""``--attention-backend sdpa``: megatron-core's core-attention interface over
``torch.nn.functional.scaled_dot_product_attention`` (chosen in ``models/features/attention_backend.py``)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


def _native_gqa(query, key, value, attn_mask, dropout_p, is_causal) -> bool:
    """Whether the kernel torch will pick reads grouped K/V directly (``enable_gqa``) instead of
    falling back to the quadratic-memory math kernel. CPU's flash kernel does; on CUDA the flash
    kernel does (the memory-efficient one, used with an explicit mask or fp32, does not); elsewhere
    K/V are repeated, which costs linear memory only."""
    if query.device.type == "cpu":
        return True
    if query.device.type == "cuda":
        params = torch.backends.cuda.SDPAParams(query, key, value, attn_mask, dropout_p, is_causal, True)
        return torch.backends.cuda.can_use_flash_attention(params)
    return False


class SDPACoreAttention(MegatronModule):
    """megatron-core's core-attention interface (the ``core_attention`` of a layer spec) over
    ``F.scaled_dot_product_attention``.

    Inputs are megatron-core's: query ``[sq, b, heads, dk]``, key ``[sk, b, groups, dk]``, value
    ``[sk, b, groups, dv]`` (``dk != dv`` for multi-latent attention; ``groups < heads`` for GQA,
    read without repeating K/V where the kernel allows); output ``[sq, b, heads * dv]``.
    ``attention_mask``, when given, is megatron-core's: boolean, True = masked out, broadcastable to
    ``[b, heads, sq, sk]``, and it is the whole mask (causality included), as in the local
    attention; without it a causal layer is causal. The scale is the layer's ``softmax_scale``
    (a parametrization's, e.g. muP's 1/d, or multi-latent attention's) or 1/sqrt(dk). Dropout draws
    from megatron-core's model-parallel RNG, like the local attention.
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 k_channels: Optional[int] = None, v_channels: Optional[int] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        from megatron.core.transformer.utils import is_layer_window_attention

        if config.context_parallel_size != 1:
            raise ValueError("--attention-backend sdpa: context parallelism is not supported")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"--attention-backend sdpa: softmax type {config.softmax_type} is not supported")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise ValueError("--attention-backend sdpa: sliding-window attention is not supported")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.k_channels = k_channels or config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.k_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        from megatron.core import tensor_parallel
        from megatron.core.transformer.enums import AttnMaskType

        if packed_seq_params is not None:
            raise ValueError("--attention-backend sdpa: packed sequences are not supported")
        if attention_bias is not None:
            raise ValueError("--attention-backend sdpa: attention bias is not supported")
        sq, b, heads = query.shape[:3]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d] views
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        mask = None
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool:
                raise ValueError(f"--attention-backend sdpa: attention_mask must be boolean (True = masked), "
                                 f"got {attention_mask.dtype}")
            mask = ~attention_mask
        is_causal = mask is None and mask_type == AttnMaskType.causal and sq > 1
        dropout_p = self.dropout_p if self.training else 0.0
        gqa = k.size(1) != heads
        if gqa and not _native_gqa(q, k, v, mask, dropout_p, is_causal):
            k = k.repeat_interleave(heads // k.size(1), dim=1)
            v = v.repeat_interleave(heads // v.size(1), dim=1)
            gqa = False

        def attend():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                                  scale=self.softmax_scale, enable_gqa=gqa)

        if dropout_p > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = attend()
        else:
            out = attend()
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * out.size(-1))
