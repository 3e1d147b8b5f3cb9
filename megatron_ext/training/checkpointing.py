"""DeepSpeed checkpoints with the client state Megatron-DeepSpeed writes (and universal
conversion needs): iteration, consumed samples/tokens, args, RNG state of every data-parallel
rank, the LR schedule, and ``universal_checkpoint_info``. Megatron's
``latest_checkpointed_iteration.txt`` is written beside DeepSpeed's ``latest``."""
from __future__ import annotations

import os
import random
from typing import Any, Dict, Optional

import numpy as np
import torch

CHECKPOINT_VERSION = 3.0
TRACKER_FILE = "latest_checkpointed_iteration.txt"


def tag_for(iteration: int) -> str:
    return f"global_step{iteration}"


def universal_checkpoint_info(args) -> Dict[str, Any]:
    """What ``ds_to_universal`` needs to merge/split megatron-core GPT tensors across TP sizes."""
    from deepspeed.checkpoint import constants as c

    return {
        c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        c.TP_REPLICATED_PARAMETER_PATTERNS: [
            r".*layernorm\.(weight|bias)$",
            r".*final_layernorm\.(weight|bias)$",
            r".*linear_proj\.bias$",
            r".*linear_fc2\.bias$",
            r".*position_embeddings\.weight$",
        ],
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [r".*linear_proj\.weight$", r".*linear_fc2\.weight$"],
        c.VOCABULARY_PARAMETER_PATTERNS: [r".*word_embeddings\.weight$", r".*output_layer\.weight$"],
        c.ORIGINAL_VOCAB_SIZE: args.vocab_size_unpadded,
        c.PADDED_VOCAB_SIZE: args.padded_vocab_size,
    }


def rng_state() -> Dict[str, Any]:
    from megatron_ext.platform.accelerator import _accel, has_gpu

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if has_gpu():
        state["accelerator"] = _accel().get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    from megatron_ext.platform.accelerator import _accel, has_gpu

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if has_gpu() and "accelerator" in state:
        _accel().set_rng_state(state["accelerator"])


def _gather_rng_states():
    """RNG state of every data-parallel rank (DeepSpeed writes client state from DP rank 0 only)."""
    from megatron.core import parallel_state as ps

    states = [None] * ps.get_data_parallel_world_size()
    torch.distributed.all_gather_object(states, rng_state(), group=ps.get_data_parallel_group())
    return states


def save_checkpoint(engine, args, iteration: int, consumed_samples: int, scheduler) -> str:
    """Write ``<save>/global_step<iteration>``; returns the tag directory."""
    client_state = {
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "tokens": consumed_samples * args.seq_length,
        "lr_scheduler": scheduler.state_dict(),
        "universal_checkpoint_info": universal_checkpoint_info(args),
    }
    rng = _gather_rng_states()
    if not args.no_save_rng:
        client_state["rng_state"] = rng
    tag = tag_for(iteration)
    engine.save_checkpoint(args.save, tag=tag, client_state=client_state, save_latest=True)
    if torch.distributed.get_rank() == 0:
        tracker = os.path.join(args.save, TRACKER_FILE)
        with open(tracker + ".tmp", "w") as f:
            f.write(str(iteration))
        os.replace(tracker + ".tmp", tracker)
    torch.distributed.barrier()
    return os.path.join(args.save, tag)


def latest_tag(load_dir: str) -> Optional[str]:
    path = os.path.join(load_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    return tag or None


def load_checkpoint(engine, args, scheduler) -> Dict[str, Any]:
    """Resume from ``args.load``. Returns ``{"iteration", "consumed_samples", "path"}`` (zeros and
    path None when there is nothing to load yet, so the same command starts or resumes a run)."""
    from megatron.core import parallel_state as ps

    start = {"iteration": 0, "consumed_samples": 0, "path": None}
    tag = latest_tag(args.load)
    if tag is None:
        return start
    load_optim = not (args.no_load_optim or args.finetune)
    path, client = engine.load_checkpoint(
        args.load,
        tag=tag,
        load_optimizer_states=load_optim,
        load_lr_scheduler_states=False,
        load_module_only=args.finetune,
    )
    if path is None:
        raise RuntimeError(f"--load {args.load}: could not load checkpoint '{tag}'")
    start["path"] = os.path.dirname(path)  # DeepSpeed returns the model-states file inside the tag
    if args.finetune:
        return start
    start["iteration"] = client["iteration"]
    start["consumed_samples"] = client["consumed_samples"]
    scheduler.load_state_dict({**client["lr_scheduler"], "position": start["consumed_samples"]})
    states = client.get("rng_state")
    if states and not args.no_load_rng:
        dp_rank = ps.get_data_parallel_rank()
        set_rng_state(states[dp_rank] if dp_rank < len(states) else states[0])
    return start
