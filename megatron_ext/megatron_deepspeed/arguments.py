"""Our flags on the fork's own argument parser, and our checks on what it parsed.

``extend(parser)`` (run as the fork's ``extra_args_provider``) replays our trainer's flag
definitions onto the fork's parser: every plug-in's flags (from the registries) and the flags every
schedule, the init / parametrization and the LR finder share. A flag the fork already defines
(same destination or spelling; 42 of ours at the fork's pinned commit) is REUSED, never
redefined (argparse would refuse a second definition):

* our spellings become aliases of it (``--lr-constant-plus-cooldown`` for the fork's
  ``--lr_constant_plus_cooldown``, ``--override-opt-param-scheduler``...);
* a plug-in's flag gets a placeholder default, resolved after parsing: our default when our
  plug-in runs this family (``--muon-ns-steps`` 5, ``--muonadamw-eps`` 1e-8...), the fork's when
  the fork's own optimizer / schedule runs. Flags that describe the run itself (``--lr``,
  ``--lr-decay-style``, ``--optimizer``...) keep the fork's defaults;
* ``type=bool`` (``--muon-nesterov False`` parsed as True) becomes a real boolean
  (``--muon-nesterov``, ``--muon-nesterov false``, ``--no-muon-nesterov``);
* ``--optimizer`` and ``--lr-decay-style`` accept our names too; ``--init-method-std`` accepts ``auto``.

The parser reports errors in one line. ``check(args)`` then runs the validation our trainer runs
(the plug-in's own ``validate_args``, the whole LR schedule, the LR finder, the parametrization)
on a view of the fork's arguments, before the fork validates or builds anything.
"""
from __future__ import annotations

import argparse
import copy
import math
from typing import Dict, List

from megatron_ext.megatron_deepspeed import layouts, project_api
from megatron_ext.megatron_deepspeed.ownership import Ownership


class _Unset:
    """Shown as the default in --help; never left in the parsed arguments."""

    def __repr__(self):
        return "(plug-in default)"


UNSET = _Unset()


def _key(flag: str) -> str:
    return flag.lstrip("-").replace("_", "-")


class _NamesOf:
    """``type=`` for --optimizer / --lr-decay-style: the fork's choices plus our registry's names."""

    def __init__(self, fork_choices, registry, flag):
        self.fork_choices = list(fork_choices or [])
        self.registry = registry
        self.flag = flag
        self.__name__ = flag

    def __call__(self, value: str) -> str:
        if value in self.fork_choices or value in self.registry:
            return value
        names = sorted(set(self.fork_choices) | set(self.registry.names()))
        raise argparse.ArgumentTypeError(f"unknown name {value!r} (known: {', '.join(names)})")


