"""``sp``: standard parametrization. Megatron's init: N(0, --init-method-std) for weights (``auto``:
sqrt(2/(5 d))), std/sqrt(2 x layers) for each block's output projections
(``--no-scaled-output-projection-init`` turns that off), the embedding and output layer at their own
std when asked; every param group at multiplier 1, no forward multipliers."""
from megatron_ext.parametrizations import PARAMETRIZATIONS
from megatron_ext.parametrizations.common.base import Parametrization


@PARAMETRIZATIONS.register("sp", description="standard parametrization with Megatron's scaled init")
class StandardParametrization(Parametrization):
    name = "sp"
