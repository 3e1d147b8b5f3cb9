"""The model features, one module each, in the order every consumer applies them; and the loops
the consumers call (the parser, the run plan, the model, ``export-hf``, ``convert``). Nothing
outside this package names a feature's hooks. The record type: ``megatron_ext.models.feature``.

The order is part of the behaviour:

* the attention backend's layer-spec rewrite runs before multi-latent attention's: with sdpa every
  core attention is already ``SDPACoreAttention``, so MLA's local core attention only replaces
  what ``--attention-backend local`` left in place;
* validation runs in this order once the model shape is final (MoE's needs the final ffn size),
  and every validation before any ``plan_fields`` (the backend's resolution);
* start-up rows are joined in this order where features share a row label.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from megatron_ext.models.feature import Feature, LayerSpecs
from megatron_ext.models.features import attention_backend, mla, moe_mtp
from megatron_ext.models.specs import base_layer_specs

FEATURES: List[Feature] = [attention_backend.FEATURE, mla.FEATURE, moe_mtp.FEATURE]


def register(feature: Feature) -> None:
    """Add a feature after the built-in ones (a plug-in's, or a test's)."""
    if any(f.name == feature.name for f in FEATURES):
        raise ValueError(f"model feature '{feature.name}' is already registered")
    FEATURES.append(feature)


# -- the parser -----------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    """Each feature's flags, in a --help group of its own."""
    for f in FEATURES:
        f.add_arguments(parser.add_argument_group(f.title))


# -- the run plan ---------------------------------------------------------------------------------
def validate(args) -> None:
    """Every feature's defaults and checks (ValueError, one line), then the fields they derive."""
    for f in FEATURES:
        if f.validate is not None:
            f.validate(args)
    for f in FEATURES:
        if f.plan_fields is not None:
            for key, value in f.plan_fields(args).items():
                setattr(args, key, value)


def summary_rows(args) -> Dict[str, str]:
    """Start-up rows ``{label: line}`` of the features in use (lines sharing a label joined)."""
    lines: Dict[str, List[str]] = {}
    for f in FEATURES:
        line = f.summary(args) if f.summary is not None else ""
        if line:
            lines.setdefault(f.row or f.name, []).append(line)
    return {label: "; ".join(parts) for label, parts in lines.items()}


# -- the model ------------------------------------------------------------------------------------
def config_kwargs(args) -> Dict[str, Any]:
    kwargs: Dict[str, Any] = {}
    for f in FEATURES:
        if f.config_kwargs is not None:
            kwargs.update(f.config_kwargs(args))
    return kwargs


def config_class(args) -> type:
    """The first config class a feature asks for, else megatron-core's ``TransformerConfig``."""
    for f in FEATURES:
        cls = f.config_class(args) if f.config_class is not None else None
        if cls is not None:
            return cls
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig


def layer_specs(config, args) -> LayerSpecs:
    """``(decoder spec, MTP block spec or None)``: megatron-core's specs for ``config`` with the
    features' spec options, then each feature's rewrite."""

    options: Dict[str, Any] = {}
    for f in FEATURES:
        if f.spec_options is not None:
            options.update(f.spec_options(args))
    specs: Tuple[Any, Any] = base_layer_specs(config, args.normalization, **options)
    for f in FEATURES:
        if f.layer_specs is not None:
            specs = f.layer_specs(specs, config, args)
    return specs


# -- the tools ------------------------------------------------------------------------------------
def refusal(tool: str, saved) -> Optional[str]:
    """Why ``tool`` (``export_hf`` or ``convert``) cannot carry the model whose saved arguments are
    ``saved`` (a dict or a namespace): the first feature's one line, or None."""
    for f in FEATURES:
        problem = getattr(f, tool).problem(saved)
        if problem:
            return problem
    return None
