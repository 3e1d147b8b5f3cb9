"""Start-up messages of our dependencies that are known to be harmless in how we use them, and
that a new user reads as errors. ``silence_known_warnings()`` (called first thing by our entry
points: the trainer, the launcher, ``megatron-ext``) filters exactly these, each entry with the
reason it is harmless; our own warnings and every other library message still show.
"""
from __future__ import annotations

import logging
import warnings

# (message regex, module regex of the warning's origin, why it is harmless here)
PYTHON_WARNINGS = (
    (r"Transformer Engine and Apex are not installed", r"megatron\.core",
     "megatron-core falls back to its torch implementations, which are the ones we build on"),
    (r"Apex is not installed\. Falling back to Torch Norm", r"megatron\.core",
     "the local layer spec uses torch's norms by design; apex is not on the package index"),
    (r"full scope is deprecated", r"megatron\.core",
     "megatron-core 0.16.1 warns about its own default cuda_graph_scope; we capture no CUDA graphs"),
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated", r"torch\.distributed",
     "DeepSpeed 0.19.8 calls the old name from its ZeRO code; the call itself is correct"),
)

# (logger name, message prefix, why it is harmless here)
LOG_RECORDS = (
    ("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator",
     "printed on every CPU machine; the start-up block says which accelerator runs"),
    ("megatron.core.datasets.gpt_dataset", "Unable to save MockGPTDataset indexes",
     "synthetic data (--mock-data) has nothing to cache"),
)


class _DropKnown(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefix)


_installed = False


def silence_known_warnings() -> None:
    """Install the filters (once per process); before the libraries are imported."""
    global _installed
    if _installed:
        return
    _installed = True
    for message, module, _why in PYTHON_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    for logger, prefix, _why in LOG_RECORDS:
        logging.getLogger(logger).addFilter(_DropKnown(prefix))
