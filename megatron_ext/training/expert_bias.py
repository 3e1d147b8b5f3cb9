"""Aux-loss-free load balancing (``--moe-router-enable-expert-bias``, DeepSeek-V3): each router adds
a per-expert bias to its scores when it chooses experts (not to the weights of their outputs), and
after every optimizer step the bias of each expert that got more tokens than the mean goes down by
``--moe-router-bias-update-rate``, of each expert that got fewer goes up.

megatron-core keeps the bias (``expert_bias``, a persistent buffer: saved and loaded with the
model's weights) and counts the tokens each expert received in training forwards
(``local_tokens_per_expert``). Megatron-LM's own loop moves the bias once per global batch, after
the last micro-batch's backward; under DeepSpeed this loop does it here, after the optimizer step,
from the counts summed over the data-parallel ranks (megatron-core's ``get_updated_expert_bias``),
so every rank holds the same bias and data parallelism does not change it.
"""
from __future__ import annotations

from typing import List

import torch


class ExpertBiasUpdate:
    def __init__(self, model: torch.nn.Module, args):
        self.rate = args.moe_router_bias_update_rate
        self.routers: List[torch.nn.Module] = []
        if getattr(args, "moe_router_enable_expert_bias", False):
            self.routers = [m for m in model.modules() if getattr(m, "expert_bias", None) is not None]

    def discard_counts(self) -> None:
        """Forget tokens counted outside training micro-batches (e.g. SophiaG's curvature pass)."""
        for router in self.routers:
            router.local_tokens_per_expert.zero_()

    def after_optimizer_step(self) -> None:
        """Move every router's bias by the tokens its experts received since the last step."""
        if not self.routers:
            return
        from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias

        counts = torch.stack([r.local_tokens_per_expert for r in self.routers])
        biases = torch.stack([r.expert_bias for r in self.routers])
        updated = get_updated_expert_bias(counts, biases, self.rate)  # sums the counts over data parallel
        with torch.no_grad():
            for router, bias in zip(self.routers, updated):
                router.expert_bias.copy_(bias)
                router.local_tokens_per_expert.zero_()
