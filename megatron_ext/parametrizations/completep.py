"""``completep``: CompleteP (arXiv 2505.01618), muP's width rules plus depth transfer from
``--depth-base``. With m_L = layers / depth base and alpha = ``--depth-alpha`` (1: CompleteP,
0.5: depth-muP):

* every residual branch: x + m_L^-alpha F(LN x);
* hidden matrices: LR x (muP width rule) x m_L^(alpha-1); weight decay x m_N^-e (muP's);
* norm weights and biases inside the blocks: LR x m_L^(alpha-1);
* Adam epsilon of the residual-block groups (hidden, norms, biases) x m_N^-1 m_L^-alpha;
* embeddings, final norm and output layer: init and LR unchanged; output logits x 1/m_N;
* the 1/sqrt(2L) output-projection init scaling is dropped (the branch multiplier does its job).

At the base width and depth every rule is 1 except that dropped init scaling.
"""
from __future__ import annotations

from typing import Dict

from megatron_ext.argtypes import positive_float, positive_int
from megatron_ext.parametrizations import PARAMETRIZATIONS
from megatron_ext.parametrizations.common.base import EnableParametrization
from megatron_ext.parametrizations.mup import MaximalUpdateParametrization
from megatron_ext.registry import Arg

COMPLETEP_ARGS = (
    Arg("--depth-base", type=positive_int, default=None,
        help="number of layers the hyperparameters were tuned at (default: --num-layers); launcher: DEPTH_BASE"),
    Arg("--depth-alpha", type=float, default=None, help="residual-branch exponent alpha in [0, 1] "
                                                         "(default 1 = CompleteP; 0.5 = depth-muP)"),
    Arg("--depth-multiplier", type=positive_float, default=None,
        help="m_L given directly instead of --num-layers / --depth-base"),
    Arg("--enable-depth-scale", dest="parametrization", action=EnableParametrization, const="completep", nargs=0,
        default=None, help="Megatron-DeepSpeed spelling of --parametrization completep"),
)

RESIDUAL_BLOCK_ROLES = ("hidden", "norm", "bias")


@PARAMETRIZATIONS.register("completep", arguments=COMPLETEP_ARGS, reads_flags_of=("mup",),
                           description="CompleteP: muP width rules plus depth transfer from --depth-base "
                                       "(residual branches x m_L^-alpha)")
class CompleteP(MaximalUpdateParametrization):
    name = "completep"

    @property
    def alpha(self) -> float:
        return 1.0 if self.args.depth_alpha is None else self.args.depth_alpha

    @property
    def depth_mult(self) -> float:
        a = self.args
        if a.depth_multiplier is not None:
            return a.depth_multiplier
        return a.num_layers / (a.depth_base or a.num_layers)

    def scales_output_projection_by_depth(self) -> bool:
        return False

    def group_options(self, role: str) -> Dict[str, float]:
        options = super().group_options(role)
        if role in RESIDUAL_BLOCK_ROLES:
            options["lr_mult"] *= self.depth_mult ** (self.alpha - 1.0)
            options["eps_mult"] = self.width_mult ** -1.0 * self.depth_mult ** -self.alpha
        return options

    def residual_multiplier(self) -> float:
        return self.depth_mult ** -self.alpha

    @classmethod
    def validate_args(cls, args) -> None:
        super().validate_args(args)
        if args.depth_alpha is not None and not 0.0 <= args.depth_alpha <= 1.0:
            raise ValueError(f"--depth-alpha must be in [0, 1] (1 = CompleteP, 0.5 = depth-muP), got {args.depth_alpha:g}")
        if args.depth_base is not None and args.depth_base > args.num_layers:
            raise ValueError(f"--depth-base {args.depth_base} is larger than --num-layers {args.num_layers}: "
                             "tune at a base depth no larger than the model's")
        if args.depth_base is not None and args.depth_multiplier is not None:
            raise ValueError("--depth-multiplier and --depth-base both set m_L: give one")
