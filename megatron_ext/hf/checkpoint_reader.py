"""Whole fp32 weights and saved flags of any checkpoint the trainer writes: the one place the Hugging
Face tools read our checkpoint layouts (through the helpers of ``training/universal.py`` and
``training/checkpointing.py``).

Where the fp32 weights are, by layout (checked by tests/test_hf_export.py):

* **fp32 training, ZeRO 0/1/2**: the model-states files (``mp_rank_XX_model_states.pt``) hold the
  weights themselves; ZeRO's fp32 partitions are exact copies of them (tested equal), so the large
  optimizer files are not read.
* **bf16/fp16, ZeRO 1/2**: the fp32 master weights are in the ZeRO optimizer partitions
  (``[bf16_]zero_pp_rank_D_mp_rank_XX_optim_states.pt``); DeepSpeed's own
  ``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` rebuilds them, one tensor-parallel rank
  at a time (it reads every ``*_optim_states.pt`` of a folder as one data-parallel group, so each TP
  rank's files are linked into a temporary folder of their own).
* **ZeRO 3** (``zero_pp_rank_D_mp_rank_XX_model_states.pt``, any precision): the same DeepSpeed
  function, per TP rank.
* **bf16/fp16, ZeRO 0**: DeepSpeed's mixed-precision optimizer keeps its fp32 copies inside the
  model-states file (``optimizer.fp32_groups``, one list per param group, in the order of the
  group's ``param_names``).
* **universal** (``zero/<name>/fp32.pt``, written by ``megatron-ext to-universal``): whole fp32
  tensors, vocabulary already unpadded.
* a checkpoint with no fp32 copy at all (``import-hf`` of a bf16 model, never trained): its weights
  as stored, said so in ``notes``.

Tensor-parallel shards are merged with the layout the checkpoint records
(``tensor_parallel.py``), and vocabulary rows are cut back to the tokenizer's vocabulary.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import os
import re
import shutil
import tempfile
import time
import types
from typing import Callable, Dict, List, Optional

import torch

from megatron_ext.hf import HFError
from megatron_ext.hf import tensor_parallel as tp_layout
from megatron_ext.training.checkpoint_files import model_states_file

LATEST = "latest"
_RANK = re.compile(r"mp_rank_(\d+)")


@dataclasses.dataclass
class CheckpointWeights:
    tag_dir: str  # the checkpoint folder read
    args: types.SimpleNamespace  # the flags the run saved (its args)
    state: Dict[str, torch.Tensor]  # megatron-core names -> whole tensors, vocabulary rows unpadded
    dtype: torch.dtype  # of the weights read (float32 unless the checkpoint holds no fp32 copy)
    source: str  # where the weights came from, one line
    iteration: Optional[int]
    notes: List[str]


def locate(path: str, say: Callable[[str], None] = lambda _: None) -> str:
    """The checkpoint folder for ``path``: a checkpoint folder itself (``global_stepN``, a universal
    ``..._universal`` folder) or a run directory (its ``latest`` checkpoint, else ``latest_universal``)."""
    from megatron_ext.training.checkpoint_files import LATEST_UNIVERSAL, read_latest

    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise HFError(f"{path}: no such checkpoint directory")
    if _model_files(path):
        return path
    for name in (LATEST, LATEST_UNIVERSAL):
        tag = read_latest(path, name)
        if tag is None:
            continue
        tag_dir = os.path.join(path, tag)
        if not _model_files(tag_dir):
            raise HFError(f"{path}: '{name}' names {tag}, but {tag_dir} holds no checkpoint")
        say(f"{path}: '{name}' names {tag}")
        return tag_dir
    raise HFError(f"{path}: not a checkpoint (no *model_states.pt files) and not a run directory "
                  f"(no 'latest' or '{LATEST_UNIVERSAL}' file)")


def _load_states(path: str):
    """A checkpoint file through the project's one reader; a bad file is HFError (one line)."""
    from megatron_ext.training.checkpoint_files import CheckpointFileError, load_states

    try:
        return load_states(path)
    except CheckpointFileError as e:
        raise HFError(str(e)) from None


