"""The one module that knows how a checkpoint directory is laid out and how its files are read.

A run's ``--save`` directory holds:

* ``global_step<N>/``: a checkpoint (a DeepSpeed *tag* folder; its files below);
* ``latest``: DeepSpeed's file naming the tag ``--load`` resumes; ``latest_checkpointed_iteration.txt``:
  Megatron's, naming its iteration;
* after a universal conversion (``to-universal``, ``convert``): ``global_step<N>_universal/`` (the
  model-states files, and per parameter ``zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt``, plus
  ``zero/optimizer_state.pt``) and ``latest_universal`` naming it.

A tag folder holds what DeepSpeed 0.19.8 writes (``TP``: the model-parallel rank, two digits: the
tensor-parallel rank, or with our trainer's pipeline stages ``stage x TP size + tensor-parallel
rank``, as DeepSpeed's ``checkpoint_parallel_dimensions`` in each file say; ``DP``: the
data-parallel rank):

* ZeRO 0, 1, 2: one ``mp_rank_<TP>_model_states.pt`` per TP rank (the module, and the client
  state: iteration, consumed samples, args, LR schedule, RNG); ZeRO 1/2 add one
  ``zero_pp_rank_<DP>_mp_rank_<TP>_optim_states.pt`` per DP and TP rank (``bf16_zero_pp_rank_...``
  when training in bf16).
* ZeRO 3: one ``zero_pp_rank_<DP>_mp_rank_<TP>_model_states.pt`` per DP and TP rank (the client
  state; the module's tensors are empty, their shapes in ``param_shapes``) and one
  ``[bf16_]zero_pp_rank_<DP>_mp_rank_<TP>_optim_states.pt`` (the fp32 partitions and their
  optimizer state).
* DeepSpeed's pipeline engine (the Megatron-DeepSpeed fork's ``GPTModelPipe``): the
  ``mp_rank_<TP>_model_states.pt`` files hold the client state without the module; the weights are
  in one ``layer_<LL>-model_<TP>-model_states.pt`` per layer and TP rank
  (``layer_<LL>-model_states.pt`` when the topology has no tensor-parallel axis).
* DeepSpeed-MoE (the fork's ``--num-experts``): ``[layer_<L>_]expert_<E>_mp_rank_<TP>_model_states.pt``
  and ``expp_rank_<R>_mp_rank_<TP>_optim_states.pt``.
* Our trainer's expert parallelism (megatron-core experts spread over ranks; DeepSpeed writes the
  module from data-parallel rank 0 only, which holds expert-parallel rank 0's experts): one
  ``expert_ep_rank_<R>_mp_rank_<TP>_experts.pt`` per expert-parallel rank and model-parallel rank
  (that rank's experts, under their global names); at ZeRO 0 DeepSpeed also writes the optimizer of
  each expert-parallel rank, ``expp_rank_<R>_mp_rank_<TP>_optim_states.pt``.

Every read goes through ``load_states``: any failure (missing, truncated, not a torch file) is
one ``CheckpointFileError`` line naming the file.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

LATEST = "latest"
LATEST_UNIVERSAL = "latest_universal"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
TAG_PATTERN = re.compile(r"global_step(\d+)")
UNIVERSAL_SUFFIX = "_universal"
UNIVERSAL_PARAMETERS = "zero"  # <universal tag>/zero/<parameter name>/<state>.pt
UNIVERSAL_OPTIMIZER_STATE = "optimizer_state.pt"  # <universal tag>/zero/optimizer_state.pt


def _deepspeed_constants():
    """``deepspeed.checkpoint.constants`` (DeepSpeed's own names of its checkpoint files), read
    without importing DeepSpeed (3.4 s, for commands that only name files): that module is plain
    constants."""
    loaded = sys.modules.get("deepspeed.checkpoint.constants")
    if loaded is not None:
        return loaded
    package = importlib.util.find_spec("deepspeed")  # finds the package without importing it
    path = os.path.join(package.submodule_search_locations[0], "checkpoint", "constants.py")
    spec = importlib.util.spec_from_file_location("_deepspeed_checkpoint_constants", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_ds = _deepspeed_constants()
MODEL_PREFIX = _ds.MODEL_FILE_PREFIX  # mp_rank_
ZERO_PREFIX = _ds.ZERO_FILE_PREFIX  # zero_pp_rank_
LAYER_PREFIX = _ds.LAYER_FILE_PREFIX  # layer_
MODEL_SUFFIX = _ds.MODEL_FILE_SUFFIX  # _model_states.pt
OPTIM_SUFFIX = _ds.OPTIM_FILE_SUFFIX  # _optim_states.pt
BF16_ZERO_PREFIX = _ds.BF16_ZERO_FILE_PREFIX  # bf16_zero_pp_rank_
# ZeRO partitions of mixed-precision runs carry a precision prefix (DeepSpeed writes bf16_; fp16_ is legacy)
_PRECISION = "|".join(re.escape(p[:-len(ZERO_PREFIX)]) for p in (_ds.BF16_ZERO_FILE_PREFIX, _ds.FP16_ZERO_FILE_PREFIX))
_MP, _ZERO, _MODEL, _OPTIM = (re.escape(x) for x in (MODEL_PREFIX, ZERO_PREFIX, MODEL_SUFFIX, OPTIM_SUFFIX))
LAYER_SUFFIX = "-model_states.pt"  # DeepSpeed's PipelineModule.ckpt_layer_path spells it out

MODEL_STATES = re.compile(rf"{_MP}(?P<tp>\d+){_MODEL}")
ZERO3_MODEL_STATES = re.compile(rf"{_ZERO}(?P<dp>\d+)_{_MP}(?P<tp>\d+){_MODEL}")
OPTIM_STATES = re.compile(rf"(?:{_PRECISION})?{_ZERO}(?P<dp>\d+)_{_MP}(?P<tp>\d+){_OPTIM}")
LAYER_STATES = re.compile(rf"{re.escape(LAYER_PREFIX)}(?P<layer>\d+)(?:-model_(?P<tp>\d+))?{re.escape(LAYER_SUFFIX)}")
EXPERT_STATES = re.compile(rf"(?:{re.escape(LAYER_PREFIX)}(?P<layer>\d+)_)?expert_(?P<expert>\d+)_{_MP}(?P<tp>\d+){_MODEL}")
EXPERT_OPTIM_STATES = re.compile(rf"expp_rank_(?P<ep>\d+)_{_MP}(?P<tp>\d+){_OPTIM}")
RANK_EXPERTS = re.compile(rf"expert_ep_rank_(?P<ep>\d+)_{_MP}(?P<tp>\d+)_experts\.pt")
# for messages: what a checkpoint folder must hold
MODEL_STATES_NAMES = (f"{MODEL_PREFIX}*{MODEL_SUFFIX} or {ZERO_PREFIX}*_{MODEL_PREFIX}*{MODEL_SUFFIX} (ZeRO 3)")


class CheckpointFileError(ValueError):
    """A checkpoint file or folder that cannot be used; the message is one line naming it."""


# -- names ------------------------------------------------------------------------------------
def tag_for(iteration: int) -> str:
    return f"global_step{iteration}"


def universal_tag_for(tag: str) -> str:
    return tag + UNIVERSAL_SUFFIX


def model_states_name(tp_rank: int = 0, zero3_dp_rank: Optional[int] = None) -> str:
    """The model-states file of a TP rank (at ZeRO 3: of a TP and DP rank), as DeepSpeed names it."""
    name = f"{MODEL_PREFIX}{tp_rank:02d}{MODEL_SUFFIX}"
    return name if zero3_dp_rank is None else f"{ZERO_PREFIX}{zero3_dp_rank}_{name}"


def optim_states_name(tp_rank: int, dp_rank: int, bf16: bool = False) -> str:
    """The ZeRO optimizer partition of a TP and DP rank, as DeepSpeed names it."""
    return f"{BF16_ZERO_PREFIX if bf16 else ZERO_PREFIX}{dp_rank}_{MODEL_PREFIX}{tp_rank:02d}{OPTIM_SUFFIX}"


def rank_experts_name(ep_rank: int, tp_rank: int) -> str:
    """Our trainer's file of one expert-parallel rank's experts (at one model-parallel rank)."""
    return f"expert_ep_rank_{ep_rank:02d}_{MODEL_PREFIX}{tp_rank:02d}_experts.pt"


def layer_states_name(layer: int, tp_rank: Optional[int] = None) -> str:
    """A pipeline layer's file, as DeepSpeed's pipeline module names it."""
    axis = "" if tp_rank is None else f"-model_{tp_rank:02d}"
    return f"{LAYER_PREFIX}{layer:02d}{axis}{LAYER_SUFFIX}"


# -- what a tag folder holds --------------------------------------------------------------------
def _matching(tag_dir: str, *patterns: re.Pattern) -> List[str]:
    try:
        names = os.listdir(tag_dir)
    except OSError:  # missing, or not a folder: holds nothing
        return []
    return [os.path.join(tag_dir, n) for n in sorted(names)
            if any(p.fullmatch(n) for p in patterns) and os.path.isfile(os.path.join(tag_dir, n))]


def model_states_files(tag_dir: str) -> List[str]:
    """The model-states files carrying a client state: one per TP rank (ZeRO 0/1/2, pipeline,
    universal), or one per TP and DP rank (ZeRO 3). Not the pipeline's layer files or DeepSpeed-MoE's
    expert files."""
    return _matching(tag_dir, MODEL_STATES, ZERO3_MODEL_STATES)


def optim_states_files(tag_dir: str) -> List[str]:
    """The ZeRO optimizer partitions (ZeRO 1, 2 and 3; none at ZeRO 0)."""
    return _matching(tag_dir, OPTIM_STATES)


def layer_states_files(tag_dir: str) -> List[str]:
    """The per-layer files of DeepSpeed's pipeline engine."""
    return _matching(tag_dir, LAYER_STATES)


def expert_states_files(tag_dir: str) -> List[str]:
    """DeepSpeed-MoE's expert files (model and optimizer)."""
    return _matching(tag_dir, EXPERT_STATES, EXPERT_OPTIM_STATES)


def rank_experts_files(tag_dir: str) -> List[str]:
    """Our trainer's per-expert-parallel-rank expert files."""
    return _matching(tag_dir, RANK_EXPERTS)


def parallel_dimensions(client: Dict[str, Any]) -> Tuple[int, int, int]:
    """(tensor-parallel, pipeline-parallel, expert-parallel size) a checkpoint was written at: the
    pipeline and tensor sizes DeepSpeed records (older checkpoints: its model-parallel size, which
    was the tensor-parallel size), the expert-parallel size from the saved flags."""
    from_deepspeed = client.get(_ds.CHECKPOINT_PARALLEL_DIMS) or {}
    saved = client.get("args") if isinstance(client.get("args"), dict) else {}
    tp = from_deepspeed.get(_ds.CHECKPOINT_TP_DEGREE) or saved.get("tensor_model_parallel_size") \
        or client.get("mp_world_size") or 1
    pp = from_deepspeed.get(_ds.CHECKPOINT_PP_DEGREE) or saved.get("pipeline_model_parallel_size") or 1
    return int(tp), int(pp), int(saved.get("expert_model_parallel_size") or 1)


def is_zero3(tag_dir: str) -> bool:
    """Written at ZeRO 3 (its model states are per DP rank)."""
    return bool(_matching(tag_dir, ZERO3_MODEL_STATES))


def tp_rank_of(path: str) -> int:
    """The TP rank of a model-states or optimizer-partition file."""
    name = os.path.basename(path)
    for pattern in (MODEL_STATES, ZERO3_MODEL_STATES, OPTIM_STATES):
        match = pattern.fullmatch(name)
        if match:
            return int(match.group("tp"))
    raise CheckpointFileError(f"{path}: not a model-states or optimizer-partition file")


def dp_rank_of(path: str) -> int:
    """The DP rank of a ZeRO 3 model-states file or of an optimizer-partition file."""
    name = os.path.basename(path)
    for pattern in (ZERO3_MODEL_STATES, OPTIM_STATES):
        match = pattern.fullmatch(name)
        if match:
            return int(match.group("dp"))
    raise CheckpointFileError(f"{path}: not a ZeRO 3 model-states or optimizer-partition file")


def layer_of(path: str) -> Tuple[int, Optional[int]]:
    """(position in the pipeline's layer list, TP rank or None) of a pipeline layer file."""
    match = LAYER_STATES.fullmatch(os.path.basename(path))
    if not match:
        raise CheckpointFileError(f"{path}: not a pipeline layer file")
    return int(match.group("layer")), None if match.group("tp") is None else int(match.group("tp"))


def tp_ranks(tag_dir: str) -> List[int]:
    return sorted({tp_rank_of(f) for f in model_states_files(tag_dir)})


def tp_rank_files(tag_dir: str, tp_rank: int) -> List[str]:
    """The model-states and optimizer-partition files of one TP rank (every DP rank's)."""
    return [f for f in model_states_files(tag_dir) + optim_states_files(tag_dir) if tp_rank_of(f) == tp_rank]


def optim_states_file(tag_dir: str, tp_rank: int, dp_rank: int) -> str:
    """The optimizer partition of a TP and DP rank (whichever precision prefix it was written with)."""
    for path in optim_states_files(tag_dir):
        if tp_rank_of(path) == tp_rank and dp_rank_of(path) == dp_rank:
            return path
    return os.path.join(tag_dir, optim_states_name(tp_rank, dp_rank))


def client_state_file(tag_dir: str, tp_rank: int = 0) -> str:
    """The file a TP rank's module and client state are read from: ``mp_rank_<TP>_model_states.pt``,
    at ZeRO 3 DP rank 0's ``zero_pp_rank_0_mp_rank_<TP>_model_states.pt``."""
    plain = os.path.join(tag_dir, model_states_name(tp_rank))
    zero3 = os.path.join(tag_dir, model_states_name(tp_rank, zero3_dp_rank=0))
    return zero3 if not os.path.isfile(plain) and os.path.isfile(zero3) else plain


# -- universal folders --------------------------------------------------------------------------
def universal_parameters_dir(tag_dir: str) -> str:
    return os.path.join(tag_dir, UNIVERSAL_PARAMETERS)


def is_universal(tag_dir: str) -> bool:
    return os.path.isdir(universal_parameters_dir(tag_dir))


def universal_parameters(tag_dir: str) -> List[str]:
    """The parameter names of a universal checkpoint (its ``zero/<name>/`` folders; not the links
    naming another parameter's folder: a tied output layer's, for a pipeline stage that holds a copy)."""
    zero = universal_parameters_dir(tag_dir)
    return sorted(p for p in os.listdir(zero)
                  if os.path.isdir(os.path.join(zero, p)) and not os.path.islink(os.path.join(zero, p)))


def universal_state_file(tag_dir: str, parameter: str, state: str = "fp32") -> str:
    """``zero/<parameter>/<state>.pt`` (state: fp32, exp_avg, exp_avg_sq, step)."""
    return os.path.join(universal_parameters_dir(tag_dir), parameter, f"{state}.pt")


def universal_optimizer_state_file(tag_dir: str) -> str:
    return os.path.join(universal_parameters_dir(tag_dir), UNIVERSAL_OPTIMIZER_STATE)


# -- reading ------------------------------------------------------------------------------------
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


def load_states(path: str, mmap: bool = True) -> Any:
    """A DeepSpeed ``*.pt`` file, memory-mapped where possible (reading the client state of a big
    model-states file reads no tensors; ``mmap=False`` for a file that will be rewritten in place).
    Any failure is one CheckpointFileError line naming it."""
    import torch

    if not os.path.isfile(path):
        raise CheckpointFileError(f"{path}: missing")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        except RuntimeError as e:  # written in the legacy (non-zip) format: no mmap
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same bad input
        detail = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointFileError(f"{path}: cannot read ({type(e).__name__}: {detail}); the file is damaged or "
                                  "not a checkpoint file") from None


def client_state(tag_dir: str, tp_rank: int = 0) -> Dict[str, Any]:
    """The client state (and module) of a tag folder (``client_state_file``)."""
    if not model_states_files(tag_dir):
        raise CheckpointFileError(f"{tag_dir}: checkpoint missing or incomplete (no {MODEL_STATES_NAMES})")
    path = client_state_file(tag_dir, tp_rank)
    state = load_states(path)
    if not isinstance(state, dict) or "module" not in state:
        raise CheckpointFileError(f"{path}: not a DeepSpeed model-states file")
    return state


def saved_zero_stage(client: Dict[str, Any]) -> Optional[int]:
    """The ZeRO stage a checkpoint was written with (from its saved args, else its DeepSpeed config)."""
    saved = client.get("args") or {}
    if isinstance(saved, dict) and saved.get("zero_stage") is not None:
        return int(saved["zero_stage"])
    stage = ((client.get("ds_config") or {}).get("zero_optimization") or {}).get("stage")
    return None if stage is None else int(stage)


def find_checkpoint(path: str, universal: bool = False, say: Callable[[str], None] = lambda _: None) -> Tuple[str, str]:
    """``(load dir, tag)`` for a checkpoint folder or a run directory (the checkpoint its ``latest``
    names; with ``universal``, else the one ``latest_universal`` names)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise CheckpointFileError(f"{path}: no such checkpoint directory")
    names = (LATEST, LATEST_UNIVERSAL) if universal else (LATEST,)
    for name in names:
        tag = read_latest(path, name)
        if tag is None:
            continue
        if not model_states_files(os.path.join(path, tag)):
            raise CheckpointFileError(f"{path}: '{name}' names {tag}, but {os.path.join(path, tag)} holds no "
                                      "checkpoint")
        say(f"{path}: '{name}' names {tag}")
        return path, tag
    if model_states_files(path):
        return os.path.dirname(path), os.path.basename(path)
    raise CheckpointFileError(f"{path}: not a checkpoint (no {MODEL_STATES_NAMES} files) and not a run directory "
                              f"(no {' or '.join(repr(n) for n in names)} file)")


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
