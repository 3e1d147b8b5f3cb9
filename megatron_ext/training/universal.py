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
     patterns, original/padded vocabulary; ``checkpointing.universal_checkpoint_info``), keeping
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

LATEST_UNIVERSAL = "latest_universal"
MODEL_STATES = "mp_rank_*_model_states.pt"
OPTIM_STATES = "*_optim_states.pt"
CONVERSION_RECORD = "universal_conversion.json"
CARRIED = ("exp_avg", "exp_avg_sq")  # the optimizer states ds_to_universal extracts (with fp32 and step)
STAGING_PREFIX = ".to-universal."


class ConversionError(ValueError):
    """Bad input for the conversion; the message is one line."""


# -- reading checkpoints --------------------------------------------------------------------------
def load_states(path: str) -> Dict[str, Any]:
    """A DeepSpeed ``*.pt`` file, memory-mapped (reading the client state of a big model-states
    file costs no tensor reads)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:  # written in the legacy (non-zip) format: no mmap
        return torch.load(path, map_location="cpu", weights_only=False)


def model_states_files(tag_dir: str) -> List[str]:
    return sorted(glob.glob(os.path.join(glob.escape(tag_dir), MODEL_STATES)))


def read_latest(load_dir: str, name: str) -> Optional[str]:
    """The tag a DeepSpeed ``latest``-style file names, or None."""
    path = os.path.join(load_dir, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    return tag or None


def find_checkpoint(path: str) -> str:
    """The checkpoint folder (``global_stepN``) for a checkpoint folder or a run directory (its
    ``latest`` checkpoint)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: no such directory")
    if model_states_files(path):
        return path
    tag = read_latest(path, "latest")
    if tag is None:
        raise ConversionError(f"{path}: not a checkpoint (no {MODEL_STATES} files) and not a run directory "
                              "(no 'latest' file)")
    tag_dir = os.path.join(path, tag)
    if not model_states_files(tag_dir):
        raise ConversionError(f"{path}: 'latest' names {tag}, but {tag_dir} holds no checkpoint")
    return tag_dir


# -- what the conversion needs --------------------------------------------------------------------
def _zero_stage(tag_dir: str, client: Dict[str, Any]) -> Optional[int]:
    saved = client.get("args") or {}
    if "zero_stage" in saved:
        return int(saved["zero_stage"])
    ds_config = client.get("ds_config") or {}
    return (ds_config.get("zero_optimization") or {}).get("stage")


