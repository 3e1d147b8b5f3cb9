"""``megatron-ext import-hf HF_DIR_OR_NAME OUT_DIR``: a Llama-family (Llama, Mistral) or Mixtral
model from a local folder or the local Hugging Face cache as a checkpoint the trainer continues
with ``--finetune``, with its flags written out. See megatron_ext/hf/importer.py and docs/huggingface.md."""

PASS_THROUGH = True  # its own parser: one-line errors
PROG = "megatron-ext import-hf"


def add_parser(sub):
    sub.add_parser("import-hf", help="import a Hugging Face Llama/Mistral/Mixtral model as a checkpoint to "
                                     "continue training (--finetune)", add_help=False)


def build_parser():
    from megatron_ext.argtypes import positive_int
    from megatron_ext.hf import command_parser

    p = command_parser(PROG, "Import a Hugging Face LlamaForCausalLM, MistralForCausalLM or MixtralForCausalLM as a "
                             "megatron_ext checkpoint (load with --load OUT_DIR --finetune). Never downloads: a hub "
                             "name is looked up in the local Hugging Face cache. Details: docs/huggingface.md.")
    p.add_argument("source", metavar="HF_DIR_OR_NAME", help="a model folder, or a hub name (org/name) in the local cache")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (must not exist, or be empty)")
    p.add_argument("--tensor-model-parallel-size", "--tp", dest="tensor_model_parallel_size", type=positive_int,
                   default=1, help="tensor-parallel size the training run will use (default 1)")
    p.add_argument("--seq-length", type=positive_int, default=None,
                   help="training sequence length written to the flags (default: the model's context, at most 4096)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="store the weights in this dtype (default: as the source stores them)")
    p.add_argument("--tokenizer", default=None, metavar="DIR_OR_NAME",
                   help="take the tokenizer from here (default: the model folder)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is not empty")
    p.add_argument("--verify", action="store_true",
                   help="compare our model's logits on the imported weights with the source model's (fp32)")
    return p


def run_argv(argv) -> int:
    from megatron_ext.hf import run_command

    ns = build_parser().parse_args(argv)

    def work(say):
        from megatron_ext.hf.importer import ImportOptions, import_hf

        return import_hf(ImportOptions(**vars(ns)), say)

    return run_command(PROG, work, describe)


def describe(s) -> str:
    lines = [f"imported {s['architecture']} from {s['folder']}: {s['parameters']:,} parameters "
             f"({', '.join(s['dtype'])}), vocabulary {s['vocab_size']}",
             f"wrote {s['output']}: a checkpoint at tensor-parallel size {s['tensor_model_parallel_size']} "
             f"(iteration 0), tokenizer/, {s['launch']['args_file']}, {s['launch']['env_file']}"]
    lines += [f"note: {n}" for n in s["notes"]]
    if "verify" in s:
        lines.append(f"verified: max |logit difference| {s['verify']['max_abs_logit_difference']:.3g} "
                     f"(tolerance {s['verify']['tolerance']:g})")
    lines.append(f"continue training: python -m megatron_ext.train $(grep -v '^#' {s['launch']['args_file']}) "
                 "--data-file-list LIST --train-iters N --save NEW_RUN_DIR")
    lines.append(f"   or: source {s['launch']['env_file']} && DATA_FILE_LIST=LIST bash train_alcf.sh "
                 "$TRAIN_ALCF_EXTRA_ARGS")
    return "\n".join(lines)
