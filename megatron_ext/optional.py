"""Optional dependencies (the extras of setup.py): imported only where a feature needs them, and a
missing one is one line naming the extra that installs it."""
from __future__ import annotations

import importlib


class MissingExtra(ValueError):
    """An optional package that is not installed; the message names the extra."""


def require(module: str, extra: str = "hf"):
    """Import an optional dependency, or fail in one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"this needs the Python package '{module.split('.')[0]}': "
                           f"pip install 'megatron_ext[{extra}]'") from None
