"""Every megatron_ext internal the Megatron-DeepSpeed integration uses, in one place.

The integration reaches the project only through the names below (registries, the argument
definitions of the shared schedule / init / LR-finder flags, the per-plug-in validation, the param
grouping, the LR scheduler, the optimizer hook protocol, the parametrizations, universal
checkpoints). When those modules move, only this file changes.

Nothing here imports megatron-core at module level: inside the fork, ``megatron`` is the fork's own
package (with its vendored ``megatron.core``), and this module is imported before it is.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

# Handed out as they are (the integration's API): the derivations both trainers share, and the
# optimizer hook protocol the fork's loop calls. Neither imports more than torch and the registry.
from megatron_ext.derivations import (DEFAULT_PARAMETRIZATION, batch_sizes, data_parallel_size,  # noqa: F401
                                      parametrization_name, train_iterations)
from megatron_ext.optimizers.common.hooks import (UnsupportedEngineSetting, curvature_label_generator,  # noqa: F401
                                                  curvature_pass_due, engine_ready, evaluation_weights,
                                                  gradient_clipping_disabled, sampled_label_losses, train_mode)
from megatron_ext.optimizers.common.full_matrices import WHOLE_ON_TP_RANKS, is_tensor_parallel  # noqa: F401
# The checkpoint layout (file names at every ZeRO stage, the universal folders, the one reader) and
# the universal converter's stages, for staging a fork checkpoint through DeepSpeed's converter the
# way ours is (placeholder Adam moments, the quiet converter, the listing of what was carried).
from megatron_ext.checkpoint_layout import (LATEST_UNIVERSAL, CheckpointFileError, client_state_file,  # noqa: F401
                                            expert_states_files, find_checkpoint, is_zero3, layer_of,
                                            layer_states_files, layer_states_name, load_states, model_states_files,
                                            optim_states_files, parallel_dimensions, read_latest,
                                            universal_optimizer_state_file, universal_parameters,
                                            universal_parameters_dir, universal_tag_for)
from megatron_ext.training.universal import (CONVERSION_RECORD, ConversionError, ConverterOptions,  # noqa: F401
                                             converted_listing, drop_placeholders, link_or_copy, link_tied_output,
                                             run_converter, stage_optim_states)

# -- registries ---------------------------------------------------------------------------------


def registries():
    """(optimizers, LR schedules, parametrizations), every plug-in loaded."""
    from megatron_ext import registry
    from megatron_ext.optimizers import OPTIMIZERS
    from megatron_ext.parametrizations import PARAMETRIZATIONS
    from megatron_ext.schedules import SCHEDULES

    registry.load_plugins()
    return OPTIMIZERS, SCHEDULES, PARAMETRIZATIONS



# -- flag definitions -----------------------------------------------------------------------------


def define_shared_flags(parser) -> None:
    """The flags our trainer defines for every schedule, the init / parametrization and the LR
    finder (not the per-plug-in ones, which come from the registries)."""
    from megatron_ext.arguments import add_init_arguments
    from megatron_ext.schedules.common.scheduler import add_schedule_arguments
    from megatron_ext.training.lr_finder import add_lr_finder_arguments

    add_schedule_arguments(parser)
    add_init_arguments(parser)
    add_lr_finder_arguments(parser)


def define_plugin_flags(parser) -> None:
    """Every registered plug-in's own flags (optimizers, schedules, parametrizations)."""
    for family in registries():
        family.add_arguments(parser)


def init_std_type():
    """``type=`` of --init-method-std (a number or ``auto``) and the value ``auto`` resolves to."""
    from megatron_ext.parametrizations.common.base import SMALL_INIT, init_std, small_init_std

    return init_std, SMALL_INIT, small_init_std


# -- validation (the checks our trainer runs before any work) -------------------------------------


def _engine_of(args):
    """The engine the fork runs: under ``--deepspeed`` its DeepSpeed JSON decides (ZeRO stage,
    offload, precision), as for our trainer's merged config; the fork's ``--zero-stage`` and
    ``--bf16`` flags only describe it. Without DeepSpeed, the flags."""
    from megatron_ext.training.deepspeed_config import engine_settings, read_deepspeed_json

    tp = int(getattr(args, "tensor_model_parallel_size", 1) or 1)
    config = getattr(args, "deepspeed_config", None) if getattr(args, "deepspeed", False) else None
    if isinstance(config, str):
        config = read_deepspeed_json(config, "--deepspeed_config")
    if not isinstance(config, dict):
        precision = "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else "fp32"
        config = {"zero_optimization": {"stage": int(getattr(args, "zero_stage", 0) or 0)},
                  "bf16": {"enabled": precision == "bf16"}, "fp16": {"enabled": precision == "fp16"}}
        if getattr(args, "cpu_optimizer", False):
            config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return engine_settings(config, tp)


