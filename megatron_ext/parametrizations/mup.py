"""``mup``: maximal update parametrization (Tensor Programs V, arXiv 2203.03466), so that the
hyperparameters tuned at ``--mup-base-hidden`` hold at any width. With m_N = hidden / base hidden:

* hidden matrices: init std x m_N^-1/2; LR x m_N^e where e is what the optimizer's update needs
  (``width_lr_exponents`` of the optimizer plug-in: -1 for Adam-like element-wise optimizers, 0
  for Muon with Keller's spectral scaling, which is already width-independent, -1/2 for Muon's
  Moonlight scaling, whose update grows like sqrt(width)); weight decay x m_N^-e so lr x wd, the
  decay per step, does not change with width;
* embeddings, norms, biases, output layer: init and LR unchanged (Adam-like optimizers);
* output logits x 1/m_N; attention scores sqrt(d_head_base)/d_head (1/d_head, equal to SP at the
  base width).

At the base width every rule is 1, so ``mup`` trains exactly like ``sp`` there.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

from megatron_ext.argtypes import positive_float, positive_int
from megatron_ext.parametrizations import PARAMETRIZATIONS
from megatron_ext.parametrizations.common.base import EnableParametrization, Parametrization
from megatron_ext.registry import Arg
from megatron_ext.optimizers import OPTIMIZERS

MUP_ARGS = (
    Arg("--mup-base-hidden", "--mup-base-width", dest="mup_base_hidden", type=positive_int, default=None,
        help="hidden size the hyperparameters were tuned at (default: --hidden-size, m_N = 1); launcher: MUP_BASE_WIDTH"),
    Arg("--enable-mup", dest="parametrization", action=EnableParametrization, const="mup", nargs=0, default=None,
        help="Megatron-DeepSpeed spelling of --parametrization mup"),
    Arg("--mup-input-weights-scale", type=positive_float, default=None, help="extra factor on the embedding init std"),
    Arg("--mup-hidden-weights-scale", type=positive_float, default=None, help="extra factor on the hidden init std"),
    Arg("--mup-output-weights-scale", type=positive_float, default=None,
        help="extra factor on the output layer init std"),
    Arg("--mup-input-lr-scale", type=positive_float, default=None, help="extra LR factor of the embeddings"),
    Arg("--mup-hidden-lr-scale", type=positive_float, default=None, help="extra LR factor of the hidden matrices"),
    Arg("--mup-output-lr-scale", type=positive_float, default=None, help="extra LR factor of the output layer"),
    Arg("--mup-output-multiplier", type=positive_float, default=None,
        help="constant on the output logits besides 1/m_N (muP's alpha_output, default 1)"),
)

# role -> the --mup-*-lr-scale that applies to it
_LR_SCALE_OF_ROLE = {"embedding": "mup_input_lr_scale", "hidden": "mup_hidden_lr_scale",
                     "output": "mup_output_lr_scale"}


def _flag(args, name) -> float:
    value = getattr(args, name, None)
    return 1.0 if value is None else value


def width_lr_exponents(args) -> Dict[str, float]:
    """Role -> exponent of m_N in the LR under muP, declared by the optimizer plug-in
    (its record's ``width_lr_exponents``); element-wise adaptive optimizers (Adam's rules) by default."""

    exponents = {"hidden": -1.0}
    declared = OPTIMIZERS.get(args.optimizer).width_lr_exponents
    if declared is not None:
        exponents.update(declared(args))
    return exponents


@PARAMETRIZATIONS.register("mup", arguments=MUP_ARGS,
                           description="muP: width transfer from --mup-base-hidden, for any optimizer")
class MaximalUpdateParametrization(Parametrization):
    name = "mup"

    def __init__(self, args):
        super().__init__(args)
        self.exponents = width_lr_exponents(args)

    @property
    def width_mult(self) -> float:
        base = self.args.mup_base_hidden or self.args.hidden_size
        return self.args.hidden_size / base

    def hidden_init_scale(self) -> float:
        return self.width_mult ** -0.5 * _flag(self.args, "mup_hidden_weights_scale")

    def init_stds(self) -> Dict[str, float]:
        stds = super().init_stds()
        stds["embedding"] *= _flag(self.args, "mup_input_weights_scale")
        if self.args.untie_embeddings_and_output_weights:
            stds["output_layer"] *= _flag(self.args, "mup_output_weights_scale")
        else:
            stds["output_layer"] = stds["embedding"]
        return stds

    def width_lr_mult(self, role: str) -> float:
        return self.width_mult ** self.exponents.get(role, 0.0)

    def group_options(self, role: str) -> Dict[str, float]:
        width = self.width_lr_mult(role)
        lr = width * _flag(self.args, _LR_SCALE_OF_ROLE[role]) if role in _LR_SCALE_OF_ROLE else width
        return {"lr_mult": lr, "wd_mult": 1.0 / width, "eps_mult": 1.0}

    def logit_multiplier(self) -> float:
        return _flag(self.args, "mup_output_multiplier") / self.width_mult

    def softmax_scale(self) -> Optional[float]:
        a = self.args
        base_head_dim = (a.mup_base_hidden or a.hidden_size) / a.num_attention_heads
        head_dim = a.hidden_size / a.num_attention_heads
        return math.sqrt(base_head_dim) / head_dim

    @classmethod
    def validate_args(cls, args) -> None:
        super().validate_args(args)
        base = args.mup_base_hidden
        if base is not None and base > args.hidden_size:
            raise ValueError(f"--mup-base-hidden {base} is larger than --hidden-size {args.hidden_size}: "
                             "tune at a base width no larger than the model's")
