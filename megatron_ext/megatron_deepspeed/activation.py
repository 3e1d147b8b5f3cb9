"""Switching the plug-ins on inside a Megatron-DeepSpeed process, without editing the fork.

The fork's modules are patched BY NAME right after Python executes them: a finder placed first
on ``sys.meta_path`` hands out the fork's own module specs with a loader that, once
``megatron.training`` has run, rebinds the hook points (``hook_points.py``). This works whoever
starts the process (``install()`` at the top of an entry point, ``python -m
megatron_ext.megatron_deepspeed``, or the start-up hook that ``MEGATRON_EXT_PLUGINS`` enables) and
costs nothing in a process that never imports the fork: megatron-core alone has no
``megatron.training``.

Modes: ``all`` (every name we implement is ours, the fork's own versions included), ``new`` (only
names the fork lacks), ``off`` (nothing changes).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from typing import Optional

from megatron_ext.megatron_deepspeed.errors import ActivationError, fail  # noqa: F401 (re-exported)

ENV_VAR = "MEGATRON_EXT_PLUGINS"
MODES = ("all", "new", "off")
TRIGGER = "megatron.training"  # patched once this module of the fork has executed

_state = {"mode": None, "error": None, "patched": False}


def parse_mode(value: Optional[str], source: str = ENV_VAR) -> str:
    text = (value or "").strip().lower()
    if text in ("", "0", "none", "false", "no"):
        return "off"
    if text in ("1", "true", "yes", "on"):
        return "all"
    if text not in MODES:
        raise ActivationError(f"{source}={value!r}: expected one of {', '.join(MODES)}")
    return text


def current_mode() -> Optional[str]:
    return _state["mode"]


class _PatchAfterExec(importlib.abc.Loader):
    """Runs the real loader, then the patches (only for ``megatron.training``)."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _patch_now()

    def __getattr__(self, name):  # get_source, get_code... for tracebacks and tools
        return getattr(self.loader, name)


class _ForkFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != TRIGGER or _state["patched"]:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchAfterExec(spec.loader)
        return spec


_finder = _ForkFinder()


def install(mode: Optional[str] = None) -> str:
    """Switch the plug-ins on for this process (``mode``: all | new | off; default: the
    ``MEGATRON_EXT_PLUGINS`` variable, else ``all``). Call it before the fork's training module is
    imported, or after: either way the patches are applied once. Returns the mode in force."""
    try:
        chosen = parse_mode(mode, "install(mode)") if mode is not None else parse_mode(os.environ.get(ENV_VAR, "all"))
    except ActivationError as e:
        fail(str(e))
    if _state["patched"] and chosen != _state["mode"]:
        fail(f"the plug-ins are already on in mode {_state['mode']}; cannot switch to {chosen} in the same process")
    _state["mode"] = chosen
    if chosen == "off":
        return chosen
    if TRIGGER in sys.modules:
        _patch_now()
    elif _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
    return chosen


def install_from_environment() -> None:
    """The start-up hook's entry (``MEGATRON_EXT_PLUGINS`` is set): nothing is imported now; a bad
    value is reported once the fork starts (other Python processes in the environment are left alone)."""
    try:
        mode = parse_mode(os.environ.get(ENV_VAR))
    except ActivationError as e:
        _state["error"] = str(e)
        sys.meta_path.insert(0, _finder)
        return
    if mode != "off":
        _state["mode"] = mode
        sys.meta_path.insert(0, _finder)


def _patch_now() -> None:
    if _state["patched"]:
        return
    _state["patched"] = True
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    if _state["error"]:
        fail(_state["error"])
    from megatron_ext.megatron_deepspeed import patches

    try:
        patches.apply(_state["mode"])
    except ActivationError as e:
        fail(str(e))
