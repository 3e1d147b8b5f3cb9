"""``megatron-ext import-hf HF_DIR_OR_NAME OUT_DIR``: a Llama-family (Llama, Mistral) or Mixtral
model as a checkpoint the trainer continues with ``--finetune`` (docs/huggingface.md).

Everything that can be refused is checked before weights are read: the source (a local folder, or
a hub name in the local cache; ``hub.py``), its config (``config_mapping.import_flags``), the
tensor-parallel size (the trainer's own flag checks), its tokenizer, the output folder. OUT_DIR is
built in a hidden staging folder beside it and renamed into place at the end.

Written into OUT_DIR:

* the checkpoint (``latest``, ``global_step0/mp_rank_XX_model_states.pt``; ``checkpoint_writer``),
  the weights as stored in the source (``--dtype`` to convert), so import then export gives the
  same bits;
* ``tokenizer/``: the model's tokenizer files (the trainer reads them with ``--tokenizer-type
  HFTokenizer``);
* ``megatron_ext_args.txt``: the trainer flags of the model, the tokenizer, ``--load OUT_DIR
  --finetune`` (one per line, ``#`` comments), and ``train_alcf.env``: the same as
  ``train_alcf.sh`` variables plus ``TRAIN_ALCF_EXTRA_ARGS`` for the flags that have no variable;
* ``megatron_ext_import.json``: what was imported, from where, and the notes.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import shutil
import time
from typing import Callable, Dict, List, Optional

import torch

from megatron_ext.hf import HFError, require
from megatron_ext.hf.export import DTYPES, VERIFY_TOLERANCE, check_output_dir, staged, write_record
from megatron_ext.hf.tokenizer_export import TOKENIZER_FILES
from megatron_ext.data import hub
from megatron_ext.data.tokenizers import HFTokenizer
from megatron_ext.hf import checkpoint_writer, config_mapping, weight_mapping
from megatron_ext.hf import reference_model
from megatron_ext.progress import Progress, folder_bytes, tensor_bytes

RECORD = "megatron_ext_import.json"
ARGS_FILE = "megatron_ext_args.txt"
ENV_FILE = "train_alcf.env"
TOKENIZER_DIR = "tokenizer"

# flag -> train_alcf.sh variable (the launcher passes these from its variables)
LAUNCHER_VARIABLES = {
    "--num-layers": "NLAYERS", "--hidden-size": "HIDDEN", "--ffn-hidden-size": "FFN_HIDDEN_SIZE",
    "--num-attention-heads": "HEADS", "--num-key-value-heads": "NUM_KV_HEAD", "--rope-theta": "ROPE_THETA",
    "--seq-length": "SEQ", "--tensor-model-parallel-size": "TP", "--num-experts": "NUM_EXPERTS",
    "--moe-router-topk": "MOE_TOPK", "--moe-ffn-hidden-size": "MOE_FFN_HIDDEN_SIZE",
    "--tokenizer-type": "TOKENIZER_TYPE", "--tokenizer-model": "TOKENIZER_MODEL", "--load": "LOAD",
}
# flags the launcher sets itself from the variables above (the llama style is its default)
LAUNCHER_IMPLIED = {"--model-style"}


@dataclasses.dataclass
class ImportOptions:
    source: str
    out_dir: str
    tensor_model_parallel_size: int = 1
    dtype: Optional[str] = None  # None: as stored in the source
    tokenizer: Optional[str] = None  # a tokenizer folder / hub name when the model folder has none
    seq_length: Optional[int] = None
    overwrite: bool = False
    verify: bool = False


class _Weights:
    """Tensors of a Hugging Face folder by name, read on demand (safetensors or PyTorch .bin files)."""

    def __init__(self, folder: str):
        self.folder = folder
        self._open = {}
        index = {}
        for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                with open(path) as f:
                    index = json.load(f)["weight_map"]
                break
        if not index:
            single = [n for n in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(folder, n))]
            if not single:
                raise HFError(f"{folder}: no model weights (model.safetensors, pytorch_model.bin or their index)")
            index = {name: single[0] for name in self._names_in(single[0])}
        self.file_of = index

    def _load(self, filename: str):
        if filename not in self._open:
            path = os.path.join(self.folder, filename)
            if not os.path.isfile(path):
                raise HFError(f"{self.folder}: the weight index names {filename}, which is missing")
            if filename.endswith(".safetensors"):
                self._open[filename] = require("safetensors").safe_open(path, framework="pt")
            else:
                self._open[filename] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return self._open[filename]

    def _names_in(self, filename: str) -> List[str]:
        handle = self._load(filename)
        return list(handle.keys())

    def names(self) -> List[str]:
        return list(self.file_of)

    def file_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.folder, f)) for f in set(self.file_of.values())
                   if os.path.isfile(os.path.join(self.folder, f)))

    def get(self, name: str) -> torch.Tensor:
        handle = self._load(self.file_of[name])
        return handle.get_tensor(name) if hasattr(handle, "get_tensor") else handle[name]


def _copy_tokenizer(folder: str, dest: str) -> List[str]:
    os.makedirs(dest)
    copied = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, n))]
    for name in copied:
        shutil.copyfile(os.path.join(folder, name), os.path.join(dest, name))
    return copied


def import_hf(options: ImportOptions, say: Callable[[str], None] = print) -> Dict:
    """Run the import; returns a summary (also written to ``megatron_ext_import.json``)."""

    transformers = require("transformers")
    if options.dtype is not None and options.dtype not in DTYPES:
        raise HFError(f"--dtype {options.dtype}: choose one of fp32, bf16, fp16")
    folder = hub.resolve(options.source, "HF_DIR_OR_NAME")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise HFError(f"{options.source}: no config.json in {folder}: not a Hugging Face model folder")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable config is the same bad input
        raise HFError(f"{folder}/config.json: transformers cannot read it ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    flags, architecture = config_mapping.import_flags(config, options.source)
    out_dir = check_output_dir(options.out_dir, options.overwrite)
    tp = options.tensor_model_parallel_size
    tokenizer_folder = hub.resolve(options.tokenizer, "--tokenizer") if options.tokenizer else folder
    if not any(os.path.isfile(os.path.join(tokenizer_folder, n)) for n in ("tokenizer.json", "tokenizer.model",
                                                                             "vocab.json")):
        raise HFError(f"{tokenizer_folder}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json); "
                      "give one with --tokenizer DIR_OR_NAME")
    tok = HFTokenizer(tokenizer_folder)
    seq = options.seq_length or config_mapping.seq_length_for(config.max_position_embeddings)
    model_flags = flags + ["--seq-length", str(seq), "--tensor-model-parallel-size", str(tp),
                           "--tokenizer-type", "HFTokenizer", "--tokenizer-model", os.path.join(out_dir, TOKENIZER_DIR)]
    args = checkpoint_writer.trainer_args(model_flags, world_size=tp)  # the trainer's own checks (TP size...)
    rows = int(config.vocab_size)
    notes = []
    if tok.vocab_size > rows:
        raise HFError(f"{options.source}: its tokenizer has {tok.vocab_size} ids but the model only {rows} "
                      "embedding rows")
    if tok.vocab_size < rows:
        notes.append(f"the model has {rows} embedding rows, its tokenizer {tok.vocab_size} ids: the "
                     f"{rows - tok.vocab_size} rows no token reaches are dropped (the trainer's vocabulary is "
                     "the tokenizer's)")
    args.vocab_size_unpadded = tok.vocab_size
    weights = _Weights(folder)
    progress = Progress("import-hf")
    say = progress.around(say)
    start = time.time()
    with staged(out_dir, say) as staging:
        tokenizer_files = _copy_tokenizer(tokenizer_folder, os.path.join(staging, TOKENIZER_DIR))
        with progress.stage(f"reading {architecture} from {folder}", len(weights.names()), weights.file_bytes()) as stage:
            def get(name: str) -> torch.Tensor:
                tensor = weights.get(name)
                stage.tensor(tensor)
                return tensor

            state = weight_mapping.from_hf(get, weights.names(), config, architecture)
        dtype = DTYPES.get(options.dtype) if options.dtype else None
        for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if name in state:
                state[name] = state[name][: tok.vocab_size]
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        stored = sorted({str(v.dtype).replace("torch.", "") for v in state.values()})
        provenance = {"source": options.source, "folder": folder, "architecture": architecture,
                      "transformers": transformers.__version__,
                      "imported_at": datetime.datetime.now().isoformat(timespec="seconds")}
        with progress.stage(f"writing the checkpoint (tensor-parallel size {tp})", len(state),
                            sum(tensor_bytes(t) for t in state.values()),
                            poll=lambda: (0, folder_bytes(staging, "_model_states.pt"))) as stage:
            files = checkpoint_writer.write(staging, args, state, provenance)
            stage.set(len(state), 0)
        launch = _write_launch_files(staging, out_dir, model_flags)
        summary = {"source": options.source, "folder": folder, "architecture": architecture, "output": out_dir,
                   "tensor_model_parallel_size": tp, "dtype": stored, "vocab_size": tok.vocab_size,
                   "parameters": sum(t.numel() for t in state.values()), "files": files, "tokenizer": tokenizer_files,
                   "flags": model_flags, "launch": launch, "notes": notes, **provenance}
        if options.verify:
            summary["verify"] = verify(folder, args, state, say)
        write_record(staging, RECORD, summary)
    summary["seconds"] = round(time.time() - start, 1)
    return summary


def _write_launch_files(staging: str, out_dir: str, model_flags: List[str]) -> Dict[str, str]:
    """``megatron_ext_args.txt`` and ``train_alcf.env`` (see the module docstring)."""
    flags = model_flags + ["--load", out_dir, "--finetune"]
    pairs, i = [], 0
    while i < len(flags):  # [flag, value] or [flag]
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            pairs.append(flags[i:i + 2])
            i += 2
        else:
            pairs.append(flags[i:i + 1])
            i += 1
    args_path = os.path.join(out_dir, ARGS_FILE)
    with open(os.path.join(staging, ARGS_FILE), "w") as f:
        f.write(f"# Trainer flags of the model imported into {out_dir} (megatron-ext import-hf).\n"
                "# Continue training it (add your data and length flags):\n"
                f"#   python -m megatron_ext.train $(grep -v '^#' {shlex.quote(args_path)}) --data-file-list LIST "
                "--train-iters N --save NEW_RUN_DIR\n"
                "# --finetune loads the weights only; drop it (and --load) once NEW_RUN_DIR has its own checkpoint.\n")
        for pair in pairs:
            f.write(" ".join(shlex.quote(p) for p in pair) + "\n")
    variables, extra = [], []
    for pair in pairs:
        if pair[0] in LAUNCHER_VARIABLES:
            variables.append(f"{LAUNCHER_VARIABLES[pair[0]]}={shlex.quote(pair[1])}")
        elif pair[0] not in LAUNCHER_IMPLIED:
            extra += pair
    with open(os.path.join(staging, ENV_FILE), "w") as f:
        f.write(f"# train_alcf.sh settings of the model imported into {out_dir} (megatron-ext import-hf):\n"
                f"#   source {shlex.quote(os.path.join(out_dir, ENV_FILE))}\n"
                "#   DATA_FILE_LIST=... TRAIN_TOKENS=... bash train_alcf.sh $TRAIN_ALCF_EXTRA_ARGS\n"
                "# LOAD and --finetune start from the imported weights; once the run has saved its own checkpoint,\n"
                "# relaunch without them (LOAD then defaults to the run's SAVE directory).\n")
        for assignment in variables:
            f.write(f"export {assignment}\n")
        f.write(f"export TRAIN_ALCF_EXTRA_ARGS={shlex.quote(' '.join(shlex.quote(x) for x in extra))}\n")
    return {"args_file": args_path, "env_file": os.path.join(out_dir, ENV_FILE)}


def verify(folder: str, args, state: Dict[str, torch.Tensor], say) -> Dict:
    """Logits of the source model (transformers, fp32) against our model on the imported weights."""

    transformers = require("transformers")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    theirs.eval()
    ours = reference_model.build(args, state)
    vocab, seq = int(args.vocab_size_unpadded), min(int(args.seq_length), 64)
    diff, _ = reference_model.compare(ours, theirs, vocab, seq)
    say(f"verify: max |logit difference| {diff:.3g} between {type(theirs).__name__} and our model "
        f"(fp32, 2x{seq} random tokens, tolerance {VERIFY_TOLERANCE:g})")
    if not diff <= VERIFY_TOLERANCE:
        raise HFError(f"verify: our model's logits differ from the source's by {diff:.3g} (> {VERIFY_TOLERANCE:g}); "
                      "nothing written")
    return {"max_abs_logit_difference": diff, "tokens": [2, seq], "tolerance": VERIFY_TOLERANCE}
