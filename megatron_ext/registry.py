"""The one generic plug-in registry used by every family (optimizers, LR schedules,
parametrizations, ...).

A plug-in registers itself with a decorator that gives its name, aliases, a one-line description
and the command-line arguments it owns::

    from megatron_ext.registry import Arg
    from megatron_ext.optimizers import OPTIMIZERS

    @OPTIMIZERS.register("lion", description="Lion sign-momentum optimizer",
                         arguments=[Arg("--lion-beta1", type=float, default=0.9, help="...")])
    def build_lion(param_groups, args): ...

Built-in plug-ins are the modules inside a family's package (one file each, found by listing the
package, so adding one needs no edit elsewhere). Third-party distributions add theirs through the
entry-point group ``megatron_ext.plugins``: each entry point names a module (or a callable taking
no arguments) that is imported/called and registers through the same decorators.

Each family has one record type (a ``Plugin`` subclass, given to its ``Registry``) whose typed
optional fields say what the plug-in can do: ``validate(args)`` for its own flags, the engine
settings it supports as data (``EngineSupport``), and family-specific fields (an optimizer's
muP ``width_lr_exponents``). ``Registry.check`` applies them, the same way for every family, with
the same one-line errors; the run plan (``megatron_ext.plan``) calls it once per selected plug-in.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import pkgutil
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from megatron_ext.argtypes import close_hint

ENTRY_POINT_GROUP = "megatron_ext.plugins"


class UnknownPluginError(KeyError, ValueError):
    """Raised for a name no plug-in of the family answers to; the message lists the known names."""

    def __str__(self):  # KeyError would quote the message
        return self.args[0]


class RegistryError(RuntimeError):
    """A plug-in was declared inconsistently (duplicate name, conflicting flag)."""


@dataclasses.dataclass(frozen=True)
class Arg:
    """One command-line option a plug-in owns; the arguments of ``ArgumentParser.add_argument``.

    Several plug-ins may declare the same flag (e.g. ``--adam-beta1`` for adam, adamw and lamb) as
    long as the declarations agree; it is then added once.
    """

    flags: tuple
    kwargs: dict

    def __init__(self, *flags: str, **kwargs: Any):
        object.__setattr__(self, "flags", tuple(flags))
        object.__setattr__(self, "kwargs", dict(kwargs))

    @property
    def dest(self) -> str:
        return self.kwargs.get("dest") or self.flags[0].lstrip("-").replace("-", "_")

    def same_as(self, other: "Arg") -> bool:
        return self.flags == other.flags and self.kwargs == other.kwargs


class PluginSettingError(ValueError):
    """The selected plug-in cannot run with these flags or this engine; the message is one line."""


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """The engine a run will have (from the run plan: the user's DeepSpeed JSON merged)."""

    zero_stage: int = 0
    cpu_offload: bool = False
    tensor_parallel: int = 1
    precision: str = "fp32"  # fp32, bf16, fp16
    pipeline_parallel: int = 1
    expert_parallel: int = 1


@dataclasses.dataclass(frozen=True)
class EngineSupport:
    """The engine settings a plug-in runs under, declared as data; ``reason`` says why a setting is
    not supported (shown in the error and by ``megatron-ext list -v``)."""

    zero_stages: Tuple[int, ...] = (0, 1, 2, 3)
    cpu_offload: bool = True
    tensor_parallel: bool = True
    precisions: Tuple[str, ...] = ("fp32", "bf16", "fp16")
    # whether it runs under DeepSpeed's bf16 optimizer (bf16 weights, fp32 gradient accumulation)
    bf16_optimizer: bool = True
    # pipeline parallelism (megatron-core's schedules: one stage's parameters per rank) and expert
    # parallelism (each rank holds some experts; their gradients reduce over the expert-data-parallel group)
    pipeline_parallel: bool = True
    expert_parallel: bool = True
    reason: str = ""

    def problem(self, who: str, engine: EngineSettings) -> Optional[str]:
        """One line saying why ``who`` (e.g. ``--optimizer muon``) cannot run on ``engine``, or None."""
        why = f" ({self.reason})" if self.reason else ""
        if engine.zero_stage not in self.zero_stages:
            return f"{who} supports --zero-stage {_spell_list(self.zero_stages)}, not {engine.zero_stage}{why}"
        if engine.cpu_offload and not self.cpu_offload:
            return f"{who} does not support --cpu-optimizer (ZeRO-Offload){why}"
        if engine.tensor_parallel > 1 and not self.tensor_parallel:
            return f"{who} does not support --tensor-model-parallel-size > 1{why}"
        if engine.pipeline_parallel > 1 and not self.pipeline_parallel:
            return f"{who} does not support --pipeline-model-parallel-size > 1{why}"
        if engine.expert_parallel > 1 and not self.expert_parallel:
            return f"{who} does not support --expert-model-parallel-size > 1{why}"
        if engine.precision not in self.precisions:
            return f"{who} does not support --{engine.precision}{why}"
        return None

    def describe(self) -> str:
        parts = [f"ZeRO {'/'.join(map(str, self.zero_stages))}"]
        if not self.cpu_offload:
            parts.append("no CPU offload")
        if not self.tensor_parallel:
            parts.append("no tensor parallel")
        if not self.pipeline_parallel:
            parts.append("no pipeline parallel")
        if not self.expert_parallel:
            parts.append("no expert parallel")
        if tuple(self.precisions) != ("fp32", "bf16", "fp16"):
            parts.append("/".join(self.precisions))
        if not self.bf16_optimizer:
            parts.append("not under DeepSpeed's bf16 optimizer (--accumulate-allreduce-grads-in-fp32)")
        return ", ".join(parts) + (f" ({self.reason})" if self.reason else "")


def _spell_list(items) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


@dataclasses.dataclass(frozen=True)
class Plugin:
    """The record of one plug-in. Families extend it with their own typed fields."""

    family: str
    name: str
    obj: Any
    description: str
    aliases: tuple = ()
    arguments: tuple = ()
    source: str = ""  # module that registered it
    validate: Optional[Callable[[Any], None]] = None  # raises ValueError (one line naming the flag)
    engine: EngineSupport = EngineSupport()
    reads_flags_of: tuple = ()  # other plug-ins of the family whose flags this one also reads

    def flag_names(self) -> List[str]:
        return [a.flags[0] for a in self.arguments]


class Registry:
    """Name -> plug-in table for one family."""

    def __init__(self, family: str, title: str, package: Optional[str] = None, *, record: type = Plugin,
                 flag: Optional[str] = None, class_validator: Optional[str] = None,
                 refuse_foreign_flags: bool = True):
        self.family = family
        self.title = title
        self.package = package  # the package whose modules are this family's built-in plug-ins
        self.record = record  # the family's Plugin subclass
        self.flag = flag  # the flag that selects this family's plug-in (e.g. --optimizer)
        # Families whose plug-ins are classes: the record's ``validate`` is this classmethod of the
        # registered class (the family's base class defines it).
        self.class_validator = class_validator
        # Whether a flag only other plug-ins of the family read is an error (it would do nothing).
        self.refuse_foreign_flags = refuse_foreign_flags
        self._plugins: Dict[str, Plugin] = {}
        self._aliases: Dict[str, str] = {}
        self._builtins_loaded = package is None
        _ALL[family] = self

    # -- registering ----------------------------------------------------------------------
    def register(
        self,
        name: str,
        *,
        description: str,
        aliases: Iterable[str] = (),
        arguments: Iterable[Arg] = (),
        **fields: Any,
    ) -> Callable[[Any], Any]:
        """Decorator; ``fields`` are the family record's typed fields (``validate``, ``engine``...)."""
        def decorator(obj):
            self.add(name, obj, description=description, aliases=aliases, arguments=arguments, **fields)
            return obj

        return decorator

    def add(self, name, obj, *, description, aliases=(), arguments=(), **fields) -> Plugin:
        key = _key(name)
        known = {f.name for f in dataclasses.fields(self.record)} - {f.name for f in dataclasses.fields(Plugin)}
        known |= {"validate", "engine", "reads_flags_of"}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise RegistryError(f"{self.family} '{name}': unknown record field(s) {', '.join(unknown)}; "
                                f"{self.record.__name__} has {', '.join(sorted(known))}")
        fields = {**self.record_defaults(obj), **fields}
        if not description or "\n" in description.strip():
            raise RegistryError(f"{self.family} '{name}': description must be one line")
        for n in (key, *map(_key, aliases)):
            owner = self._aliases.get(n)
            if owner is not None and owner != key:
                raise RegistryError(f"{self.family} name '{n}' is already taken by '{owner}'")
        if key in self._plugins and self._plugins[key].obj is not obj:
            existing = self._plugins[key]
            raise RegistryError(
                f"{self.family} '{name}' registered twice ({existing.source} and {_source(obj)})"
            )
        arguments = tuple(arguments)
        self._check_flags(name, arguments)
        plugin = self.record(family=self.family, name=key, obj=obj, description=description.strip(),
                             aliases=tuple(map(_key, aliases)), arguments=arguments, source=_source(obj), **fields)
        self._plugins[key] = plugin
        for n in (key, *plugin.aliases):
            self._aliases[n] = key
        return plugin

    def record_defaults(self, obj) -> Dict[str, Any]:
        """Record fields derived from the registered object: class-based families take ``validate``
        from the class."""
        if self.class_validator:
            return {"validate": getattr(obj, self.class_validator)}
        return {}

    def _check_flags(self, name, arguments):
        for arg in arguments:
            for other in self._plugins.values():
                for theirs in other.arguments:
                    same_flag = bool(set(theirs.flags) & set(arg.flags))
                    # Two different flags may write one dest on purpose (aliases such as
                    # --enable-mup for --parametrization) when both name it explicitly.
                    shared_dest = theirs.dest == arg.dest and not ("dest" in theirs.kwargs and "dest" in arg.kwargs)
                    if (same_flag or shared_dest) and not theirs.same_as(arg):
                        raise RegistryError(
                            f"{self.family} '{name}' declares {arg.flags[0]} differently from "
                            f"'{other.name}'"
                        )

    # -- looking up -----------------------------------------------------------------------
    def load_builtins(self) -> None:
        """Import every module of the family's package (each registers itself)."""
        if self._builtins_loaded:
            return
        self._builtins_loaded = True
        pkg = importlib.import_module(self.package)
        for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            if not mod.name.startswith("_") and not mod.ispkg:  # sub-packages hold shared code
                importlib.import_module(f"{self.package}.{mod.name}")

    def get(self, name: str) -> Plugin:
        load_plugins()
        key = self._aliases.get(_key(name))
        if key is None:
            raise UnknownPluginError(self.unknown_message(name))
        return self._plugins[key]

    def unknown_message(self, name: str) -> str:
        load_plugins()
        known = sorted(self._aliases)
        hint = close_hint(_key(name), known, cutoff=0.5)
        return f"unknown {self.family} '{name}'{hint}; known: {', '.join(sorted(self._plugins))}"

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return _key(name) in self._aliases

    def names(self) -> List[str]:
        load_plugins()
        return sorted(self._plugins)

    def plugins(self) -> List[Plugin]:
        return [self._plugins[n] for n in self.names()]

    def argument_type(self, value: str) -> str:
        """For ``type=`` in argparse: validates the name, returns the canonical one."""
        try:
            return self.get(value).name
        except UnknownPluginError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    def check(self, plugin: Plugin, args, engine: EngineSettings) -> None:
        """Flags of other plug-ins of the family (they would do nothing), the plug-in's own flag
        checks, then its engine support: ``PluginSettingError`` (one line)."""
        who = f"{self.flag} {plugin.name}" if self.flag else f"{self.family} '{plugin.name}'"
        if self.refuse_foreign_flags:
            self._check_foreign_flags(plugin, args, who)
        if plugin.validate is not None:
            try:
                plugin.validate(args)
            except ValueError as e:
                raise PluginSettingError(str(e)) from None
        problem = plugin.engine.problem(who, engine)
        if problem:
            raise PluginSettingError(problem)

    def _check_foreign_flags(self, plugin: Plugin, args, who: str) -> None:
        """A flag only other plug-ins read, given with a value other than its default, would be
        silently ignored: refuse it."""
        readers = {plugin.name, *map(_key, plugin.reads_flags_of)}
        owners: Dict[str, List[str]] = {}
        declared: Dict[str, Arg] = {}
        for other in self.plugins():
            for arg in other.arguments:
                owners.setdefault(arg.dest, []).append(other.name)
                declared.setdefault(arg.dest, arg)
        selector = self.flag.lstrip("-").replace("-", "_") if self.flag else None
        for dest, names in owners.items():
            if dest == selector or readers & set(names):
                continue
            value = getattr(args, dest, None)
            if value is None or value is False or value == declared[dest].kwargs.get("default"):
                continue
            where = f"{self.flag} {', '.join(names)}" if self.flag else ", ".join(names)
            raise PluginSettingError(f"{declared[dest].flags[0]} has no effect with {who} (it belongs to {where})")

    def selected(self, args) -> Optional[Plugin]:
        """The plug-in ``args`` select through this family's flag (None: the family has no flag)."""
        if not self.flag:
            return None
        value = getattr(args, self.flag.lstrip("-").replace("-", "_"), None)
        return self.get(value) if value is not None else None

    # -- command line ---------------------------------------------------------------------
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add every plug-in's own flags to ``parser``, one group per plug-in."""
        seen = {}
        for plugin in self.plugins():
            new = [a for a in plugin.arguments if a.flags[0] not in seen]
            if not new:
                continue
            group = parser.add_argument_group(f"{self.family} '{plugin.name}'", plugin.description)
            for arg in new:
                group.add_argument(*arg.flags, **arg.kwargs)
                seen[arg.flags[0]] = plugin.name


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _source(obj) -> str:
    return getattr(obj, "__module__", "") or ""


_ALL: Dict[str, Registry] = {}
_FAMILY_PACKAGES = (
    "megatron_ext.optimizers",
    "megatron_ext.schedules",
    "megatron_ext.parametrizations",
)
_plugins_loaded = False


def families() -> Dict[str, Registry]:
    """Every plug-in family, loaded."""
    load_plugins()
    return dict(_ALL)


def load_plugins() -> None:
    """Load built-in plug-ins of every family, then third-party entry points (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for package in _FAMILY_PACKAGES:
        importlib.import_module(package)
    for registry in list(_ALL.values()):
        registry.load_builtins()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
        except Exception as e:  # a broken third-party plug-in must not take the trainer down
            warnings.warn(f"megatron_ext: could not load plug-in entry point '{ep.name}' ({ep.value}): {e}",
                          stacklevel=2)
            continue
        if callable(loaded) and not isinstance(loaded, type(importlib)):
            loaded()
