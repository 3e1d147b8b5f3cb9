"""DeepSpeed 0.19.8's ZeRO 1/2 step tests, once per param group, whether the global gradient norm
is finite before clipping (``DeepSpeedZeroOptimizer.unscale_and_clip_grads``), with a Python
``bool`` of a device tensor: one host synchronisation per param group per step. ``apply()`` puts
in the same computation decided on the device (an invalid norm clips as an infinite one, as
DeepSpeed does), so clipping costs no host round trip. Only for the DeepSpeed version read;
another version keeps its own code. The overflow check that skips a step with inf/NaN gradients
(fp16, and bf16 unless ``"bf16": {"check_grad_overflow": false}``) is a host decision and stays.
With cpu_compat, the only modules that patch third-party code."""
from __future__ import annotations

import math

import torch

PATCHED_VERSION = "0.19.8"
_applied = False


def device_clip_scale(total_norm, loss_scale: float, clip_grad: float):
    """loss_scale x max(1, (norm / loss_scale + 1e-6) / clip_grad) for a tensor norm, without
    reading it: a NaN, infinite or negative (DeepSpeed's invalid sentinel) norm counts as inf."""
    if torch.is_tensor(total_norm):
        valid = torch.isfinite(total_norm) & (total_norm >= 0)
        norm = torch.where(valid, total_norm, torch.full_like(total_norm, math.inf))
    else:
        norm = total_norm if math.isfinite(float(total_norm)) and total_norm >= 0 else math.inf
        norm = torch.tensor(float(norm), dtype=torch.float)
    clip = torch.clamp(((norm / loss_scale) + 1e-6) / clip_grad, min=1.0)
    return clip * loss_scale


def _unscale_and_clip_grads(self, grad_groups_flat, total_norm):
    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return
    combined_scale = self.loss_scale
    if self.clip_grad > 0.0:
        combined_scale = device_clip_scale(total_norm, self.loss_scale, self.clip_grad)
    for grad in grad_groups_flat:
        for g in (grad if isinstance(grad, list) else [grad]):
            g.data.mul_(1.0 / combined_scale)


def apply() -> bool:
    """Install the device-side clipping test (idempotent). Returns whether it is installed."""
    global _applied
    if _applied:
        return True
    import deepspeed
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if deepspeed.__version__ != PATCHED_VERSION:
        return False
    DeepSpeedZeroOptimizer.original_unscale_and_clip_grads = DeepSpeedZeroOptimizer.unscale_and_clip_grads
    DeepSpeedZeroOptimizer.unscale_and_clip_grads = _unscale_and_clip_grads
    _applied = True
    return True
