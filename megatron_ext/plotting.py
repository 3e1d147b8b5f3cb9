"""matplotlib for the tools that draw (schedule, LR finder, coord-check, sweeps): an optional
dependency (``pip install 'megatron_ext[plots]'``), imported only when a plot is asked for."""
from __future__ import annotations

MISSING = "needs matplotlib (pip install 'megatron_ext[plots]')"


def pyplot():
    """matplotlib's pyplot on the file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