def _check(registry, name: str, args) -> None:
    """The plug-in record's checks, as our run plan applies them (one-line ValueError)."""
    registry.check(registry.get(name), args, _engine_of(args))


def validate_optimizer(args) -> None:
    optimizers, _, _ = registries()
    _check(optimizers, args.optimizer, args)


def validate_parametrization(args) -> None:
    _, _, parametrizations = registries()
    _check(parametrizations, args.parametrization, args)


def validate_schedule(args) -> None:
    from megatron_ext.schedules.common.scheduler import build_schedule

    _, schedules, _ = registries()
    _check(schedules, args.lr_decay_style, args)
    build_schedule(args)


def validate_lr_finder(args) -> None:
    from megatron_ext.training.lr_finder import validate_lr_finder_args

    validate_lr_finder_args(args)


# -- optimizer ----------------------------------------------------------------------------------


def param_groups(named_model, parametrization) -> List[dict]:
    """Our trainer's param groups (one per role, the parametrization's multipliers) over
    ``named_model`` (anything whose ``named_parameters()`` yields megatron-core names)."""
    from megatron_ext.optimizers.common.param_groups import build_param_groups

    return build_param_groups(named_model, parametrization.group_options)


def build_optimizer_from_groups(groups: List[dict], args):
    """The registry's ``--optimizer`` over ``groups`` (megatron_ext.optimizers.build_optimizer_from_groups:
    epsilon scaled as our trainer does)."""
    from megatron_ext.optimizers import build_optimizer_from_groups as build

    registries()
    return build(groups, args)


def is_hybrid_matrix_optimizer(optimizer) -> bool:
    from megatron_ext.optimizers.common.hybrid import HybridMatrixOptimizer

    return isinstance(optimizer, HybridMatrixOptimizer)


def param_role(name: str, param) -> str:
    from megatron_ext.optimizers.common.param_groups import param_role as role

    return role(name, param)


def mark_whole_on_tp_ranks(param) -> None:
    """Tell our optimizers that ``param`` is whole on every tensor-parallel rank though it carries
    megatron's tensor-parallel attribute."""
    setattr(param, WHOLE_ON_TP_RANKS, True)


# -- parametrization ------------------------------------------------------------------------------


def parametrization_for(args):
    from megatron_ext.parametrizations import parametrization_for as choose

    return choose(args)


def init_family(name: str) -> str:
    """The init family of a megatron-core parameter name ('' for norms, biases, routers)."""
    from megatron_ext.parametrizations.common.report import family_of

    return family_of(name)


# -- LR schedule ----------------------------------------------------------------------------------


def param_scheduler(optimizer, args):
    """Our ``ParamScheduler`` as the flags describe it (schedule, weight-decay schedule, resume rules)."""
    from megatron_ext.schedules.common.scheduler import ParamScheduler

    return ParamScheduler.from_args(optimizer, args)


def schedule_resume_error():
    from megatron_ext.schedules.common.scheduler import ScheduleResumeError

    return ScheduleResumeError


def weight_decay_schedule_state(style: str, start: float, end: float, length: Optional[float]) -> Dict[str, Any]:
    from megatron_ext.schedules.common.scheduler import WeightDecaySchedule

    return WeightDecaySchedule(style, float(start), float(end), length).state()


def lr_schedule_from_state(state: Dict[str, Any]):
    from megatron_ext.schedules.common.scheduler import LRSchedule

    return LRSchedule.from_state(state)


def weight_decay_at(state: Dict[str, Any], position: float) -> float:
    """The weight decay a saved weight-decay schedule gives at ``position`` (samples)."""
    from megatron_ext.schedules.common.scheduler import WeightDecaySchedule

    return WeightDecaySchedule.from_state(state).wd(position)


def lr_finder(args):
    from megatron_ext.training.lr_finder import LRFinder

    return LRFinder(args)


# -- checkpoints ----------------------------------------------------------------------------------


