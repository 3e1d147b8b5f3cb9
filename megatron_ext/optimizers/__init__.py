"""Optimizer plug-ins (``--optimizer``). One file per optimizer; each registers a builder
``build(param_groups, args) -> torch.optim.Optimizer`` with ``OPTIMIZERS.register``. Param groups
come from ``param_groups.build_param_groups`` and carry ``lr_mult``/``wd_mult`` that the LR
scheduler applies and ``eps_mult`` applied here, so schedules and parametrizations work with every
optimizer. A builder may declare ``width_lr_exponents(args) -> {role: e}``: under muP a role's LR
scales as m_N^e (default: Adam's rules, hidden -1)."""
from megatron_ext.registry import Registry

OPTIMIZERS = Registry("optimizer", "optimizers (--optimizer)", package=__name__)


def build_optimizer(model, args, parametrization=None):
    """The ``--optimizer`` of ``args`` over ``model``'s param groups, with the parametrization's
    per-role multipliers (``eps_mult`` scales each group's epsilon once, here)."""
    from megatron_ext.optimizers.param_groups import build_param_groups
    from megatron_ext.parametrizations import parametrization_for

    parametrization = parametrization or parametrization_for(args)
    optimizer = OPTIMIZERS.get(args.optimizer).obj(build_param_groups(model, parametrization.group_options), args)
    for group in optimizer.param_groups:
        if "eps" in group and group.get("eps_mult", 1.0) != 1.0:
            group["eps"] = group["eps"] * group["eps_mult"]
    return optimizer
