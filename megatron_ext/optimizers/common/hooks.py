"""The optimizer hook protocol: what an optimizer needs from the training loop beyond
``backward``/``step``, asked for by optional methods on the optimizer object itself.

The trainer never tests which optimizer it runs; it calls the functions of this module, which
call the optimizer's hooks when it has them and do nothing otherwise. An optimizer built by a
plug-in may define any of these methods (all optional):

``engine_ready(engine) -> None``
    Called once, right after ``deepspeed.initialize`` and before a checkpoint is loaded. Raise
    :class:`UnsupportedEngineSetting` (one line, naming the flag) for an engine setting the
    optimizer cannot serve. Settings known from the flags are better rejected earlier, in the
    plug-in's ``validate_args``; this is the backstop for settings that come from a user's
    DeepSpeed config.

``eval_mode() -> bool`` and ``train_mode() -> bool``
    For optimizers whose evaluation weights differ from the weights gradients are taken at
    (schedule-free: train at ``y``, evaluate at the average ``x``). ``eval_mode`` moves the
    optimizer's parameters (DeepSpeed's *master* copies: the model's own tensors with fp32 ZeRO 0,
    fp32 copies with bf16/fp16, flat 1-D fp32 partitions with ZeRO 1/2) to the evaluation point;
    ``train_mode`` moves them back and must restore the training weights bit-for-bit. Each returns
    whether it changed anything. The trainer runs evaluation and checkpoint saving inside
    :func:`evaluation_weights`, so checkpoints hold the evaluation weights, and calls
    :func:`train_mode` once before training (after a checkpoint was loaded). Because master and
    model weights are different tensors under mixed precision and ZeRO 1/2,
    :func:`sync_model_from_master` copies the master weights into the weights the forward pass uses
    after every switch. ZeRO 3 is not supported by that copy (it raises).

``curvature_pass_due() -> bool``, ``begin_curvature_pass(num_tokens) -> None``, ``end_curvature_pass() -> None``
    For optimizers that keep a curvature estimate refreshed from an extra pass (SophiaG's
    Gauss-Newton-Bartlett Hessian). Before each training iteration the trainer asks
    :func:`curvature_pass_due`; when it is, the trainer's curvature pass (``training/curvature_pass.py``;
    the Megatron-DeepSpeed integration has its own over the fork's loop) runs every micro-batch of the
    iteration forward, samples labels from the model's own softmax (gathered over the
    tensor-parallel vocabulary shards), back-propagates the loss on those labels through the
    DeepSpeed engine (so data-parallel reduction, ZeRO partitioning and loss scaling are the
    engine's own) and calls ``engine.step()`` with gradient clipping switched off. Between
    ``begin_curvature_pass`` and ``end_curvature_pass`` the optimizer's ``step()`` must update only
    its curvature estimate from the gradients it receives (``num_tokens`` is the number of
    loss tokens in the whole global batch, the ``B`` of the estimator), never the weights.

``universal_checkpoint_loaded() -> Optional[str]``
    Called after the optimizer state was restored from a universal checkpoint (DeepSpeed's
    ``ds_to_universal`` carries only ``exp_avg``/``exp_avg_sq``/``step`` per element). An optimizer
    with state that cannot be resharded (Shampoo's factor matrices) drops that state here so it is
    re-created, and returns a one-line warning saying so (printed once, by rank 0).
"""
from __future__ import annotations

import contextlib
import zlib
from typing import Optional

import torch

from megatron_ext.registry import EngineSupport


class UnsupportedEngineSetting(ValueError):
    """The optimizer cannot run under this engine setting; the message is one line."""


# The engine support of an optimizer with evaluation weights (``eval_mode``): they are switched
# into the model by ``sync_model_from_master``, which knows ZeRO 0/1/2 layouts only.
SWITCHES_EVALUATION_WEIGHTS = EngineSupport(
    zero_stages=(0, 1, 2), bf16_optimizer=False,
    reason="its evaluation weights cannot be switched into a ZeRO 3 partitioned model")


def _has(optimizer, name: str) -> bool:
    return callable(getattr(optimizer, name, None))


# -- engine ready ------------------------------------------------------------------------------
def engine_ready(optimizer, engine) -> None:
    if _has(optimizer, "engine_ready"):
        optimizer.engine_ready(engine)


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage()) if engine.zero_optimization() else 0


# -- universal checkpoint loaded ---------------------------------------------------------------
def universal_checkpoint_loaded(optimizer) -> Optional[str]:
    return optimizer.universal_checkpoint_loaded() if _has(optimizer, "universal_checkpoint_loaded") else None


