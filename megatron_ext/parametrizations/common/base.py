"""Base class of parametrization plug-ins, and the initialisation every parametrization shares.

A parametrization decides, for any optimizer:
* the init std of each parameter family (:meth:`init_stds`), applied through megatron-core's
  ``TransformerConfig`` init callables and, for the output layer (which megatron-core initialises
  with the hidden init), by re-initialising it after the model is built;
* per-role param-group multipliers ``lr_mult``/``wd_mult``/``eps_mult`` (:meth:`group_options`);
* forward multipliers: output logits (:meth:`logit_multiplier`), each residual branch
  (:meth:`residual_multiplier`) and the attention scale (:meth:`softmax_scale`), installed as
  forward hooks on the built model (:meth:`attach`).

Families: ``embedding`` (word/position embeddings), ``hidden`` (QKV and MLP input matrices),
``output_projection`` (attention output and MLP down matrices, the residual-branch outputs) and
``output_layer`` (the unembedding; the embedding itself when they are tied).
"""
from __future__ import annotations

import argparse
import math
from typing import Dict, Optional

import torch

from megatron_ext.argtypes import nonneg_float
from megatron_ext.parametrizations.common.apply import attach_multipliers, init_output_layer

SMALL_INIT = "auto"  # --init-method-std auto: sqrt(2 / (5 d)) (Nguyen & Salazar 2019)
FAMILIES = ("embedding", "hidden", "output_projection", "output_layer")


def small_init_std(hidden_size: int) -> float:
    return math.sqrt(2.0 / (5.0 * hidden_size))


def init_std(text: str):
    """--init-method-std: a non-negative number or ``auto``."""
    if text.strip().lower() == SMALL_INIT:
        return SMALL_INIT
    try:
        return nonneg_float(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (or 'auto')") from None


# The richer parametrization wins whatever the order: --enable-mup --enable-depth-scale is CompleteP.
_RANK = {"sp": 0, "mup": 1, "completep": 2}


class EnableParametrization(argparse.Action):
    """Megatron-DeepSpeed's ``--enable-mup`` / ``--enable-depth-scale``: aliases of --parametrization."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        if current is None or _RANK.get(self.const, 0) > _RANK.get(current, 0):
            setattr(namespace, self.dest, self.const)


class Parametrization:
    name = "sp"

    def __init__(self, args):
        self.args = args

    # -- shape ratios (1 unless a parametrization has base shapes) -------------------------------
    @property
    def width_mult(self) -> float:
        """m_N = width / base width."""
        return 1.0

    @property
    def depth_mult(self) -> float:
        """m_L = depth / base depth."""
        return 1.0

    # -- initialisation ---------------------------------------------------------------------------
    def base_std(self) -> float:
        """The std --init-method-std asks for, at the base width."""
        a = self.args
        if a.init_method_std == SMALL_INIT:
            return small_init_std(round(a.hidden_size / self.width_mult))
        return float(a.init_method_std)

    def hidden_init_scale(self) -> float:
        """Factor on the hidden matrices' std (muP: m_N^-1/2)."""
        return 1.0

    def scales_output_projection_by_depth(self) -> bool:
        return self.args.scaled_output_projection_init

    def init_stds(self) -> Dict[str, float]:
        a = self.args
        hidden = self.base_std() * self.hidden_init_scale()
        projection = hidden / math.sqrt(2.0 * a.num_layers) if self.scales_output_projection_by_depth() else hidden
        embedding = a.word_embedding_init_std if a.adjust_word_embedding_init else self.base_std()
        output = a.output_layer_init_std if a.output_layer_init_std is not None else self.base_std()
        if not a.untie_embeddings_and_output_weights:
            output = embedding  # one tensor
        return dict(embedding=embedding, hidden=hidden, output_projection=projection, output_layer=output)

    def configure_model(self, config_kwargs: Dict) -> Dict:
        """Adjust the keyword arguments of megatron-core's TransformerConfig; return them."""
        from megatron.core.utils import init_method_normal

        stds = self.init_stds()
        config_kwargs.update(
            init_method_std=stds["hidden"],
            init_method=init_method_normal(stds["hidden"]),
            output_layer_init_method=init_method_normal(stds["output_projection"]),  # megatron's name for it
            embedding_init_method_std=stds["embedding"],
            embedding_init_method=init_method_normal(stds["embedding"]),
        )
        scale = self.softmax_scale()
        if scale is not None:
            config_kwargs["softmax_scale"] = scale
        return config_kwargs

    # -- param groups -----------------------------------------------------------------------------
    def group_options(self, role: str) -> Dict[str, float]:
        """Per-role param-group options: ``lr_mult``, ``wd_mult``, ``eps_mult``."""
        return {}

    # -- forward multipliers ----------------------------------------------------------------------
    def logit_multiplier(self) -> float:
        return 1.0

    def residual_multiplier(self) -> float:
        return 1.0

    def softmax_scale(self) -> Optional[float]:
        """Attention-score scale; None keeps megatron-core's 1/sqrt(d_head)."""
        return None

    def attach(self, model: torch.nn.Module) -> None:
        """Finish the built model: the output layer's own init and the forward multipliers."""

        if self.args.untie_embeddings_and_output_weights and model.post_process:  # the last pipeline stage's
            stds = self.init_stds()
            if not math.isclose(stds["output_layer"], stds["hidden"], rel_tol=1e-12):
                init_output_layer(model, stds["output_layer"])
        attach_multipliers(model, self.logit_multiplier(), self.residual_multiplier())

    def summary(self) -> str:
        """One line for the start-up table."""
        stds = self.init_stds()
        parts = [self.name] + [f"{k} std {v:.4g}" for k, v in stds.items()]
        if self.logit_multiplier() != 1.0:
            parts.append(f"logits x{self.logit_multiplier():.4g}")
        if self.residual_multiplier() != 1.0:
            parts.append(f"residual branches x{self.residual_multiplier():.4g}")
        return ", ".join(parts)

    @classmethod
    def validate_args(cls, args) -> None:
        """Raise ValueError (one line naming the flag) for settings this plug-in cannot serve (flags
        of other parametrizations are refused by the registry, ``Registry.check``)."""
