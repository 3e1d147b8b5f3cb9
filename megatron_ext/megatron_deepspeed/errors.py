"""How the integration fails: one line, and the same exit on every rank."""
from __future__ import annotations

import os
import sys
from typing import NoReturn


class ActivationError(RuntimeError):
    """The plug-ins cannot be switched on; the message is one line."""


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr (from the first rank only), then exit with ``code`` on every rank."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"megatron_ext: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)
