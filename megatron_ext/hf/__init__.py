"""Hugging Face interoperability (docs/huggingface.md): ``export-hf`` (our checkpoints -> a
``transformers`` folder), ``import-hf`` (Llama-family / Mixtral -> a checkpoint the trainer
loads with ``--finetune``), hub names through the local cache, and ``eval`` with
lm-evaluation-harness.

Modules:

* ``checkpoint_reader``: whole fp32 weights and the saved flags of any checkpoint the trainer
  writes (the only module that knows our checkpoint layouts); ``checkpoint_writer``: the
  trainer's native layout for an imported model.
* ``tensor_parallel``: merging / splitting tensor-parallel shards of megatron-core GPT tensors.
* ``config_mapping``: our model flags <-> a ``transformers`` config, and the one-line refusals of
  what one side cannot represent; ``weight_mapping``: the tensors both ways (fused QKV and SwiGLU,
  experts, parametrization multipliers folded in).
* ``tokenizer_export``: the training tokenizer as Hugging Face tokenizer files with the same ids.
* ``export`` / ``importer``: the two conversions; ``reference_model``: our model in one process
  (for ``--verify`` logit comparisons); ``lm_eval_bridge``: ``megatron-ext eval``.
Hub names resolve through the local cache only (``megatron_ext/data/hub.py``, shared with the
tokenizers).

``transformers``, ``safetensors`` and ``lm-eval`` are optional (extras ``[hf]`` and ``[eval]``):
nothing here imports them at module import time.
"""
from megatron_ext.optional import MissingExtra, require  # noqa: F401 (the hf modules take require from here)
from megatron_ext.argtypes import one_line_errors
from megatron_ext.data.hub import HubError


class HFError(ValueError):
    """Bad input for a Hugging Face conversion; the message is one line naming the culprit."""


def command_parser(prog: str, description: str):
    """argparse with one-line errors and exit code 2 (no usage dump)."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    return one_line_errors(parser)


def run_command(prog: str, work, describe) -> int:
    """Run ``work(say)`` (progress lines to stderr) and print ``describe(its summary)``; bad input
    (HFError, a missing file) is one ``error:`` line and exit 2."""
    import os
    import sys
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its advice lines are not ours to print
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    try:
        summary = work(lambda line: print(line, file=sys.stderr, flush=True))
    except (HFError, HubError, MissingExtra, OSError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    print(describe(summary))
    return 0
