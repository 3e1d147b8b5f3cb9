"""Initialisation / parametrization plug-ins (``--parametrization``). A plug-in is a
``Parametrization`` subclass (``common/base.py``): it sets the init std of each parameter family, the
per-role param-group multipliers (lr / weight decay / epsilon) for any optimizer, and forward
multipliers (output logits, residual branches, attention scale). Its record's ``validate`` is the
class's ``validate_args``."""
from megatron_ext.derivations import parametrization_name
from megatron_ext.registry import Registry

PARAMETRIZATIONS = Registry("parametrization", "init and parametrizations (--parametrization)", package=__name__,
                            flag="--parametrization", class_validator="validate_args")


def parametrization_for(args):
    """The parametrization object ``args`` select."""
    return PARAMETRIZATIONS.get(parametrization_name(args)).obj(args)
