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
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import importlib.metadata
import pkgutil
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional

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


@dataclasses.dataclass
class Plugin:
    family: str
    name: str
    obj: Any
    description: str
    aliases: tuple = ()
    arguments: tuple = ()
    source: str = ""  # module that registered it

    def flag_names(self) -> List[str]:
        return [a.flags[0] for a in self.arguments]


class Registry:
    """Name -> plug-in table for one family."""

    def __init__(self, family: str, title: str, package: Optional[str] = None):
        self.family = family
        self.title = title
        self.package = package  # the package whose modules are this family's built-in plug-ins
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
    ) -> Callable[[Any], Any]:
        def decorator(obj):
            self.add(name, obj, description=description, aliases=aliases, arguments=arguments)
            return obj

        return decorator

    def add(self, name, obj, *, description, aliases=(), arguments=()) -> Plugin:
        key = _key(name)
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
        plugin = Plugin(
            self.family, key, obj, description.strip(), tuple(map(_key, aliases)), arguments, _source(obj)
        )
        self._plugins[key] = plugin
        for n in (key, *plugin.aliases):
            self._aliases[n] = key
        return plugin

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
            if not mod.name.startswith("_"):
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
        close = difflib.get_close_matches(_key(name), known, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
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