def to_universal(tag_dir: str, output_dir: Optional[str], workers: int = 1, verbose: bool = False):
    """Our checkpoint -> DeepSpeed's universal format (megatron_ext.training.universal.convert)."""
    from megatron_ext.training.universal import ConverterOptions, convert

    return convert(tag_dir, output_dir, ConverterOptions(extract_workers=workers), verbose=verbose)


def our_flags() -> List[tuple]:
    """``(dest, flags, add_argument kwargs)`` of every flag our shared definitions and plug-ins
    declare, in definition order."""
    recorded = RecordingParser()
    define_shared_flags(recorded)
    define_plugin_flags(recorded)
    return [(kwargs.get("dest") or next(f for f in flags if f.startswith("--")).lstrip("-").replace("-", "_"),
             flags, kwargs) for flags, kwargs in recorded.calls]


def our_flag_defaults() -> Dict[str, Any]:
    """dest -> default of every flag our shared definitions and plug-ins declare (to read a
    Megatron-DeepSpeed run's saved arguments as our code expects them)."""
    out = {}
    for dest, _, kwargs in our_flags():
        out.setdefault(dest, flag_default(kwargs))
    return out


def flag_default(kwargs: Dict[str, Any]):
    """The default ``add_argument(**kwargs)`` gives its destination."""
    if "default" in kwargs:
        return kwargs["default"]
    return {"store_true": False, "store_false": True}.get(kwargs.get("action"))


def trainer_flags(values: Dict[str, Any]) -> List[str]:
    """Our trainer's flags that set ``values`` (destination -> value), spelled by its own parser."""
    from megatron_ext.arguments import build_parser
    from megatron_ext.flag_spelling import FlagSpelling

    spelling = FlagSpelling(build_parser())
    return [token for dest, value in values.items() for token in spelling.flags(dest, value)]


def schedule_states(args) -> Dict[str, Any]:
    """Our LR- and weight-decay-schedule states for ``args`` (what a checkpoint stores)."""
    from megatron_ext.schedules.common.scheduler import build_schedule, build_weight_decay_schedule

    return {"schedule": build_schedule(args).state(), "weight_decay": build_weight_decay_schedule(args).state()}


def our_universal_checkpoint_info(args_namespace) -> Dict[str, Any]:
    from megatron_ext.training.universal import universal_checkpoint_info

    return universal_checkpoint_info(args_namespace)


def model_feature_refusal(saved_args: Dict[str, Any]) -> Optional[str]:
    """Why ``convert`` cannot carry our model whose saved arguments are ``saved_args`` to the fork:
    the line of the first model feature whose record says so (None: it carries them all)."""
    from megatron_ext.models import features

    return features.refusal("convert", saved_args)



def progress(prog: str):
    """Progress of a long conversion by tensors and bytes (megatron_ext.progress.Progress)."""
    from megatron_ext.progress import Progress

    return Progress(prog)


def folder_bytes(folder: str) -> int:
    from megatron_ext.progress import folder_bytes as count

    return count(folder)


def write_text_atomically(path: str, text: str) -> None:
    from megatron_ext.fileio import write_text_atomically as write

    write(path, text)


def staged_folder(final: str, prefix: str):
    """A context manager: build the folder ``final`` in a hidden sibling, synced and renamed into
    place when the block ends (megatron_ext.fileio.staged_folder)."""
    from megatron_ext.fileio import staged_folder as staged

    return staged(final, prefix)


# -- argument types (for flags the integration defines itself) -----------------------------------


def boolean(text: str) -> bool:
    """``type=`` of a true/false value: our trainer's words (1/0, yes/no, on/off too)."""
    from megatron_ext.argtypes import boolean as read

    return read(text)


def one_line_errors(parser) -> None:
    """The parser reports a bad command line in one line and exits with 2, as ours do."""
    from megatron_ext.argtypes import one_line_errors as install

    install(parser)



class RecordingParser:
    """Collects ``add_argument`` calls (and groups) instead of building a parser, so our flag
    definitions can be replayed onto the fork's parser one by one."""

    def __init__(self):
        self.calls: List[tuple] = []  # (flags, kwargs)

    def add_argument_group(self, title=None, description=None):
        return self  # the fork's parser gets one group of its own for all of them

    def add_argument(self, *flags, **kwargs):
        self.calls.append((tuple(flags), dict(kwargs)))

    def set_defaults(self, **kwargs):  # not used by our definitions
        raise NotImplementedError

