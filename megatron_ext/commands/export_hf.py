"""``megatron-ext export-hf CHECKPOINT OUT_DIR``: a checkpoint (any ZeRO stage, DP/TP size,
precision, or universal; a run directory means its latest checkpoint) as a Hugging Face
``transformers`` folder. See megatron_ext/hf/export.py and docs/huggingface.md."""

PASS_THROUGH = True  # its own parser: one-line errors
PROG = "megatron-ext export-hf"


def add_parser(sub):
    sub.add_parser("export-hf", help="export a checkpoint as a Hugging Face model folder (safetensors, config, "
                                     "tokenizer)", add_help=False)


def build_parser():
    from megatron_ext.hf import command_parser

    p = command_parser(PROG, "Export a megatron_ext checkpoint as a Hugging Face transformers folder "
                             "(LlamaForCausalLM, MixtralForCausalLM or GPT2LMHeadModel). Details: docs/huggingface.md.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a run directory (its 'latest' checkpoint) or a checkpoint folder (global_stepN, *_universal)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (must not exist, or be empty)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype of the saved weights (default: the checkpoint's fp32 master weights in fp32)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is not empty")
    p.add_argument("--verify", action="store_true",
                   help="load the result with transformers and compare its logits with our model (fp32), run generate")
    g = p.add_argument_group("tokenizer (default: the one the run trained with, from its saved flags)")
    g.add_argument("--tokenizer-type", default=None, help="override the saved --tokenizer-type")
    g.add_argument("--tokenizer-model", default=None, help="the tokenizer's current location, if it moved")
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    return p


def run_argv(argv) -> int:
    from megatron_ext.hf import run_command

    ns = build_parser().parse_args(argv)

    def work(say):
        from megatron_ext.hf.export import ExportOptions, export

        return export(ExportOptions(**vars(ns)), say)

    return run_command(PROG, work, describe)


def describe(s) -> str:
    tok = s["tokenizer"]
    lines = [f"exported {s['source']} (iteration {s['iteration']}): {s['parameters']:,} parameters, "
             f"{s['weights_read']}",
             f"wrote {s['output']}: {s['architecture']} ({s['dtype']}), {', '.join(s['files'])}",
             "tokenizer: " + ("none" if tok is None else
                              f"{tok['type']} from {tok['source']} ({tok['texts_checked_same_ids']} sample texts "
                              "give training's ids)")]
    lines += [f"note: {n}" for n in s["notes"]]
    if "verify" in s:
        v = s["verify"]
        lines.append(f"verified: max |logit difference| {v['max_abs_logit_difference']:.3g} (tolerance "
                     f"{v['tolerance']:g}); generate ran")
    lines.append(f"load it with: transformers.AutoModelForCausalLM.from_pretrained({s['output']!r})")
    return "\n".join(lines)
