"""LLaMA-MoE's flag names (its training scripts: Hugging Face ``TrainingArguments`` plus its own MoE
options), accepted where they mean the same as one of our flags and refused in one line where
nothing here does the same. The table is the documentation (docs/deepseek_v3.md lists it).

Spellings follow the rest of the parser: ``--num_selects`` and ``--num-selects`` are the same flag.
"""
from __future__ import annotations

import argparse

# LLaMA-MoE name -> (our flag, what to know). Each is an alias: the same destination and value type.
ALIASES = {
    "--num-selects": ("--moe-router-topk", "experts chosen per token"),
    "--moe-calculator-score-scale-factor": (
        "--moe-router-topk-scaling-factor",
        "LLaMA-MoE multiplies the experts' combined output by it, megatron-core each chosen expert's weight: the "
        "same, the output being linear in the weights (with softmax scores the top-k weights sum to 1 first, "
        "as in LLaMA-MoE's gate)"),
    "--gate-balance-loss-weight": (
        "--moe-aux-loss-coeff",
        "the weight of the load-balancing loss. megatron-core's loss is the Switch Transformer one (LLaMA-MoE's "
        "SwitchBalancedGate); LLaMA-MoE's default TopKBalancedNoisyGate uses the squared coefficient of "
        "variation of importance and load instead, so a weight tuned there does not carry over exactly"),
    "--learning-rate": ("--lr", "peak learning rate"),
    "--warmup-steps": ("--lr-warmup-iters", "warmup in optimizer steps"),
    "--max-steps": ("--train-iters", "training length in optimizer steps"),
    "--per-device-train-batch-size": ("--micro-batch-size", "sequences per rank per micro-batch"),
    "--block-size": ("--seq-length", "tokens per sequence"),
    "--max-grad-norm": ("--clip-grad", "gradient-norm clipping"),
    "--logging-steps": ("--log-interval", "iterations between log lines"),
    "--eval-steps": ("--eval-interval", "iterations between evaluations"),
    "--save-steps": ("--save-interval", "iterations between checkpoints"),
    "--save-total-limit": ("--keep-last", "checkpoints kept"),
    "--output-dir": ("--save", "where checkpoints (and metrics.jsonl, TensorBoard) go"),
    "--dataloader-num-workers": ("--num-workers", "data loader workers"),
}
# Same name in both: --gradient-accumulation-steps, --seed, --weight-decay, --adam-beta1, --adam-beta2, --bf16.

# LLaMA-MoE name -> (values that are what this trainer does anyway, why the others have no equivalent)
REFUSED = {
    "--gate-type": ((), "LLaMA-MoE's gates (TopKBalancedNoisyGate: noisy top-k with a coefficient-of-variation "
                        "balance loss; SwitchBalancedGate) have no equivalent: megatron-core's router is a linear "
                        "top-k gate without noise (--moe-router-score-function softmax|sigmoid) with the Switch "
                        "aux loss (--moe-aux-loss-coeff)"),
    "--calculator-type": (("UniversalCalculator",),
                          "SwitchDropTokenCalculator drops tokens over an expert capacity, which this trainer does "
                          "not do; UniversalCalculator (every token to its top-k experts, weighted sum) is what runs"),
    "--dynamic-data-selection": (("none",), "dynamic data sampling (sheared_llama) has no equivalent: the mixture is "
                                            "fixed by the weights of --data-path / --data-file-list"),
    "--prob-map": ((), "a data-sampling map has no equivalent: give the mixture as weights in --data-path or "
                       "--data-file-list"),
    "--final-lr-portion": ((), "no equivalent flag: give the final LR itself, --min-lr = --lr x portion"),
    "--num-train-epochs": ((), "no epochs here: give the length as --train-iters, --train-samples or --train-tokens"),
    "--model-name-or-path": ((), "initialising from a Hugging Face checkpoint has no equivalent: --load a DeepSpeed "
                                 "checkpoint of this trainer (or train from scratch)"),
}


class _Refused(argparse.Action):
    """A LLaMA-MoE flag with no equivalent: one line saying what to use (values that are what runs
    anyway are accepted)."""

    def __init__(self, option_strings, dest, accepted=(), reason="", **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs=None, **kwargs)
        self.accepted, self.reason = accepted, reason

    def __call__(self, parser, namespace, values, option_string=None):
        if values not in self.accepted:
            raise argparse.ArgumentError(self, f"{values!r} (LLaMA-MoE): {self.reason}")


def add_llama_moe_names(parser: argparse.ArgumentParser) -> None:
    """Register the aliases on the flags they stand for, and the refusals (after every flag exists)."""
    actions = parser._option_string_actions
    for alias, (flag, _) in ALIASES.items():
        # the parser recognises the alias; messages and --help keep naming our flag
        actions[alias] = actions[flag]
    group = parser.add_argument_group("LLaMA-MoE flags without an equivalent (refused, docs/deepseek_v3.md)")
    for flag, (accepted, reason) in REFUSED.items():
        group.add_argument(flag, action=_Refused, accepted=accepted, reason=reason, help=argparse.SUPPRESS)
