"""Universal checkpoints: DeepSpeed's own converter (``deepspeed.checkpoint.ds_to_universal``) run on
our checkpoints, and the few things megatron-core models need around it.

``convert(tag_dir, output_dir)``:

1. Checks the input before writing anything: a ZeRO 1/2 checkpoint folder (``global_stepN``) with
   its model-states and optimizer-partition files (``ConversionError``, one line, otherwise).
2. Stages a copy of the input in a hidden folder beside the output (files hard-linked where
   unchanged; the source checkpoint is never modified):
   * the model-states files lose megatron-core's ``*._extra_state = None`` entries (the converter
     calls ``.float()`` on every module entry);
   * their ``universal_checkpoint_info`` is rebuilt from the checkpoint's saved ``args`` (TP
     patterns, original/padded vocabulary; ``universal_checkpoint_info``), keeping
     only patterns that match a parameter (the converter rejects unused patterns);
   * optimizer partitions that lack one of Adam's two moments (Muon's matrices keep only
     ``exp_avg``) get a zero placeholder, because the converter reads both from every group; the
     placeholder's output files are deleted afterwards.
3. Runs the converter into the staging folder, moves the result to ``output_dir`` in one rename
   and writes ``latest_universal`` (naming it) beside it, atomically.

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
import tempfile
import types
from typing import Any, Dict, List, Optional

from megatron_ext.training.checkpoint_files import (
    LATEST_UNIVERSAL,
    MODEL_STATES,
    CheckpointFileError,
    client_state,
    model_states_files,
    optim_states_files,
    saved_zero_stage,
)
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
    return info


def check_input(tag_dir: str) -> Dict[str, Any]:
    """Everything checked before converting: raises ConversionError for a folder we cannot convert."""
    models = model_states_files(tag_dir)
    if not models:
        raise ConversionError(f"{tag_dir}: not a checkpoint (no {MODEL_STATES} files)")
    try:
        client = client_state(tag_dir)
    except CheckpointFileError as e:
        raise ConversionError(str(e)) from None
    if "args" not in client and "universal_checkpoint_info" not in client:
        raise ConversionError(f"{models[0]}: no 'args' or 'universal_checkpoint_info' in the client state "
                              "(not written by megatron_ext or Megatron-DeepSpeed)")
    stage = saved_zero_stage(client)
    if glob.glob(os.path.join(glob.escape(tag_dir), "zero_pp_rank_*_model_states.pt")) or stage == 3:
        raise ConversionError(f"{tag_dir}: a ZeRO 3 checkpoint; converting those is not supported here "
                              "(DeepSpeed 0.19.8 cannot load a universal checkpoint into ZeRO 3 either)")
    optims = optim_states_files(tag_dir)
    if not optims:
        raise ConversionError(f"{tag_dir}: saved with --zero-stage 0 (no ZeRO optimizer partitions); DeepSpeed's "
                              "converter needs a ZeRO 1 or 2 checkpoint (a ZeRO 0 checkpoint already loads at "
                              "any data-parallel size with the same tensor-parallel size)")
    saved = client.get("args") or {}
    return {
        "client": client,
        "model_files": models,
        "optim_files": optims,
        "iteration": client.get("iteration"),
        "consumed_samples": client.get("consumed_samples"),
        "tokens": client.get("tokens"),
        "tp": client.get("mp_world_size", saved.get("tensor_model_parallel_size")),
        "dp": client.get("dp_world_size", saved.get("data_parallel_size")),
        "zero_stage": stage,
    }


def _pattern_keys():
    from deepspeed.checkpoint import constants as c

    return (c.TP_REPLICATED_PARAMETER_PATTERNS, c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
            c.VOCABULARY_PARAMETER_PATTERNS, c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0,
            c.PARAMETER_TO_AVERAGE_PATTERNS, c.PIPELINE_REPLICATED_PARAMETER_PATTERNS)


def conversion_info(client: Dict[str, Any], param_names: List[str]) -> Dict[str, Any]:
    """``universal_checkpoint_info`` for the converter: rebuilt from the saved args (so checkpoints
    written before a fix of the patterns convert right), with only the patterns that match a
    parameter (DeepSpeed's converter fails on unused ones)."""
    from deepspeed.checkpoint import constants as c

    if client.get("args"):
        info = universal_checkpoint_info(types.SimpleNamespace(**client["args"]))
    else:  # a Megatron-DeepSpeed checkpoint: its own info
        info = dict(client["universal_checkpoint_info"])
    info.setdefault(c.UNIVERSAL_CHECKPOINT_VERSION_KEY, c.UNIVERSAL_CHECKPOINT_VERSION_VALUE)
    for key in _pattern_keys():
        if key in info:
            info[key] = [p for p in info[key] if any(re.match(p, n) for n in param_names)]
    return info


def _param_names(client: Dict[str, Any]) -> List[str]:
    return [name for group in client.get("param_shapes") or [] for name in group]


# -- staging ----------------------------------------------------------------------------------
def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def _stage_model_states(src: str, dst: str) -> None:
    import torch

    from deepspeed.checkpoint import constants as c

    state = torch.load(src, map_location="cpu", weights_only=False)
    module = state["module"]
    # megatron-core modules put `_extra_state = None` in their state dict; the converter needs tensors.
    state["module"] = type(module)((k, v) for k, v in module.items() if torch.is_tensor(v))
    state[c.UNIVERSAL_CHECKPOINT_INFO] = conversion_info(state, _param_names(state))
    torch.save(state, dst)


def _stage_optim_states(src: str, dst: str, record: Dict[str, Any]) -> None:
    """Link the partition file, or write a copy with zero placeholders for missing Adam moments;
    ``record`` collects the placeholders (to delete from the output) and the states not carried."""
    import torch

    from deepspeed.checkpoint import constants as c

    state = torch.load(src, map_location="cpu", weights_only=False)
    optim = state[c.OPTIMIZER_STATE_DICT]
    groups = optim[c.BASE_OPTIMIZER_STATE]["state"]
    fp32 = optim[c.SINGLE_PARTITION_OF_FP32_GROUPS]
    changed = False
    for gid, mapping in enumerate(optim[c.PARAM_SLICE_MAPPINGS]):
        group_state = groups.setdefault(gid, {})
        record["not_carried"].update(k for k in group_state if k not in CARRIED and k != "step")
        for key in CARRIED:
            if key not in group_state:
                group_state[key] = torch.zeros_like(fp32[gid])
                record["placeholders"].update((name, key) for name in mapping)
                changed = True
    if changed:
        torch.save(state, dst)
    else:
        _link_or_copy(src, dst)


def _stage_input(tag_dir: str, staged: str, record: Dict[str, Any]) -> None:
    os.makedirs(staged)
    for name in sorted(os.listdir(tag_dir)):
        src, dst = os.path.join(tag_dir, name), os.path.join(staged, name)
        if not os.path.isfile(src):
            continue
        if re.fullmatch(r"mp_rank_\d+_model_states\.pt", name):
            _stage_model_states(src, dst)
        elif name.endswith("_optim_states.pt"):
            _stage_optim_states(src, dst, record)
        else:
            _link_or_copy(src, dst)


@dataclasses.dataclass(frozen=True)
class ConverterOptions:
    """DeepSpeed's own ``ds_to_universal`` options (the flags users type for it)."""

    extract_workers: int = 1
    merge_workers: Optional[int] = None  # default: half the extract workers
    keep_temp_folder: bool = False  # keep <output>/tmp, the extracted partition slices
    strict: bool = True  # --no_strict: tolerate parameter patterns that match nothing


def _run_converter(input_folder: str, output_folder: str, options: ConverterOptions, log, bars=None) -> None:
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
    from megatron_ext.fileio import write_text_atomically

    tag_dir = os.path.abspath(tag_dir)
    if not os.path.isdir(tag_dir):
        raise ConversionError(f"--input_folder {tag_dir}: no such directory")
    facts = check_input(tag_dir)
    output_dir = os.path.abspath(output_dir or tag_dir.rstrip(os.sep) + "_universal")
    if os.path.commonpath([output_dir, tag_dir]) == tag_dir:
        raise ConversionError(f"--output_folder {output_dir} is inside the input checkpoint {tag_dir}")
    if os.path.exists(output_dir):
        raise ConversionError(f"--output_folder {output_dir} already exists; remove it or choose another folder")
    parent = os.path.dirname(output_dir)
    if not os.path.isdir(parent):
        raise ConversionError(f"--output_folder {output_dir}: its parent folder {parent} does not exist")

    out_name = os.path.basename(output_dir)
    _remove_stale_staging(parent, out_name)
    staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{out_name}.{os.getpid()}.", dir=parent)
    record = {"placeholders": set(), "not_carried": set()}
    log = sys.stderr if verbose else io.StringIO()
    # On a terminal a long conversion shows where it is: our stages and DeepSpeed's progress bars.
    progress = verbose or sys.stderr.isatty()
    say = (lambda m: print(f"to-universal: {m}", file=sys.stderr, flush=True)) if progress else (lambda m: None)
    try:
        staged_in = os.path.join(staging, "in", os.path.basename(tag_dir))
        staged_out = os.path.join(staging, "out", out_name)
        say(f"staging {tag_dir} (iteration {facts['iteration']}, {len(facts['optim_files'])} ZeRO partition files)")
        _stage_input(tag_dir, staged_in, record)
        say("extracting and merging with DeepSpeed's ds_to_universal")
        try:
            _run_converter(staged_in, staged_out, options, log, sys.stderr if progress else None)
        except Exception as e:  # noqa: BLE001 - the converter's own failure, reported in one line
            detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            hint = "" if verbose else " (run again with --verbose for the converter's output)"
            raise ConversionError(f"DeepSpeed's ds_to_universal failed on {tag_dir}: {type(e).__name__}: "
                                  f"{detail}{hint}") from None
        _drop_placeholders(staged_out, record)
        params, carried = _listing(staged_out)
        summary = {
            "source": tag_dir, "output": output_dir,
            "iteration": facts["iteration"], "consumed_samples": facts["consumed_samples"], "tokens": facts["tokens"],
            "tensor_model_parallel_size": facts["tp"], "data_parallel_size": facts["dp"],
            "zero_stage": facts["zero_stage"], "parameters": len(params),
            "carried": carried, "not_carried": sorted(record["not_carried"]),
        }
        with open(os.path.join(staged_out, CONVERSION_RECORD), "w") as f:
            json.dump(summary, f, indent=2)
        os.rename(staged_out, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    latest = os.path.join(parent, LATEST_UNIVERSAL)
    write_text_atomically(latest, out_name)
    summary["latest_universal"] = latest
    return summary


def _drop_placeholders(out: str, record) -> None:
    """Remove the zero-filled optimizer moments staged for DeepSpeed's converter (not carried)."""
    for name, key in record["placeholders"]:
        placeholder = os.path.join(out, "zero", name, f"{key}.pt")
        if os.path.exists(placeholder):
            os.unlink(placeholder)


def _listing(out: str):
    """(the parameter folders of a converted checkpoint, the states carried for them)."""
    zero = os.path.join(out, "zero")
    params = sorted(p for p in os.listdir(zero) if os.path.isdir(os.path.join(zero, p)))
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
        f"TP={s['tensor_model_parallel_size']}, DP={s['data_parallel_size']}, ZeRO {s['zero_stage']})",
        f"wrote {s['output']}: {s['parameters']} parameters (fp32 weights; optimizer state "
        f"{', '.join(k for k in s['carried'] if k != 'fp32') or 'none'}) and the run's client state (iteration, "
        "consumed samples, LR schedule, RNG)",
    ]
    if s["not_carried"]:
        lines.append(f"not carried (the optimizer re-creates them on load): {', '.join(s['not_carried'])}")
    load_dir = os.path.dirname(s["output"])
    lines.append(f"wrote {s['latest_universal']} -> {os.path.basename(s['output'])}")
    lines.append(f"load it at any data-parallel / tensor-parallel size (ZeRO 1 or 2) with: "
                 f"--load {load_dir} --universal-checkpoint")
    return "\n".join(lines)
