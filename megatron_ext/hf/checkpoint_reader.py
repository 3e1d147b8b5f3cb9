"""Whole fp32 weights and saved flags of any checkpoint the trainer writes: the one place the Hugging
Face tools read our checkpoints (file names and reads through ``checkpoint_layout.py``, the
tensor-parallel layout through ``training/universal.py``).

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
import io
import os
import shutil
import tempfile
import time
import types
from typing import Callable, Dict, List, Optional

import torch

from megatron_ext import checkpoint_layout as layout
from megatron_ext.hf import HFError
from megatron_ext.hf import tensor_parallel as tp_layout
from megatron_ext.training.universal import conversion_info


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
    try:
        return os.path.join(*layout.find_checkpoint(path, universal=True, say=say))
    except layout.CheckpointFileError as e:
        raise HFError(str(e)) from None


def _load_states(path: str):
    """A checkpoint file through the project's one reader; a bad file is HFError (one line)."""
    try:
        return layout.load_states(path)
    except layout.CheckpointFileError as e:
        raise HFError(str(e)) from None


def _saved_client(tag_dir: str):
    """(the model-states files, the client state, which holds the saved flags)."""
    files = layout.model_states_files(tag_dir)
    path = layout.client_state_file(tag_dir)
    client = _load_states(path)
    if not isinstance(client, dict) or not client.get("args"):
        raise HFError(f"{path}: no saved flags ('args') in the checkpoint: not written by megatron_ext")
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
    if layout.is_universal(tag_dir):
        state, source, dtype = _read_universal(tag_dir), "fp32 weights of a universal checkpoint", torch.float32
    else:
        state, source, dtype = _read_stages(tag_dir, client, args, notes, say)
    info = _tp_info(client, state)
    for name, tensor in state.items():
        if tp_layout.layout(name, info) == tp_layout.VOCAB and tensor.shape[0] != vocab:
            if tensor.shape[0] < vocab:
                raise HFError(f"{tag_dir}: {name} has {tensor.shape[0]} rows, fewer than the vocabulary ({vocab})")
            state[name] = tensor[:vocab]
    say(f"read {sum(t.numel() for t in state.values()):,} parameters ({source}) in {time.time() - start:.1f} s")
    return CheckpointWeights(tag_dir, args, state, dtype, source, client.get("iteration"), notes)


def _tp_info(client: dict, names) -> dict:

    return conversion_info(client, list(names))


def _read_universal(tag_dir: str) -> Dict[str, torch.Tensor]:
    from deepspeed.checkpoint.constants import PARAM

    state = {}
    for name in layout.universal_parameters(tag_dir):
        path = layout.universal_state_file(tag_dir, name)
        if os.path.isfile(path):
            state[name] = _load_states(path)[PARAM].float()
    if not state:
        raise HFError(f"{layout.universal_parameters_dir(tag_dir)}: a universal checkpoint folder without fp32.pt files")
    return state


def _tensors(module: dict) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in module.items() if torch.is_tensor(v)}  # megatron-core's _extra_state entries are None


def _read_stages(tag_dir: str, client: dict, args, notes: List[str], say: Callable[[str], None]):
    """(name -> whole tensor, source line, dtype) of a native checkpoint: each pipeline stage's
    tensor-parallel shards merged, the stages joined (a later stage's copy of the word embedding
    left out), and with expert parallelism each expert-parallel rank's experts from its own file."""
    import re

    from deepspeed.checkpoint.constants import PIPELINE_REPLICATED_PARAMETER_PATTERNS

    tp, pp, ep = layout.parallel_dimensions(client)
    mp_ranks = layout.tp_ranks(tag_dir)
    if len(mp_ranks) != tp * pp:
        raise HFError(f"{tag_dir}: {len(mp_ranks)} model-states files for tensor-parallel size {tp} x pipeline-parallel "
                      f"size {pp}: the checkpoint is incomplete")
    replicas = _tp_info(client, []).get(PIPELINE_REPLICATED_PARAMETER_PATTERNS, [])
    state: Dict[str, torch.Tensor] = {}
    for stage in range(pp):
        shards, source, dtype = _read_native(tag_dir, mp_ranks[stage * tp:(stage + 1) * tp], args, notes, say)
        info = _tp_info(client, shards[0])
        for name in list(shards[0]):  # shard tensors are dropped as they are merged: one held twice at most
            tensor = tp_layout.merge(name, [s.pop(name) for s in shards], info)
            if stage == 0 or not any(re.match(p, name) for p in replicas):
                state.setdefault(name, tensor)
    if ep > 1:
        if dtype != torch.float32 or "model-states" not in source:
            raise HFError(f"{tag_dir}: an expert-parallel {_name(dtype) if dtype != torch.float32 else 'mixed-precision'} "
                          "checkpoint keeps its experts' fp32 master weights partitioned per expert group; convert it "
                          "first (megatron-ext to-universal) and export the universal checkpoint")
        for path in layout.rank_experts_files(tag_dir):
            state.update({name: t.float() for name, t in _load_states(path).items()})
    if pp > 1 or ep > 1:
        source += f", PP={pp}, EP={ep}"
    return state, source, dtype


def _read_native(tag_dir: str, ranks: List[int], args, notes: List[str], say: Callable[[str], None]):
    """(per TP rank of ``ranks`` (one pipeline stage's model-parallel ranks): name -> tensor, source
    line, dtype)."""

    tp = len(ranks)
    stage = int(getattr(args, "zero_stage", 0) or 0)
    partitions = layout.optim_states_files(tag_dir)
    where = f"TP={tp}"
    if layout.is_zero3(tag_dir):
        return [_zero_to_fp32(tag_dir, r, say) for r in ranks], f"fp32 weights of ZeRO-3 partitions, {where}", torch.float32
    modules = [_tensors(_load_states(layout.client_state_file(tag_dir, r))["module"]) for r in ranks]
    dtype = next(iter(modules[0].values())).dtype
    if dtype == torch.float32:
        return modules, f"fp32 weights of the model-states files, ZeRO {stage}, {where}", dtype
    if partitions:
        return ([_zero_to_fp32(tag_dir, r, say) for r in ranks],
                f"fp32 master weights of the ZeRO-{stage} optimizer partitions, {where}, {_name(dtype)} training", torch.float32)
    masters = [_mixed_precision_masters(layout.client_state_file(tag_dir, r)) for r in ranks]
    if all(m is not None for m in masters):
        for module, master in zip(modules, masters):
            missing = set(module) - set(master)
            if missing:
                raise HFError(f"{tag_dir}: the fp32 master weights lack {sorted(missing)[0]}")
        return ([{name: m[name] for name in module} for module, m in zip(modules, masters)],
                f"fp32 master weights of the mixed-precision optimizer, ZeRO 0, {where}, {_name(dtype)} training", torch.float32)
    notes.append(f"the checkpoint holds no fp32 master weights (no optimizer state): its {_name(dtype)} weights are used")
    return modules, f"{_name(dtype)} weights of the model-states files (the checkpoint has no fp32 copy), {where}", dtype


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
        for path in layout.tp_rank_files(tag_dir, rank):
            os.symlink(path, os.path.join(tag, os.path.basename(path)))
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
