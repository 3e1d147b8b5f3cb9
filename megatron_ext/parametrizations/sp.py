"""``sp``: standard parametrization, Megatron's init: N(0, --init-method-std) for weights and
std/sqrt(2 x layers) for the output projection of each block; every group at multiplier 1."""
from megatron_ext.parametrizations import PARAMETRIZATIONS
from megatron_ext.parametrizations.base import Parametrization


@PARAMETRIZATIONS.register("sp", description="standard parametrization with Megatron's scaled init")
class StandardParametrization(Parametrization):
    pass
