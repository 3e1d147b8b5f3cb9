"""megatron_ext: a Megatron-DeepSpeed compatible trainer on megatron-core + DeepSpeed whose
optimizers, LR schedules and parametrizations are plug-ins."""
__version__ = "0.1.0"


def pretrain(args=None, argv=None, world_size=None):
    """Train from parsed ``args`` or from a Megatron-style ``argv`` list (planned first:
    ``megatron_ext.plan``)."""
    # Imported here: `import megatron_ext` stays light (the CLI and the fork's plug-in hooks import
    # it); the trainer brings torch, megatron-core and DeepSpeed.
    from megatron_ext.plan import build_plan, parse_plan
    from megatron_ext.training.trainer import pretrain as _pretrain

    if args is None:
        return _pretrain(parse_plan(argv, world_size))
    if world_size is None:
        from megatron_ext.platform.distributed import discover  # torch: as above

        world_size = discover().world_size
    return _pretrain(build_plan(args, world_size))
