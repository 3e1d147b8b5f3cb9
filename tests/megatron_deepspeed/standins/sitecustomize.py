"""Test harness: make ``deepspeed.compression.compress`` importable. DeepSpeed 0.19 removed it; the
fork imports ``init_compression`` and ``redundancy_clean`` from it at module level and calls them
only with ``--compression-training``. A finder answers for that one name (lazily: nothing is
imported here)."""
import importlib.abc
import importlib.util
import sys

_NAME = "deepspeed.compression.compress"


class _CompressStandin(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != _NAME:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        def unavailable(*args, **kwargs):
            raise RuntimeError("deepspeed.compression.compress stand-in: --compression-training is not "
                               "available with DeepSpeed 0.19 (test harness)")

        module.init_compression = unavailable
        module.redundancy_clean = unavailable


sys.meta_path.append(_CompressStandin())