def check_input(tag_dir: str) -> Dict[str, Any]:
    """Everything checked before converting: raises ConversionError for a folder we cannot convert."""
    models = model_states_files(tag_dir)
    if not models:
        raise ConversionError(f"{tag_dir}: not a checkpoint (no {MODEL_STATES} files)")
    try:
        client = load_states(models[0])
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same bad input
        raise ConversionError(f"{models[0]}: cannot read ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(client, dict) or "module" not in client:
        raise ConversionError(f"{models[0]}: not a DeepSpeed model-states file")
    if "args" not in client and "universal_checkpoint_info" not in client:
        raise ConversionError(f"{models[0]}: no 'args' or 'universal_checkpoint_info' in the client state "
                              "(not written by megatron_ext or Megatron-DeepSpeed)")
    stage = _zero_stage(tag_dir, client)
    if glob.glob(os.path.join(glob.escape(tag_dir), "zero_pp_rank_*_model_states.pt")) or stage == 3:
        raise ConversionError(f"{tag_dir}: a ZeRO 3 checkpoint; converting those is not supported here "
                              "(DeepSpeed 0.19.8 cannot load a universal checkpoint into ZeRO 3 either)")
    optims = sorted(glob.glob(os.path.join(glob.escape(tag_dir), OPTIM_STATES)))
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

    from megatron_ext.training.checkpointing import universal_checkpoint_info

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


def _run_converter(input_folder: str, output_folder: str, workers: int, log) -> None:
    from deepspeed.checkpoint import ds_to_universal

    ns = argparse.Namespace(input_folder=input_folder, output_folder=output_folder,
                            num_extract_workers=workers, num_merge_workers=max(1, workers // 2),
                            keep_temp_folder=False, strict=True, inject_missing_state=False)
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # its prints and progress bars
        ds_to_universal.main(ns)


def _remove_stale_staging(parent: str, out_name: str) -> None:
    """Staging folders of conversions of the same output that were killed (their process is gone)."""
    for path in glob.glob(os.path.join(glob.escape(parent), f"{STAGING_PREFIX}{glob.escape(out_name)}.*")):
        pid = path.rsplit(".", 2)[-2] if path.count(".") >= 2 else ""
        if pid.isdigit() and int(pid) != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(path, ignore_errors=True)


# -- the conversion ---------------------------------------------------------------------------
def convert(tag_dir: str, output_dir: Optional[str] = None, workers: int = 1, verbose: bool = False) -> Dict[str, Any]:
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
    try:
        staged_in = os.path.join(staging, "in", os.path.basename(tag_dir))
        staged_out = os.path.join(staging, "out", out_name)
        _stage_input(tag_dir, staged_in, record)
        try:
            _run_converter(staged_in, staged_out, workers, log)
        except Exception as e:  # noqa: BLE001 - the converter's own failure, reported in one line
            detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            hint = "" if verbose else " (run again with --verbose for the converter's output)"
            raise ConversionError(f"DeepSpeed's ds_to_universal failed on {tag_dir}: {type(e).__name__}: "
                                  f"{detail}{hint}") from None
        for name, key in record["placeholders"]:
            placeholder = os.path.join(staged_out, "zero", name, f"{key}.pt")
            if os.path.exists(placeholder):
                os.unlink(placeholder)
        params = sorted(os.listdir(os.path.join(staged_out, "zero")))
        params = [p for p in params if os.path.isdir(os.path.join(staged_out, "zero", p))]
        carried = sorted({os.path.splitext(f)[0] for p in params
                          for f in os.listdir(os.path.join(staged_out, "zero", p))})
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


# -- command line (tools/ds_to_universal.py, megatron-ext to-universal) -----------------------------
def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False,
        description="Convert a megatron_ext (DeepSpeed ZeRO 1/2) checkpoint to DeepSpeed's universal format, "
                    "which loads at any data-parallel and tensor-parallel size (--universal-checkpoint). "
                    "Details: docs/checkpoints.md.")
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message}\n")  # one line, no usage
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR",
                   help="a run's --save directory: converts its 'latest' checkpoint (or give --input_folder)")
    p.add_argument("--load", dest="load_dir", default=None, metavar="DIR", help="same as RUN_DIR")
    p.add_argument("--input_folder", "--input-folder", default=None, metavar="CK/global_stepN",
                   help="the checkpoint folder to convert")
    p.add_argument("--output_folder", "--output-folder", default=None, metavar="OUT",
                   help="where to write (default: <input folder>_universal); 'latest_universal' is written "
                        "beside it, so keep it inside the directory you will --load")
    p.add_argument("--num_extract_workers", "--num-extract-workers", type=int, default=1,
                   help="processes extracting ZeRO partitions (DeepSpeed's option)")
    p.add_argument("--verbose", action="store_true", help="show the converter's own output")
    return p


def main(argv=None, prog: str = "ds_to_universal.py") -> int:
    parser = build_parser(prog)
    ns = parser.parse_args(argv)
    given = [x for x in (ns.run_dir, ns.load_dir, ns.input_folder) if x]
    if len(given) > 1:
        parser.error("give one of RUN_DIR, --load DIR or --input_folder CK/global_stepN")
    if not given:
        parser.error("nothing to convert: give --input_folder CK/global_stepN, or a run directory (RUN_DIR or --load DIR)")
    if ns.num_extract_workers < 1:
        parser.error(f"--num_extract_workers {ns.num_extract_workers}: give at least 1")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # library start-up chatter; stdout is the summary
            if ns.input_folder:
                tag_dir = os.path.abspath(ns.input_folder)
                if not os.path.isdir(tag_dir):
                    raise ConversionError(f"--input_folder {tag_dir}: no such directory")
            else:
                tag_dir = find_checkpoint(ns.run_dir or ns.load_dir)
            summary = convert(tag_dir, ns.output_folder, workers=ns.num_extract_workers, verbose=ns.verbose)
    except ConversionError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(describe(summary))
    return 0