# -- master -> model weights -------------------------------------------------------------------
@torch.no_grad()
def sync_model_from_master(engine) -> None:
    """Copy DeepSpeed's master weights into the weights the model's forward pass uses.

    * fp32 without ZeRO: the optimizer owns the model's tensors; nothing to do.
    * ZeRO 1/2 (any precision) and DeepSpeed's BF16 optimizer: every rank copies its fp32
      partition into its low-precision partition and the partitions are all-gathered
      (``update_lp_params``, the copy DeepSpeed itself does at the end of ``step``).
    * bf16/fp16 without ZeRO (``FP16_UnfusedOptimizer``): per-tensor fp32 copies -> model tensors.
    """
    opt = engine.optimizer
    if opt is getattr(engine, "basic_optimizer", None) or opt is None:
        return
    if zero_stage(engine) == 3:  # declared by SWITCHES_EVALUATION_WEIGHTS, checked by the run plan
        raise RuntimeError("evaluation weights cannot be switched into a ZeRO 3 partitioned model")
    if _has(opt, "update_lp_params"):
        opt.update_lp_params()
        return
    fp32_groups, lp_groups = getattr(opt, "fp32_groups", None), getattr(opt, "fp16_groups", None)
    if fp32_groups is not None and lp_groups is not None and not hasattr(opt, "fp32_groups_flat"):
        for fp32_group, lp_group in zip(fp32_groups, lp_groups):
            for master, lp in zip(fp32_group, lp_group):
                lp.data.copy_(master.data)
        return
    raise UnsupportedEngineSetting(
        f"cannot copy master weights into the model for DeepSpeed optimizer wrapper {type(opt).__name__}"
    )


# -- train / eval weights ----------------------------------------------------------------------
def train_mode(optimizer, engine) -> None:
    """Put the optimizer (and the model's weights) in training mode; a no-op for most optimizers."""
    if _has(optimizer, "train_mode") and optimizer.train_mode():
        sync_model_from_master(engine)


@contextlib.contextmanager
def evaluation_weights(optimizer, engine):
    """Run the body (evaluation, checkpoint saving) with the optimizer's evaluation weights in the
    model, then restore the training weights exactly."""
    if not _has(optimizer, "eval_mode"):
        yield
        return
    if optimizer.eval_mode():
        sync_model_from_master(engine)
    try:
        yield
    finally:
        train_mode(optimizer, engine)


# -- gradient clipping -------------------------------------------------------------------------
@contextlib.contextmanager
def gradient_clipping_disabled(engine):
    """Switch DeepSpeed's gradient clipping off for the body: the engine's own (fp32 without
    ZeRO) and the wrapper's (ZeRO 1/2/3, BF16 optimizer, FP16 optimizers keep ``clip_grad``)."""
    saved = []
    config = engine._config
    saved.append((config, "gradient_clipping", config.gradient_clipping))
    config.gradient_clipping = 0.0
    opt = engine.optimizer
    if opt is not getattr(engine, "basic_optimizer", None) and hasattr(opt, "clip_grad"):
        saved.append((opt, "clip_grad", opt.clip_grad))
        opt.clip_grad = 0.0
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


# -- curvature pass ----------------------------------------------------------------------------
def curvature_pass_due(optimizer) -> bool:
    return _has(optimizer, "curvature_pass_due") and bool(optimizer.curvature_pass_due())


def _full_vocab_logits(logits: torch.Tensor) -> torch.Tensor:
    """[b, s, V/tp] vocabulary-parallel logits -> [b, s, V] on every tensor-parallel rank
    (autograd: the backward keeps this rank's slice of the gradient)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import (
        gather_from_tensor_model_parallel_region,
    )

    if ps.get_tensor_model_parallel_world_size() == 1:
        return logits
    return gather_from_tensor_model_parallel_region(logits)


def sample_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One label per position drawn from softmax(logits) (logits [..., V]); float32 sampling."""
    probs = torch.softmax(logits.detach().float(), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def curvature_label_generator(device, seed: int, iteration: int, slot: int) -> torch.Generator:
    # ``slot`` is the micro-batch's place in the global batch (micro * dp_size + dp_rank, the order
    # the sampler hands out samples), so the draws do not depend on how the batch is split between
    # data-parallel ranks and accumulation steps. Same on every tensor-parallel rank (they must draw
    # the same labels); independent of the global RNG streams, so the pass changes neither the data
    # order nor a resumed run.
    key = zlib.crc32(f"{seed}/{iteration}/{slot}".encode())
    gen = torch.Generator(device=device)
    gen.manual_seed(key)
    return gen


def sampled_label_losses(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-token cross entropy of (vocabulary-parallel) logits against labels sampled from their
    own softmax; also what the Megatron-DeepSpeed integration's curvature pass computes."""
    logits = _full_vocab_logits(logits).float()
    labels = sample_labels(logits, generator)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
    ).reshape(labels.shape)
