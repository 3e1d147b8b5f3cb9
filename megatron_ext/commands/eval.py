"""``megatron-ext eval CHECKPOINT --tasks hellaswag,... [--limit N]``: EleutherAI lm-evaluation-harness
on a checkpoint (exported to a temporary Hugging Face folder) or on a Hugging Face folder, offline,
with local task data; the JSON results go next to the checkpoint. See megatron_ext/hf/lm_eval_bridge.py
and docs/huggingface.md."""

PASS_THROUGH = True  # its own parser: one-line errors
PROG = "megatron-ext eval"


def add_parser(sub):
    sub.add_parser("eval", help="run lm-evaluation-harness tasks on a checkpoint (offline, local task data)",
                   add_help=False)


def _limit(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of examples (or a fraction below 1), got {text!r}") \
            from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return int(value) if value >= 1 and value.is_integer() else value


def build_parser():
    from megatron_ext.argtypes import nonneg_int
    from megatron_ext.hf import command_parser

    p = command_parser(PROG, "Run lm-evaluation-harness tasks on a megatron_ext checkpoint (exported to a temporary "
                             "Hugging Face folder) or a Hugging Face folder. Offline: tasks need local data "
                             "(--task-data, --include-path, --mc-file). Details: docs/huggingface.md.")
    p.add_argument("target", metavar="CHECKPOINT", help="a run directory, a checkpoint folder, or a Hugging Face folder")
    p.add_argument("--tasks", default="", help="comma-separated lm_eval task names (e.g. hellaswag,arc_easy)")
    p.add_argument("--limit", type=_limit, default=None, help="evaluate only the first N examples of each task")
    p.add_argument("--num-fewshot", type=nonneg_int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--batch-size", default="1", help="lm_eval batch size (a number or 'auto')")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype of the export and of the evaluation (default fp32)")
    p.add_argument("--task-data", action="append", default=[], metavar="TASK=FILE",
                   help="run built-in TASK on a local data file (the rows of the split it evaluates); repeatable")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of your own lm_eval task YAMLs; repeatable")
    p.add_argument("--mc-file", action="append", default=[], metavar="FILE.jsonl",
                   help="evaluate an --eval-mc-file set (HellaSwag jsonl) as the trainer scores it; repeatable")
    p.add_argument("--output", default=None, help="results JSON (default: next to the checkpoint)")
    p.add_argument("--export-dir", default=None,
                   help="keep the Hugging Face export here (reused by later evals of the same checkpoint)")
    p.add_argument("--log-samples", action="store_true", help="also write every example's inputs and scores")
    p.add_argument("--logits-cache", action="store_true",
                   help="lm_eval's logits cache (faster one-token continuations; off by default: in lm_eval 0.4.13 it "
                        "mis-scores requests that share context + continuation[:-1] with another split elsewhere)")
    p.add_argument("--tokenizer-model", default=None, help="the training tokenizer's current location, if it moved")
    return p


def run_argv(argv) -> int:
    from megatron_ext.hf import run_command

    ns = build_parser().parse_args(argv)
    ns.tasks = [t.strip() for t in ns.tasks.split(",") if t.strip()]

    def work(say):
        from megatron_ext.hf.lm_eval_bridge import EvalOptions, run_eval

        return run_eval(EvalOptions(**vars(ns)), say)

    return run_command(PROG, work, describe)


def describe(s) -> str:
    lines = []
    for task in s["tasks"]:
        metrics = s["results"].get(task, {})
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        lines.append(f"{task}: {shown}")
    lines.append(f"wrote {s['output']} ({s['seconds']:.0f} s)")
    return "\n".join(lines)
