"""Initialisation / parametrization plug-ins (``--parametrization``). A plug-in is a
``Parametrization`` subclass: it may change the megatron-core ``TransformerConfig`` (init scales,
multipliers) and the per-role param-group options (lr/wd multipliers) for any optimizer."""
from megatron_ext.registry import Registry

PARAMETRIZATIONS = Registry("parametrization", "init and parametrizations (--parametrization)", package=__name__)
