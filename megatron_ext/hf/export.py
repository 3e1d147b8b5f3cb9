"""``megatron-ext export-hf CHECKPOINT OUT_DIR``: a checkpoint of ours as a standard Hugging Face
folder (docs/huggingface.md).

Everything that can be refused is checked before any weight is read: the output folder (never
overwritten unless asked), the architecture (``config_mapping.export_architecture``), the tokenizer
(found, and with the vocabulary the model was trained with). The folder is built in a hidden
staging folder beside OUT_DIR and renamed into place at the end, so a failure or a kill leaves no
half-written OUT_DIR (and an existing one untouched).

Written: ``config.json`` (plus the 4.x-style ``rope_theta``/``rope_scaling`` keys),
``generation_config.json``, ``model.safetensors`` (or shards + ``model.safetensors.index.json``),
the tokenizer files (checked to give training's ids), and ``megatron_ext_export.json`` (what was
read, from where, and what was folded or left out).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import time
from typing import Callable, Dict, List, Optional

import torch

from megatron_ext.fileio import staged_folder
from megatron_ext.hf import HFError, require
from megatron_ext.hf import checkpoint_reader, config_mapping, tokenizer_export, weight_mapping
from megatron_ext.hf import reference_model
from megatron_ext.hf.config_mapping import multipliers
from megatron_ext.progress import Progress, folder_bytes, tensor_bytes

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
RECORD = "megatron_ext_export.json"
STAGING_PREFIX = ".export-hf."
VERIFY_TOLERANCE = 1e-4  # fp32 logits, ours vs transformers'


@dataclasses.dataclass
class ExportOptions:
    checkpoint: str
    out_dir: str
    dtype: Optional[str] = None  # None: the dtype of the weights read (fp32 master weights)
    max_shard_size: str = "5GB"
    overwrite: bool = False
    tokenizer_type: Optional[str] = None  # overrides of the saved tokenizer flags (moved files)
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    no_tokenizer: bool = False
    verify: bool = False


def check_output_dir(out_dir: str, overwrite: bool, inside: Optional[str] = None) -> str:
    """The absolute output folder; HFError if it cannot be written as asked."""
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise HFError(f"OUT_DIR {out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise HFError(f"OUT_DIR {out_dir} exists and is not empty; choose another folder, or pass --overwrite "
                      "to replace it")
    if inside and os.path.commonpath([out_dir, inside]) == inside:
        raise HFError(f"OUT_DIR {out_dir} is inside the checkpoint {inside}")
    return out_dir


@contextlib.contextmanager
def staged(out_dir: str, say: Callable[[str], None]):
    """A hidden staging folder beside ``out_dir`` to build the output in (``fileio.staged_folder``):
    synced and renamed into place when the block ends (replacing an empty ``out_dir``, or the old one
    when the caller was told to overwrite), deleted when it raises (or is interrupted)."""
    with staged_folder(out_dir, STAGING_PREFIX) as staging:
        os.makedirs(staging)
        yield staging
        if os.path.isdir(out_dir) and os.listdir(out_dir):
            say(f"replacing the previous {out_dir}")


def write_record(folder: str, name: str, summary: Dict) -> None:
    with open(os.path.join(folder, name), "w") as f:
        json.dump(summary, f, indent=2)


def write_config(config, out_dir: str, extra: Dict) -> None:
    data = config.to_dict()
    data.update({k: v for k, v in extra.items() if v is not None})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def write_safetensors(state: Dict[str, torch.Tensor], out_dir: str, max_shard_size: str,
                      say: Callable[[str], None], stage=None) -> List[str]:
    """``model.safetensors``, or shards of at most ``max_shard_size`` with their index; ``stage``
    (``megatron_ext.progress``) counts the tensors and bytes written."""
    from huggingface_hub import split_torch_state_dict_into_shards

    save_file = require("safetensors.torch").save_file
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    names = []
    written = [0, 0]  # tensors, bytes
    for n, (filename, tensors) in enumerate(split.filename_to_tensors.items(), 1):
        shard = {name: state[name] for name in tensors}
        size = sum(t.numel() * t.element_size() for t in shard.values())
        if split.is_sharded and stage is None:
            say(f"writing {filename} ({n}/{len(split.filename_to_tensors)}, {size / 2**30:.2f} GiB)")
        save_file(shard, os.path.join(out_dir, filename), metadata={"format": "pt"})
        names.append(filename)
        written = [written[0] + len(shard), written[1] + size]
        if stage is not None:
            stage.set(*written)
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": split.tensor_to_filename}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
        names.append("model.safetensors.index.json")
    return names


def export(options: ExportOptions, say: Callable[[str], None] = print) -> Dict:
    """Run the export; returns a summary (also written to ``megatron_ext_export.json``)."""

    transformers = require("transformers")
    require("safetensors")
    if options.dtype is not None and options.dtype not in DTYPES:
        raise HFError(f"--dtype {options.dtype}: choose one of fp32, bf16, fp16")
    tag_dir = checkpoint_reader.locate(options.checkpoint)  # progress only once every check has passed
    out_dir = check_output_dir(options.out_dir, options.overwrite, inside=tag_dir)
    args = checkpoint_reader.saved_args(tag_dir)
    architecture = config_mapping.export_architecture(args)
    tok, tok_type, tok_source = (None, None, "--no-tokenizer") if options.no_tokenizer else \
        tokenizer_export.training_tokenizer(args, options.tokenizer_type, options.tokenizer_model,
                                            options.vocab_file, options.merge_file)
    vocab = int(args.vocab_size_unpadded)
    if tok is not None and tok.vocab_size != vocab:
        raise HFError(f"the tokenizer {tok_source} has {tok.vocab_size} ids, the model was trained with a "
                      f"vocabulary of {vocab}: not the training tokenizer")

    progress = Progress("export-hf")
    say = progress.around(say)
    with progress.stage(f"reading {tag_dir}") as stage:
        weights = checkpoint_reader.read(tag_dir, say)
        stage.set(len(weights.state), sum(tensor_bytes(t) for t in weights.state.values()))
    dtype = DTYPES[options.dtype] if options.dtype else weights.dtype
    start = time.time()
    hf_state, tie, notes = weight_mapping.to_hf(weights.state, args, architecture)
    with progress.stage(f"converting to {architecture} tensors ({str(dtype).replace('torch.', '')})", len(hf_state),
                        sum(v.numel() * dtype.itemsize for v in hf_state.values())) as stage:
        for name, tensor in hf_state.items():
            hf_state[name] = tensor.to(dtype).contiguous()
            stage.tensor(hf_state[name])
    notes = weights.notes + notes
    config = config_mapping.hf_config(args, architecture, vocab_size=vocab, tie=tie,
                                      bos=None if tok is None else tok.bos, eos=None if tok is None else tok.eod,
                                      dtype=str(dtype).replace("torch.", ""))
    with staged(out_dir, say) as staging:
        write_config(config, staging, config_mapping.legacy_config_keys(config))
        generation = transformers.GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
            pad_token_id=config.eos_token_id)
        generation.save_pretrained(staging)
        with progress.stage("writing safetensors", len(hf_state), sum(tensor_bytes(t) for t in hf_state.values()),
                            poll=lambda: (0, folder_bytes(staging, ".safetensors"))) as stage:
            files = write_safetensors(hf_state, staging, options.max_shard_size, say, stage)
        tokenizer_files, checked = [], 0
        if tok is not None:
            tokenizer_files = tokenizer_export.write(tok, staging, tok_source)
            checked = tokenizer_export.check(staging, tok)
        else:
            notes.append(f"no tokenizer written ({tok_source})")
        summary = {
            "source": tag_dir, "iteration": weights.iteration, "weights_read": weights.source,
            "architecture": architecture, "dtype": str(dtype).replace("torch.", ""),
            "parameters": sum(t.numel() for t in hf_state.values()), "vocab_size": vocab,
            "tie_word_embeddings": tie, "files": files + tokenizer_files,
            "tokenizer": None if tok is None else {"type": tok_type, "source": tok_source,
                                                   "texts_checked_same_ids": checked},
            "notes": notes, "output": out_dir,
            "exported_at": datetime.datetime.now().isoformat(timespec="seconds"),
            "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        }
        if options.verify:
            summary["verify"] = verify(staging, args, weights.state, dtype, say)
        write_record(staging, RECORD, summary)
    summary["seconds"] = round(time.time() - start, 1)
    return summary


def verify(folder: str, args, state: Dict[str, torch.Tensor], dtype: torch.dtype, say) -> Dict:
    """Logits of ``transformers.AutoModelForCausalLM`` on ``folder`` (fp32) against our own model
    on the same weights, and a short ``generate``; HFError when they differ by more than the tolerance."""

    transformers = require("transformers")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    theirs.eval()
    # Our model gets the weights rounded to the exported dtype, then computes in fp32 like the Hugging
    # Face copy: the same function exactly, unless multipliers were folded in after the rounding
    # (then the rounding of the products differs: a tolerance relative to the logits' size).
    ours = reference_model.build(args, state, None if dtype == torch.float32 else dtype)
    vocab, seq = int(args.vocab_size_unpadded), min(int(args.seq_length), 64)
    diff, scale = reference_model.compare(ours, theirs, vocab, seq)
    exact = dtype == torch.float32 or multipliers(args) == (1.0, 1.0, 1.0)
    tolerance = VERIFY_TOLERANCE if exact else 1e-2 * scale
    prompt = torch.randint(0, vocab, (1, 4), generator=torch.Generator().manual_seed(1))
    generated = theirs.generate(prompt, max_new_tokens=4, do_sample=False,
                                pad_token_id=theirs.config.eos_token_id or 0)
    say(f"verify: max |logit difference| {diff:.3g} between our model and {type(theirs).__name__} "
        f"(fp32, 2x{seq} random tokens, tolerance {tolerance:g}); generate gave {generated.shape[1] - 4} tokens")
    if not diff <= tolerance:
        raise HFError(f"verify: the exported model's logits differ from ours by {diff:.3g} (> {tolerance:g}); "
                      "nothing written")
    return {"max_abs_logit_difference": diff, "tokens": [2, seq], "tolerance": tolerance,
            "generated_tokens": int(generated.shape[1] - 4)}
