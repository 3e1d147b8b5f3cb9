"""The record of a model feature (an attention backend, multi-latent attention, MoE/MTP...): every
place a feature reaches, as typed fields. The parser, the run plan, the model, ``export-hf`` and
``convert`` iterate the records (``megatron_ext.models.features``) and never name a feature.

A feature module (``megatron_ext/models/features/<name>.py``) builds one ``Feature``; the list in
``features/__init__.py`` orders them (docs/architecture.md: how to add one).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

# (decoder layer spec, MTP block spec or None): what megatron-core's GPTModel is built from
LayerSpecs = Tuple[Any, Any]


def saved_value(saved, name: str, default=None):
    """A flag of a checkpoint's saved arguments (a dict, or a namespace that may lack it)."""
    value = saved.get(name) if isinstance(saved, dict) else getattr(saved, name, None)
    return default if value is None else value


def _carries_everything(saved) -> Sequence[str]:
    return ()


@dataclasses.dataclass(frozen=True)
class Support:
    """What a tool (``export-hf``, ``convert``) does with a model that uses the feature, as data.
    ``unsupported(saved)`` names the uses of the feature in a checkpoint's saved arguments (a dict
    or a namespace; read them with ``saved_value``) that the tool cannot carry, e.g.
    ``["--attention-backend te"]``; empty: it carries them. ``reason`` completes the one-line
    refusal: ``"<uses>: <reason>"``."""

    unsupported: Callable[[Any], Sequence[str]] = _carries_everything
    reason: str = ""

    def problem(self, saved) -> Optional[str]:
        uses = list(self.unsupported(saved))
        return f"{', '.join(uses)}: {self.reason}" if uses else None


CARRIED = Support()


@dataclasses.dataclass(frozen=True)
class Feature:
    """One model feature. Only ``name``, ``title`` and ``add_arguments`` are required; a hook left
    ``None`` means the feature has nothing to say there. Hooks read the parsed flags (``args``)."""

    name: str
    title: str  # the --help group of its flags
    add_arguments: Callable[[Any], None]  # adds its flags to an argparse group
    # The run plan, once the model shape (ffn size, kv heads...) is final: fill the feature's
    # defaults into args and reject what cannot work (ValueError, one line naming the flag).
    validate: Optional[Callable[[Any], None]] = None
    # The run plan, after every feature validated: derived fields it stores in args (name -> value).
    plan_fields: Optional[Callable[[Any], Dict[str, Any]]] = None
    # The model: megatron-core TransformerConfig fields, and a config class of its own (None: not needed).
    config_kwargs: Optional[Callable[[Any], Dict[str, Any]]] = None
    config_class: Optional[Callable[[Any], Optional[type]]] = None
    # The model's layer specs: keyword arguments for megatron-core's spec functions
    # (``models.specs.base_layer_specs``), then a rewrite of the specs built, in feature order.
    spec_options: Optional[Callable[[Any], Dict[str, Any]]] = None
    layer_specs: Optional[Callable[[LayerSpecs, Any, Any], LayerSpecs]] = None
    # The start-up table: one line ('' when the feature is off) in the row labelled ``row``
    # (features sharing a label share a row, their lines joined by '; ').
    summary: Optional[Callable[[Any], str]] = None
    row: str = ""
    # What the tools carry of a model that uses it.
    export_hf: Support = CARRIED  # megatron-ext export-hf (a Hugging Face folder)
    convert: Support = CARRIED  # megatron-ext convert, ours -> Megatron-DeepSpeed
