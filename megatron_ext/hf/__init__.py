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
* ``hub``: a hub name or a local folder, resolved through the local cache only.

``transformers``, ``safetensors`` and ``lm-eval`` are optional (extras ``[hf]`` and ``[eval]``):
nothing here imports them at module import time.
"""


class HFError(ValueError):
    """Bad input for a Hugging Face conversion; the message is one line naming the culprit."""


def require(module: str, extra: str = "hf"):
    """Import an optional dependency, or fail in one line naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise HFError(f"this needs the Python package '{module.split('.')[0]}': "
                      f"pip install 'megatron_ext[{extra}]'") from None


def command_parser(prog: str, description: str):
    """argparse with one-line errors and exit code 2 (no usage dump)."""
    import argparse

    from megatron_ext.argtypes import one_line_errors

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
    except (HFError, OSError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    print(describe(summary))
    return 0
