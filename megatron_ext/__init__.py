"""megatron_ext: a Megatron-DeepSpeed compatible trainer on megatron-core + DeepSpeed whose
optimizers, LR schedules and parametrizations are plug-ins."""
__version__ = "0.1.0"


def pretrain(args=None, argv=None):
    """Train from parsed ``args`` or from a Megatron-style ``argv`` list."""
    from megatron_ext.arguments import parse_args
    from megatron_ext.training.trainer import pretrain as _pretrain

    return _pretrain(args if args is not None else parse_args(argv))
