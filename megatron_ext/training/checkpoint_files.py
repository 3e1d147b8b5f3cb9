"""The one module that knows how a checkpoint directory is laid out and how its files are read.

A run's ``--save`` directory holds DeepSpeed tag folders ``global_step<N>``, DeepSpeed's ``latest``
(naming the tag to resume), Megatron's ``latest_checkpointed_iteration.txt``, and, after a universal
conversion, ``global_step<N>_universal`` with ``latest_universal``. A tag folder holds one
``mp_rank_<TP>_model_states.pt`` per tensor-parallel rank (module weights and the client state:
iteration, consumed samples, args, LR schedule, RNG) and, under ZeRO 1/2, one
``*_optim_states.pt`` per data-parallel rank.

Every read goes through ``load_states``: any failure (missing, truncated, not a torch file) is
one ``CheckpointFileError`` line naming the file.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Any, Dict, List, Optional, Tuple

LATEST = "latest"
LATEST_UNIVERSAL = "latest_universal"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
MODEL_STATES = "mp_rank_*_model_states.pt"
OPTIM_STATES = "*_optim_states.pt"
TAG_PATTERN = re.compile(r"global_step(\d+)")


class CheckpointFileError(ValueError):
    """A checkpoint file or folder that cannot be used; the message is one line naming it."""


def tag_for(iteration: int) -> str:
    return f"global_step{iteration}"


def model_states_files(tag_dir: str) -> List[str]:
    return sorted(glob.glob(os.path.join(glob.escape(tag_dir), MODEL_STATES)))


def model_states_file(tag_dir: str, tp_rank: int = 0) -> str:
    return os.path.join(tag_dir, f"mp_rank_{tp_rank:02d}_model_states.pt")


def optim_states_files(tag_dir: str) -> List[str]:
    return sorted(glob.glob(os.path.join(glob.escape(tag_dir), OPTIM_STATES)))


def read_latest(load_dir: str, name: str = LATEST) -> Optional[str]:
    """The tag a ``latest``-style file names, or None (no file, or an empty one)."""
    path = os.path.join(load_dir, name)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            tag = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointFileError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    return tag or None


def load_states(path: str) -> Dict[str, Any]:
    """A DeepSpeed ``*.pt`` file, memory-mapped where possible (reading the client state of a big
    model-states file reads no tensors). Any failure is one CheckpointFileError line naming it."""
    import torch

    if not os.path.isfile(path):
        raise CheckpointFileError(f"{path}: missing")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError as e:  # written in the legacy (non-zip) format: no mmap
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same bad input
        detail = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointFileError(f"{path}: cannot read ({type(e).__name__}: {detail}); the file is damaged or "
                                  "not a checkpoint file") from None


def client_state(tag_dir: str) -> Dict[str, Any]:
    """The client state (and module) of a tag folder's first model-states file."""
    files = model_states_files(tag_dir)
    if not files:
        raise CheckpointFileError(f"{tag_dir}: checkpoint missing or incomplete (no {MODEL_STATES})")
    state = load_states(files[0])
    if not isinstance(state, dict) or "module" not in state:
        raise CheckpointFileError(f"{files[0]}: not a DeepSpeed model-states file")
    return state


def saved_zero_stage(client: Dict[str, Any]) -> Optional[int]:
    """The ZeRO stage a checkpoint was written with (from its saved args, else its DeepSpeed config)."""
    saved = client.get("args") or {}
    if saved.get("zero_stage") is not None:
        return int(saved["zero_stage"])
    stage = ((client.get("ds_config") or {}).get("zero_optimization") or {}).get("stage")
    return None if stage is None else int(stage)


def find_checkpoint(path: str) -> Tuple[str, str]:
    """``(load dir, tag)`` for a run directory (its ``latest`` checkpoint) or a tag folder."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointFileError(f"{path}: no such directory")
    tag = read_latest(path)
    if tag is not None:
        if not model_states_files(os.path.join(path, tag)):
            raise CheckpointFileError(f"{path}: '{LATEST}' names {tag}, but {os.path.join(path, tag)} holds no "
                                      "checkpoint")
        return path, tag
    if model_states_files(path):
        return os.path.dirname(path), os.path.basename(path)
    raise CheckpointFileError(f"{path}: not a checkpoint (no {MODEL_STATES} files) and not a run directory "
                              f"(no '{LATEST}' file)")


def own_checkpoints(save_dir: str) -> List[Tuple[int, str]]:
    """``(iteration, name)`` of the run's own checkpoints, oldest first: real directories named
    exactly ``global_step<N>`` holding a model-states file (never ``_universal`` folders, links or
    folders made by hand)."""
    found = []
    for name in os.listdir(save_dir):
        match = TAG_PATTERN.fullmatch(name)
        path = os.path.join(save_dir, name)
        if match and os.path.isdir(path) and not os.path.islink(path) and model_states_files(path):
            found.append((int(match.group(1)), name))
    return sorted(found)