def _model_files(tag_dir: str) -> List[str]:
    return sorted(glob.glob(os.path.join(glob.escape(tag_dir), "*mp_rank_*_model_states.pt")))


def _ranks(files: List[str]) -> List[int]:
    return sorted({int(_RANK.search(os.path.basename(f)).group(1)) for f in files})


def _saved_client(tag_dir: str):
    """(the model-states files, the first one's client state, which holds the saved flags)."""
    files = _model_files(tag_dir)
    client = _load_states(files[0])
    if not isinstance(client, dict) or not client.get("args"):
        raise HFError(f"{files[0]}: no saved flags ('args') in the checkpoint: not written by megatron_ext")
    return files, client


def saved_args(tag_dir: str) -> types.SimpleNamespace:
    """The flags the run saved with the checkpoint (any of its model-states files)."""
    return types.SimpleNamespace(**_saved_client(tag_dir)[1]["args"])


def read(path: str, say: Callable[[str], None] = lambda _: None) -> CheckpointWeights:
    """Whole weights of the checkpoint at ``path`` (see ``locate``); ``say`` gets progress lines."""

    tag_dir = locate(path, say)
    files, client = _saved_client(tag_dir)
    args = types.SimpleNamespace(**client["args"])
    vocab = getattr(args, "vocab_size_unpadded", None)
    if not vocab:
        raise HFError(f"{files[0]}: the saved flags lack the vocabulary size (vocab_size_unpadded)")
    start = time.time()
    notes: List[str] = []
    zero = os.path.join(tag_dir, "zero")
    if os.path.isdir(zero):
        state, source, dtype = _read_universal(zero), "fp32 weights of a universal checkpoint", torch.float32
    else:
        shards, source, dtype = _read_native(tag_dir, files, args, notes, say)
        info = _tp_info(client, shards[0])
        # shard tensors are dropped as they are merged: at most one tensor is held twice
        state = {name: tp_layout.merge(name, [s.pop(name) for s in shards], info) for name in list(shards[0])}
    info = _tp_info(client, state)
    for name, tensor in state.items():
        if tp_layout.layout(name, info) == tp_layout.VOCAB and tensor.shape[0] != vocab:
            if tensor.shape[0] < vocab:
                raise HFError(f"{tag_dir}: {name} has {tensor.shape[0]} rows, fewer than the vocabulary ({vocab})")
            state[name] = tensor[:vocab]
    say(f"read {sum(t.numel() for t in state.values()):,} parameters ({source}) in {time.time() - start:.1f} s")
    return CheckpointWeights(tag_dir, args, state, dtype, source, client.get("iteration"), notes)


def _tp_info(client: dict, names) -> dict:
    from megatron_ext.training.universal import conversion_info

    return conversion_info(client, list(names))


def _read_universal(zero: str) -> Dict[str, torch.Tensor]:
    from deepspeed.checkpoint.constants import PARAM


    state = {}
    for name in sorted(os.listdir(zero)):
        path = os.path.join(zero, name, "fp32.pt")
        if os.path.isfile(path):
            state[name] = _load_states(path)[PARAM].float()
    if not state:
        raise HFError(f"{zero}: a universal checkpoint folder without fp32.pt files")
    return state


def _tensors(module: dict) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in module.items() if torch.is_tensor(v)}  # megatron-core's _extra_state entries are None