class ForkArguments:
    """What ``extend`` did to the fork's parser, and the resolution/checks after parsing."""

    def __init__(self, mode: str):
        self.mode = mode
        self.reused: Dict[str, dict] = {}  # dest -> {family, ours, fork default}
        self.added: Dict[str, dict] = {}  # dest -> {family, default, flag}
        self.fork_optimizers: List[str] = []
        self.fork_schedules: List[str] = []

    # -- the parser ---------------------------------------------------------------------------
    def extend(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        optimizers, schedules, parametrizations = project_api.registries()
        plugin_dests = {}
        for family, registry in (("optimizer", optimizers), ("schedule", schedules),
                                 ("init", parametrizations)):
            for plugin in registry.plugins():
                for arg in plugin.arguments:
                    plugin_dests.setdefault(arg.dest, family)
        by_dest = {a.dest: a for a in parser._actions}
        by_flag = {_key(s): a for a in parser._actions for s in a.option_strings}
        group = parser.add_argument_group("megatron_ext plug-ins (MEGATRON_EXT_PLUGINS)")
        seen = set()
        for dest, flags, kwargs in project_api.our_flags():
            family = plugin_dests.get(dest) or _shared_family(dest)
            if (dest, flags) in seen:
                continue
            seen.add((dest, flags))
            existing = by_dest.get(dest) or next((by_flag[_key(f)] for f in flags if _key(f) in by_flag), None)
            if existing is None:
                group.add_argument(*flags, **kwargs)
                self.added.setdefault(dest, {"family": family, "default": project_api.flag_default(kwargs),
                                             "flag": flags[0]})
                continue
            self._reuse(parser, existing, flags, kwargs, family, plugin_dests)

        self._names_flag(by_dest.get("optimizer"), optimizers, "--optimizer", "fork_optimizers")
        self._names_flag(by_dest.get("lr_decay_style"), schedules, "--lr-decay-style", "fork_schedules")
        init_std, _, _ = project_api.init_std_type()
        if "init_method_std" in by_dest:
            by_dest["init_method_std"].type = init_std
        for action in parser._actions:  # the fork's own boolean traps, ours or not
            if action.type is bool:
                _fix_bool(action)
        project_api.one_line_errors(parser)
        return parser

    def _reuse(self, parser, action, flags, kwargs, family, plugin_dests):
        for flag in flags:  # our spellings as aliases
            if flag.startswith("--") and flag not in parser._option_string_actions:
                parser._option_string_actions[flag] = action
                action.option_strings.append(flag)
        if kwargs.get("action") == argparse.BooleanOptionalAction:
            negative = "--no-" + flags[0][2:]
            if negative not in parser._option_string_actions:
                parser.add_argument(negative, dest=action.dest, action="store_false", help=argparse.SUPPRESS)
        ours_type = kwargs.get("type")
        if callable(ours_type) and action.type in (None, int, float, str) and not action.choices:
            action.type = ours_type  # same Python type, our bounds (e.g. --muon-ns-steps must be positive)
        record = {"family": family, "ours": project_api.flag_default(kwargs), "fork": action.default,
                  "flag": action.option_strings[0]}
        if action.dest in plugin_dests or family == "init":
            action.default = UNSET
        self.reused[action.dest] = record

    def _names_flag(self, action, registry, flag, attr):
        if action is None:
            return
        setattr(self, attr, list(action.choices or []))
        action.type = _NamesOf(action.choices, registry, flag)
        action.choices = None

    # -- after parsing --------------------------------------------------------------------------
    def resolve(self, args) -> Ownership:
        """Decide who runs each family and fill every placeholder default accordingly."""
        owner = Ownership.decide(self.mode, args, self.fork_optimizers, self.fork_schedules, self._given_new(args))
        for dest, record in self.reused.items():
            if getattr(args, dest, None) is UNSET:
                setattr(args, dest, record["ours"] if owner.ours(record["family"]) else record["fork"])
        if getattr(args, "init_method_std", None) == project_api.init_std_type()[1]:  # 'auto' -> a number the fork uses
            args.init_method_std = project_api.init_std_type()[2](args.hidden_size)
            args.init_method_std_auto = True
        for dest, record in self.added.items():
            if not owner.ours(record["family"]) and _given(args, dest, record):
                raise ValueError(f"{record['flag']} has no effect: {owner.why_not(record['family'])}")
        args.parametrization = project_api.parametrization_name(args)
        return owner

    def _given_new(self, args) -> List[str]:
        """Our init / parametrization flags the user set (they ask for our init under ``new``)."""
        return [d for d, r in self.added.items() if r["family"] == "init" and _given(args, d, r)]


def _given(args, dest: str, record: dict) -> bool:
    value = getattr(args, dest, None)
    return value is not None and value != record["default"]


def _shared_family(dest: str) -> str:
    if dest.startswith("lr_finder"):
        return "lr_finder"
    if dest in ("init_method_std", "scaled_output_projection_init", "adjust_word_embedding_init",
                "word_embedding_init_std", "output_layer_init_std", "parametrization"):
        return "init"
    return "schedule"


def _fix_bool(action) -> None:
    action.type = project_api.boolean
    if action.nargs is None:
        action.nargs = "?"
        action.const = True


# -- the view our checks and builders read ----------------------------------------------------------


def our_view(args):
    """A copy of the fork's arguments as our trainer's code expects them: derived values our
    finalisation computes (global batch, data-parallel size, training iterations from samples) and
    the fork's own derivations undone (constant weight decay filled into start/end)."""
    view = copy.copy(args)
    world = int(getattr(args, "world_size", 1) or 1)
    # the fork clamps TP to the world, then PP to what TP leaves (its validate_args)
    tp = min(int(getattr(args, "tensor_model_parallel_size", 1) or 1), world)
    pp = min(int(getattr(args, "pipeline_model_parallel_size", 1) or 1), max(1, world // tp))
    sp = int(getattr(args, "ds_sequence_parallel_size", 1) or 1)
    view.data_parallel_size = project_api.data_parallel_size(world, tp, pp, sp)
    if view.micro_batch_size:
        view.global_batch_size, _ = project_api.batch_sizes(view.micro_batch_size, view.global_batch_size, None,
                                                            view.data_parallel_size)
    if not view.train_iters and view.global_batch_size:
        view.train_iters, _ = project_api.train_iterations(None, getattr(view, "train_samples", None), None,
                                                           view.global_batch_size, getattr(view, "seq_length", None) or 1)
    if getattr(view, "weight_decay_incr_style", "constant") == "constant":
        view.start_weight_decay = view.end_weight_decay = None
    view.parametrization = project_api.parametrization_name(view)
    if isinstance(getattr(view, "num_experts", None), list):
        view.num_experts = max(view.num_experts) if view.num_experts else 1
    return view


def check(args, owner: Ownership) -> None:
    """Our trainer's checks for the families we run; raises ValueError with one line."""
    view = our_view(args)
    if owner.ours("schedule") or owner.ours("lr_finder"):
        if view.lr is None:
            raise ValueError("--lr is required")
        if not view.train_iters:
            raise ValueError("give --train-iters or --train-samples (the LR schedule is counted in samples)")
    if owner.ours("optimizer"):
        project_api.validate_optimizer(view)
    if owner.ours("init"):
        project_api.validate_parametrization(view)
        if view.parametrization != "sp" and not owner.ours("optimizer"):
            raise ValueError(f"--parametrization {view.parametrization} sets per-role LRs that the fork's own "
                             f"--optimizer {view.optimizer} would not apply: use MEGATRON_EXT_PLUGINS=all with one of "
                             "megatron_ext's optimizers")
        if view.parametrization != "sp" and getattr(view, "num_layers", None) is None:
            raise ValueError("--parametrization needs --num-layers")
    if owner.ours("schedule"):
        project_api.validate_schedule(view)
    if owner.ours("lr_finder"):
        project_api.validate_lr_finder(view)
    if not math.isfinite(float(view.lr or 0.0)):
        raise ValueError(f"--lr must be finite, got {view.lr}")
    layouts.check(args, owner)
