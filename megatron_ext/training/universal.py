"""Universal checkpoints: DeepSpeed's own converter (``deepspeed.checkpoint.ds_to_universal``) run on
our checkpoints, and the few things megatron-core models need around it.

``convert(tag_dir, output_dir)``:

1. Checks the input before writing anything: a ZeRO 1, 2 or 3 checkpoint folder (``global_stepN``)
   with its model-states and optimizer-partition files (``ConversionError``, one line, otherwise).
2. Stages a copy of the input in a hidden folder beside the output (``fileio.staged_folder``;
   files hard-linked where unchanged; the source checkpoint is never modified):
   * the model-states files lose megatron-core's ``*._extra_state = None`` entries (the converter
     calls ``.float()`` on every module entry);
   * their ``universal_checkpoint_info`` is rebuilt from the checkpoint's saved ``args`` (TP
     patterns, original/padded vocabulary; ``universal_checkpoint_info``), keeping
     only patterns that match a parameter (the converter rejects unused patterns);
   * optimizer partitions that lack one of Adam's two moments (Muon's matrices keep only
     ``exp_avg``) get a zero placeholder, because the converter reads both from every group; the
     placeholder's output files are deleted afterwards.
3. Runs the converter into the staging folder (for a ZeRO 3 input, completes what DeepSpeed's
   converter leaves out there: ``_complete_zero3_output``), moves the result to ``output_dir`` in
   one rename (every file synced first) and writes ``latest_universal`` (naming it) beside it,
   atomically.

The converter carries per parameter ``fp32`` weights, ``exp_avg``, ``exp_avg_sq`` and ``step``,
plus the model-states files with our client state (iteration, consumed samples/tokens, args, LR
schedule, RNG states): the loader continues from there. Any other optimizer state (Shampoo's
factor matrices, SGD's momentum buffer, SophiaG's Hessian...) is not carried and is listed in
the summary and in ``universal_conversion.json`` inside the output.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import io
import json
import os
import re
import shutil
import sys
import types
from typing import Any, Dict, List, Optional

from megatron_ext import checkpoint_layout as layout
from megatron_ext.checkpoint_layout import (
    LATEST_UNIVERSAL,
    MODEL_STATES_NAMES,
    CheckpointFileError,
    client_state,
    load_states,
    model_states_files,
    optim_states_files,
    saved_zero_stage,
)
from megatron_ext.fileio import staged_folder, write_text_atomically

CONVERSION_RECORD = "universal_conversion.json"
CARRIED = ("exp_avg", "exp_avg_sq")  # the optimizer states ds_to_universal extracts (with fp32 and step)
STAGING_PREFIX = ".to-universal."


class ConversionError(ValueError):
    """Bad input for the conversion; the message is one line."""


# -- what the conversion needs --------------------------------------------------------------------
def universal_checkpoint_info(args) -> Dict[str, Any]:
    """What ``ds_to_universal`` needs to merge/split megatron-core GPT tensors across TP sizes.
    A parameter may match at most one pattern of each kind (the converter asserts it); patterns
    that match no parameter of the model are dropped at conversion (``training/universal.py``)."""
    from deepspeed.checkpoint import constants as c

    info = {
        c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        c.TP_REPLICATED_PARAMETER_PATTERNS: [
            r".*layernorm\.(weight|bias)$",  # also final_layernorm, q/k_layernorm
            r".*linear_proj\.bias$",
            r".*linear_fc2\.bias$",
            r".*position_embeddings\.weight$",
            r".*router\.weight$",  # MoE router
            r".*(enorm|hnorm)\.weight$",  # MTP input norms
        ],
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [r".*linear_proj\.weight$", r".*linear_fc2\.weight$"],
        c.VOCABULARY_PARAMETER_PATTERNS: [r".*word_embeddings\.weight$", r".*output_layer\.weight$"],
        c.ORIGINAL_VOCAB_SIZE: args.vocab_size_unpadded,
        c.PADDED_VOCAB_SIZE: args.padded_vocab_size,
    }
    if getattr(args, "swiglu", False):
        # SwiGLU's fused gate/up: a TP shard is [gate_r; up_r], the whole matrix [gate; up].
        info[c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0] = [r".*linear_fc1\.(weight|bias)$"]
    if (getattr(args, "pipeline_model_parallel_size", 1) or 1) > 1:
        # the last stage's copy of the word embedding (models/parallel.py): the first stage's is the tensor
        replicas = [] if getattr(args, "untie_embeddings_and_output_weights", True) else [r"^output_layer\.weight$"]
        if getattr(args, "mtp_num_layers", None):
            replicas.append(r"^embedding\.word_embeddings\.weight$")
        if replicas:
            info[c.PIPELINE_REPLICATED_PARAMETER_PATTERNS] = replicas
    return info


def check_input(tag_dir: str) -> Dict[str, Any]:
    """Everything checked before converting: raises ConversionError for a folder we cannot convert."""
    models = model_states_files(tag_dir)
    if not models:
        raise ConversionError(f"{tag_dir}: not a checkpoint (no {MODEL_STATES_NAMES} files)")
    try:
        client = client_state(tag_dir)
    except CheckpointFileError as e:
        raise ConversionError(str(e)) from None
    if "args" not in client and "universal_checkpoint_info" not in client:
        raise ConversionError(f"{models[0]}: no 'args' or 'universal_checkpoint_info' in the client state "
                              "(not written by megatron_ext or Megatron-DeepSpeed)")
    stage = saved_zero_stage(client)
    optims = optim_states_files(tag_dir)
    if not optims:
        raise ConversionError(f"{tag_dir}: saved with --zero-stage 0 (no ZeRO optimizer partitions); DeepSpeed's "
                              "converter needs a ZeRO 1, 2 or 3 checkpoint (a ZeRO 0 checkpoint already loads at "
                              "any data-parallel size with the same tensor-parallel size)")
    saved = client.get("args") or {}
    tp, pp, ep = layout.parallel_dimensions(client)
    return {
        "client": client,
        "model_files": models,
        "optim_files": optims,
        "iteration": client.get("iteration"),
        "consumed_samples": client.get("consumed_samples"),
        "tokens": client.get("tokens"),
        "tp": tp, "pp": pp, "ep": ep,
        "dp": client.get("dp_world_size", saved.get("data_parallel_size")),
        "zero_stage": stage,
        "zero3": layout.is_zero3(tag_dir),
    }


def _pattern_keys():
    from deepspeed.checkpoint import constants as c

    return (c.TP_REPLICATED_PARAMETER_PATTERNS, c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
            c.VOCABULARY_PARAMETER_PATTERNS, c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0,
            c.PARAMETER_TO_AVERAGE_PATTERNS, c.PIPELINE_REPLICATED_PARAMETER_PATTERNS)


def conversion_info(client: Dict[str, Any], param_names: List[str],
                    later_stage_names: Optional[List[str]] = None) -> Dict[str, Any]:
    """``universal_checkpoint_info`` for the converter: rebuilt from the saved args (so checkpoints
    written before a fix of the patterns convert right), with only the patterns that match a
    parameter it merges (DeepSpeed's converter fails on unused ones). ``param_names``: every
    parameter of the checkpoint; ``later_stage_names``: those only pipeline stages after the first
    hold (the converter skips the pipeline replicas among them: a tied output layer)."""
    from deepspeed.checkpoint import constants as c

    if client.get("args"):
        info = universal_checkpoint_info(types.SimpleNamespace(**client["args"]))
    else:  # a Megatron-DeepSpeed checkpoint: its own info
        info = dict(client["universal_checkpoint_info"])
    info.setdefault(c.UNIVERSAL_CHECKPOINT_VERSION_KEY, c.UNIVERSAL_CHECKPOINT_VERSION_VALUE)
    replicated = info.get(c.PIPELINE_REPLICATED_PARAMETER_PATTERNS, [])
    skipped = {n for n in later_stage_names or () if any(re.match(p, n) for p in replicated)}
    merged = [n for n in param_names if n not in skipped]
    for key in _pattern_keys():
        if key in info:
            names = param_names if key == c.PIPELINE_REPLICATED_PARAMETER_PATTERNS else merged
            info[key] = [p for p in info[key] if any(re.match(p, n) for n in names)]
            if not info[key] and key == c.PIPELINE_REPLICATED_PARAMETER_PATTERNS:
                del info[key]
    return info


def _param_names(client: Dict[str, Any]) -> List[str]:
    return [name for group in client.get("param_shapes") or [] for name in group]


# -- staging ----------------------------------------------------------------------------------
def link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def _stage_model_states(src: str, dst: str, names: List[str], later: List[str], experts: Dict[str, Any]) -> None:
    """``experts``: the shapes of the experts other expert-parallel ranks held at this model-parallel
    rank (DeepSpeed's file, from data-parallel rank 0, lists its own only; the converter merges the
    parameters listed)."""
    import torch

    from deepspeed.checkpoint import constants as c

    state = load_states(src)
    module = state["module"]
    # megatron-core modules put `_extra_state = None` in their state dict; the converter needs tensors.
    state["module"] = type(module)((k, v) for k, v in module.items() if torch.is_tensor(v))
    state[c.UNIVERSAL_CHECKPOINT_INFO] = conversion_info(state, names, later)
    shapes = state.get(c.PARAM_SHAPES) or []
    listed = {n for group in shapes for n in group}
    expert_group = next((g for g in shapes if any(".local_experts." in n for n in g)), shapes[-1] if shapes else None)
    for name, shape in experts.items():
        if name not in listed and expert_group is not None:
            expert_group[name] = shape
    torch.save(state, dst)


def stage_optim_states(src: str, dst: str, record: Dict[str, Any],
                        group_names: Optional[List[List[str]]] = None) -> None:
    """Link the partition file, or write a copy with zero placeholders for missing Adam moments;
    ``record`` collects the placeholders (to delete from the output) and the states not carried.
    ``group_names``: the parameter names of each group of a ZeRO 3 partition (its model states'
    ``param_shapes``; a ZeRO 1/2 partition names them itself)."""
    import torch

    from deepspeed.checkpoint import constants as c

    state = load_states(src)
    optim = state[c.OPTIMIZER_STATE_DICT]
    if c.FP32_FLAT_GROUPS in optim:  # ZeRO 3: the torch optimizer's state and one flat partition per group
        groups, fp32 = optim[c.OPTIMIZER_STATE_DICT]["state"], optim[c.FP32_FLAT_GROUPS]
    else:
        groups, fp32 = optim[c.BASE_OPTIMIZER_STATE]["state"], optim[c.SINGLE_PARTITION_OF_FP32_GROUPS]
        group_names = [list(mapping) for mapping in optim[c.PARAM_SLICE_MAPPINGS]]
    changed = False
    for gid, names in enumerate(group_names):
        group_state = groups.setdefault(gid, {})
        record["not_carried"].update(k for k in group_state if k not in CARRIED and k != "step")
        for key in CARRIED:
            if key not in group_state:
                group_state[key] = torch.zeros_like(fp32[gid])
                record["placeholders"].update((name, key) for name in names)
                changed = True
    if changed:
        torch.save(state, dst)
    else:
        link_or_copy(src, dst)


def _names_by_stage(tag_dir: str, models: List[str]):
    """(every parameter name of the checkpoint, those only pipeline stages after the first hold,
    the experts of every expert-parallel rank by model-parallel rank: name -> shape)."""
    experts: Dict[int, Dict[str, Any]] = {}
    for path in layout.rank_experts_files(tag_dir):
        mp = int(layout.RANK_EXPERTS.fullmatch(os.path.basename(path)).group("tp"))
        experts.setdefault(mp, {}).update({n: t.shape for n, t in load_states(path).items()})
    first, later = [], []
    for path in models:
        client = load_states(path)
        tp = layout.parallel_dimensions(client)[0]
        stage_names = _param_names(client) + list(experts.get(layout.tp_rank_of(path), {}))
        (first if layout.tp_rank_of(path) < tp else later).extend(stage_names)
    return sorted(set(first + later)), sorted(set(later) - set(first)), experts


def _stage_input(tag_dir: str, staged: str, record: Dict[str, Any]) -> None:
    os.makedirs(staged)
    models, optims = model_states_files(tag_dir), optim_states_files(tag_dir)
    names, later, experts = _names_by_stage(tag_dir, models)
    zero3_names = {}  # TP rank -> the parameter names of each group (ZeRO 3 partitions do not name them)
    if layout.is_zero3(tag_dir):
        zero3_names = {tp: [list(group) for group in client_state(tag_dir, tp).get("param_shapes") or []]
                       for tp in layout.tp_ranks(tag_dir)}
    for name in sorted(os.listdir(tag_dir)):
        src, dst = os.path.join(tag_dir, name), os.path.join(staged, name)
        if not os.path.isfile(src):
            continue
        if src in models:
            _stage_model_states(src, dst, names, later, experts.get(layout.tp_rank_of(src), {}))
        elif layout.RANK_EXPERTS.fullmatch(name):
            continue  # (their weights come from the optimizer partitions, as every parameter's)
        elif src in optims:
            stage_optim_states(src, dst, record, zero3_names.get(layout.tp_rank_of(src)))
        else:
            link_or_copy(src, dst)


@dataclasses.dataclass(frozen=True)
class ConverterOptions:
    """DeepSpeed's own ``ds_to_universal`` options (the flags users type for it)."""

    extract_workers: int = 1
    merge_workers: Optional[int] = None  # default: half the extract workers
    keep_temp_folder: bool = False  # keep <output>/tmp, the extracted partition slices
    strict: bool = True  # --no_strict: tolerate parameter patterns that match nothing


def run_converter(input_folder: str, output_folder: str, options: ConverterOptions, log, bars=None) -> None:
    """DeepSpeed's converter with its prints in ``log`` and its progress bars (stderr) in ``bars``
    (default ``log``)."""
    from deepspeed.checkpoint import ds_to_universal

    merge = options.merge_workers or max(1, options.extract_workers // 2)
    ns = argparse.Namespace(input_folder=input_folder, output_folder=output_folder,
                            num_extract_workers=options.extract_workers, num_merge_workers=merge,
                            keep_temp_folder=options.keep_temp_folder, strict=options.strict,
                            inject_missing_state=False)
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(bars or log):
        ds_to_universal.main(ns)


def _remove_stale_staging(parent: str, out_name: str) -> None:
    """Staging folders of conversions of the same output that were killed (their process is gone)."""
    for path in glob.glob(os.path.join(glob.escape(parent), f"{STAGING_PREFIX}{glob.escape(out_name)}.*")):
        pid = path.rsplit(".", 2)[-2] if path.count(".") >= 2 else ""
        if pid.isdigit() and int(pid) != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(path, ignore_errors=True)


# -- the conversion ---------------------------------------------------------------------------
def convert(tag_dir: str, output_dir: Optional[str] = None, options: ConverterOptions = ConverterOptions(),
            verbose: bool = False) -> Dict[str, Any]:
    """Convert the checkpoint folder ``tag_dir`` into ``output_dir`` (default ``<tag_dir>_universal``)
    and point ``latest_universal`` beside it at it. Returns a summary (see ``describe``)."""
    tag_dir = os.path.abspath(tag_dir)
    if not os.path.isdir(tag_dir):
        raise ConversionError(f"--input_folder {tag_dir}: no such directory")
    facts = check_input(tag_dir)
    output_dir = os.path.abspath(output_dir or layout.universal_tag_for(tag_dir.rstrip(os.sep)))
    if os.path.commonpath([output_dir, tag_dir]) == tag_dir:
        raise ConversionError(f"--output_folder {output_dir} is inside the input checkpoint {tag_dir}")
    if os.path.exists(output_dir):
        raise ConversionError(f"--output_folder {output_dir} already exists; remove it or choose another folder")
    parent = os.path.dirname(output_dir)
    if not os.path.isdir(parent):
        raise ConversionError(f"--output_folder {output_dir}: its parent folder {parent} does not exist")

    out_name = os.path.basename(output_dir)
    _remove_stale_staging(parent, out_name)
    record = {"placeholders": set(), "not_carried": set()}
    log = sys.stderr if verbose else io.StringIO()
    # On a terminal a long conversion shows where it is: our stages and DeepSpeed's progress bars.
    progress = verbose or sys.stderr.isatty()
    say = (lambda m: print(f"to-universal: {m}", file=sys.stderr, flush=True)) if progress else (lambda m: None)
    # DeepSpeed's converter writes its own latest_universal beside its output: into the work folder
    with staged_folder(output_dir, STAGING_PREFIX) as staged_out:
        staged_in = os.path.join(os.path.dirname(staged_out), "in", os.path.basename(tag_dir))
        say(f"staging {tag_dir} (iteration {facts['iteration']}, {len(facts['optim_files'])} ZeRO partition files)")
        _stage_input(tag_dir, staged_in, record)
        say("extracting and merging with DeepSpeed's ds_to_universal")
        try:
            if facts["zero3"]:  # its extracted fragments are merged again (_complete_zero3_output)
                run_converter(staged_in, staged_out, dataclasses.replace(options, keep_temp_folder=True), log,
                               sys.stderr if progress else None)
                _complete_zero3_output(staged_in, staged_out, options.keep_temp_folder)
            else:
                run_converter(staged_in, staged_out, options, log, sys.stderr if progress else None)
        except Exception as e:  # noqa: BLE001 - the converter's own failure, reported in one line
            detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            hint = "" if verbose else " (run again with --verbose for the converter's output)"
            raise ConversionError(f"DeepSpeed's ds_to_universal failed on {tag_dir}: {type(e).__name__}: "
                                  f"{detail}{hint}") from None
        drop_placeholders(staged_out, record)
        _every_param_group(staged_in, staged_out)
        link_tied_output(staged_out, facts["client"])
        params, carried = converted_listing(staged_out)
        summary = {
            "source": tag_dir, "output": output_dir,
            "iteration": facts["iteration"], "consumed_samples": facts["consumed_samples"], "tokens": facts["tokens"],
            "tensor_model_parallel_size": facts["tp"], "pipeline_model_parallel_size": facts["pp"],
            "expert_model_parallel_size": facts["ep"], "data_parallel_size": facts["dp"],
            "zero_stage": facts["zero_stage"], "parameters": len(params),
            "carried": carried, "not_carried": sorted(record["not_carried"]),
        }
        with open(os.path.join(staged_out, CONVERSION_RECORD), "w") as f:
            json.dump(summary, f, indent=2)
    latest = os.path.join(parent, LATEST_UNIVERSAL)
    write_text_atomically(latest, out_name)
    summary["latest_universal"] = latest
    return summary


def _complete_zero3_output(staged_in: str, out: str, keep_temp_folder: bool) -> None:
    """What DeepSpeed 0.19.8's converter writes for a ZeRO 3 checkpoint, completed into what its own
    universal loader (at ZeRO 1 or 2) reads, as its ZeRO 1/2 path writes it. Its ZeRO 3 path:

    * at TP size 1 saves every state as a bare flat tensor (its TP-aware merge, which writes
      ``{"param": tensor}`` in the parameter's shape with vocabulary rows unpadded and marked, runs
      only at TP > 1): the fragments it extracted are merged again with that function, at TP 1;
    * writes no ``step.pt`` (without it the loading optimizer restarts Adam's bias correction):
      written from each param group's optimizer state;
    * leaves ``zero/optimizer_state.pt`` without ``ds_version`` (the ZeRO 1/2 loader asserts it) and
      with DP rank 0's whole flat partition: the partition file's version replaces those;
    * copies the model-states files under ZeRO 3's names, one per DP rank, which a ZeRO 1/2 run does
      not look for: DP rank 0's becomes ``mp_rank_<TP>_model_states.pt``, the others are dropped;
    * does not extract persistent buffers (an MoE router's ``expert_bias``; its ZeRO 1/2 path
      writes every module tensor without an optimizer state as ``fp32.pt``): written the same way.
    """
    import torch

    from deepspeed.checkpoint import constants as c
    from deepspeed.checkpoint.ds_to_universal import merge_tp_slices

    temp = os.path.join(out, "tmp")  # the converter's extracted fragments
    tps = layout.tp_ranks(staged_in)
    partition = None
    for tp in tps:
        client = client_state(staged_in, tp)
        shapes = {name: shape for group in client[c.PARAM_SHAPES] for name, shape in group.items()}
        if len(tps) == 1:
            for name, shape in shapes.items():
                merge_tp_slices(client[c.UNIVERSAL_CHECKPOINT_INFO], layout.universal_parameters_dir(out), temp, 1,
                                (name, [shape]))
        partition = load_states(layout.optim_states_file(staged_in, tp, 0))
        states = partition[c.OPTIMIZER_STATE_DICT][c.OPTIMIZER_STATE_DICT]["state"]
        for gid, group in enumerate(client[c.PARAM_SHAPES]):
            step = states.get(gid, {}).get("step")
            for name in group:
                path = layout.universal_state_file(out, name, "step")
                if step is not None and os.path.isdir(os.path.dirname(path)) and not os.path.exists(path):
                    torch.save(step, path)
        for name, tensor in client["module"].items():
            path = layout.universal_state_file(out, name)
            if name not in shapes and torch.is_tensor(tensor) and not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.save({c.PARAM: tensor.float()}, path)
    if not keep_temp_folder:
        shutil.rmtree(temp, ignore_errors=True)
    path = layout.universal_optimizer_state_file(out)
    common = load_states(path, mmap=False)
    for key in (c.OPTIMIZER_STATE_DICT, c.FP32_FLAT_GROUPS):
        common.pop(key, None)
    common[c.DS_VERSION] = partition[c.DS_VERSION]
    torch.save(common, path)
    for path in model_states_files(out):
        if layout.ZERO3_MODEL_STATES.fullmatch(os.path.basename(path)) and layout.dp_rank_of(path) == 0:
            os.rename(path, os.path.join(out, layout.model_states_name(layout.tp_rank_of(path))))
        elif layout.ZERO3_MODEL_STATES.fullmatch(os.path.basename(path)):
            os.unlink(path)


def _every_param_group(staged_in: str, out: str) -> None:
    """``zero/optimizer_state.pt`` gets the param groups of every partition file: DeepSpeed's
    converter keeps those of the first (stage 0, tensor rank 0, data-parallel rank 0), without the
    groups only later pipeline stages or other expert-parallel ranks have (the final norm's, the
    output layer's, ...). Groups are told apart by their role (and expert or not); a universal load
    pairs them the same way (``checkpoint_loading.universal_groups_by_role``)."""
    import torch

    from deepspeed.checkpoint import constants as c

    path = layout.universal_optimizer_state_file(out)
    if not os.path.isfile(path):
        return
    state = load_states(path, mmap=False)
    key = lambda group: (group.get("role"), bool(group.get("moe")))  # noqa: E731
    groups = {key(g): g for g in state.get("param_groups") or []}
    if len(groups) < len(state.get("param_groups") or []):  # not role groups (another trainer's): as converted
        return
    for partition in optim_states_files(staged_in):
        optimizer = load_states(partition)[c.OPTIMIZER_STATE_DICT]
        base = optimizer.get(c.BASE_OPTIMIZER_STATE) or optimizer.get(c.OPTIMIZER_STATE_DICT) or {}
        for group in base.get("param_groups") or []:
            groups.setdefault(key(group), group)
    if len(groups) > len(state["param_groups"]):
        state["param_groups"] = list(groups.values())
        torch.save(state, path)


def link_tied_output(out: str, client: Dict[str, Any]) -> None:
    """A tied output layer IS the word embedding: ``zero/output_layer.weight`` names its folder, which
    a pipeline-parallel run's last stage loads its copy from."""
    saved = client.get("args") or {}
    embedding = layout.universal_state_file(out, "embedding.word_embeddings.weight")
    output = os.path.dirname(layout.universal_state_file(out, "output_layer.weight"))
    if saved.get("untie_embeddings_and_output_weights", True) or not os.path.isfile(embedding) \
            or os.path.lexists(output):
        return
    os.symlink(os.path.basename(os.path.dirname(embedding)), output)


def drop_placeholders(out: str, record) -> None:
    """Remove the zero-filled optimizer moments staged for DeepSpeed's converter (not carried)."""
    for name, key in record["placeholders"]:
        placeholder = layout.universal_state_file(out, name, key)
        if os.path.exists(placeholder):
            os.unlink(placeholder)


def converted_listing(out: str):
    """(the parameter folders of a converted checkpoint, the states carried for them)."""
    zero = layout.universal_parameters_dir(out)
    params = layout.universal_parameters(out)
    carried = sorted({os.path.splitext(f)[0] for p in params for f in os.listdir(os.path.join(zero, p))})
    return params, carried


def read_record(tag_dir: str) -> Dict[str, Any]:
    """The summary a conversion left in its output folder ({} for folders converted elsewhere)."""
    try:
        with open(os.path.join(tag_dir, CONVERSION_RECORD)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def describe(summary: Dict[str, Any]) -> str:
    s = summary
    tokens = f", {s['tokens']} tokens" if s.get("tokens") is not None else ""
    lines = [
        f"converted {s['source']} (iteration {s['iteration']}, {s['consumed_samples']} samples{tokens}; "
        f"TP={s['tensor_model_parallel_size']}, PP={s.get('pipeline_model_parallel_size', 1)}, "
        f"EP={s.get('expert_model_parallel_size', 1)}, DP={s['data_parallel_size']}, ZeRO {s['zero_stage']})",
        f"wrote {s['output']}: {s['parameters']} parameters (fp32 weights; optimizer state "
        f"{', '.join(k for k in s['carried'] if k != 'fp32') or 'none'}) and the run's client state (iteration, "
        "consumed samples, LR schedule, RNG)",
    ]
    if s["not_carried"]:
        lines.append(f"not carried (the optimizer re-creates them on load): {', '.join(s['not_carried'])}")
    load_dir = os.path.dirname(s["output"])
    lines.append(f"wrote {s['latest_universal']} -> {os.path.basename(s['output'])}")
    lines.append(f"load it at any data-, tensor-, pipeline- or expert-parallel size (ZeRO 1 or 2) with: "
                 f"--load {load_dir} --universal-checkpoint")
    return "\n".join(lines)