def _read_native(tag_dir: str, files: List[str], args, notes: List[str], say: Callable[[str], None]):
    """(per TP rank: name -> tensor, source line, dtype)."""

    ranks = _ranks(files)
    tp = len(ranks)
    stage = int(getattr(args, "zero_stage", 0) or 0)
    zero3 = any(os.path.basename(f).startswith("zero_pp_rank_") for f in files)
    partitions = glob.glob(os.path.join(glob.escape(tag_dir), "*zero_pp_rank_*_optim_states.pt"))
    layout = f"TP={tp}"
    if zero3:
        return [_zero_to_fp32(tag_dir, r, say) for r in ranks], f"fp32 weights of ZeRO-3 partitions, {layout}", torch.float32
    modules = [_tensors(_load_states(model_states_file(tag_dir, r))["module"]) for r in ranks]
    dtype = next(iter(modules[0].values())).dtype
    if dtype == torch.float32:
        return modules, f"fp32 weights of the model-states files, ZeRO {stage}, {layout}", dtype
    if partitions:
        return ([_zero_to_fp32(tag_dir, r, say) for r in ranks],
                f"fp32 master weights of the ZeRO-{stage} optimizer partitions, {layout}, {_name(dtype)} training", torch.float32)
    masters = [_mixed_precision_masters(model_states_file(tag_dir, r)) for r in ranks]
    if all(m is not None for m in masters):
        for module, master in zip(modules, masters):
            missing = set(module) - set(master)
            if missing:
                raise HFError(f"{tag_dir}: the fp32 master weights lack {sorted(missing)[0]}")
        return ([{name: m[name] for name in module} for module, m in zip(modules, masters)],
                f"fp32 master weights of the mixed-precision optimizer, ZeRO 0, {layout}, {_name(dtype)} training", torch.float32)
    notes.append(f"the checkpoint holds no fp32 master weights (no optimizer state): its {_name(dtype)} weights are used")
    return modules, f"{_name(dtype)} weights of the model-states files (the checkpoint has no fp32 copy), {layout}", dtype


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _mixed_precision_masters(path: str) -> Optional[Dict[str, torch.Tensor]]:
    """name -> fp32 master of DeepSpeed's ZeRO-0 bf16/fp16 optimizer state, or None if absent."""

    optimizer = _load_states(path).get("optimizer")
    if not isinstance(optimizer, dict) or "fp32_groups" not in optimizer:
        return None
    groups = (optimizer.get("optimizer_state_dict") or {}).get("param_groups") or []
    fp32 = optimizer["fp32_groups"]
    if len(groups) != len(fp32) or not all("param_names" in g for g in groups):
        return None
    masters = {}
    for group, tensors in zip(groups, fp32):
        tensors = list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]
        if len(tensors) != len(group["param_names"]):
            return None
        masters.update(zip(group["param_names"], (t.float() for t in tensors)))
    return masters


def _zero_to_fp32(tag_dir: str, rank: int, say: Callable[[str], None] = lambda _: None) -> Dict[str, torch.Tensor]:
    """DeepSpeed's fp32 reconstruction from the ZeRO files of one tensor-parallel rank."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    say(f"rebuilding the fp32 weights of tensor-parallel rank {rank} from its ZeRO partitions")
    staging = tempfile.mkdtemp(prefix="megatron-ext-hf-read.")  # links only: never writes into the checkpoint
    try:
        tag = os.path.join(staging, "tag")
        os.makedirs(tag)
        for name in os.listdir(tag_dir):
            if f"mp_rank_{rank:02d}_" in name and name.endswith(("_model_states.pt", "_optim_states.pt")):
                os.symlink(os.path.join(tag_dir, name), os.path.join(tag, name))
        log = io.StringIO()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # its prints and progress bars
            try:
                state = get_fp32_state_dict_from_zero_checkpoint(staging, tag="tag")
            except Exception as e:  # noqa: BLE001 - DeepSpeed's failure on this folder, in one line
                detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                raise HFError(f"{tag_dir}: DeepSpeed's zero_to_fp32 cannot read TP rank {rank}: {detail}") from None
        return {k: v.float() for k, v in state.items() if torch.is_tensor(v)}
    finally:
        shutil.rmtree(staging, ignore_errors=True)
