"""megatron_ext's plug-ins inside an existing Megatron-DeepSpeed checkout (the ALCF fork), without
editing it: its own argument parser gets our optimizers', LR schedules', LR finder's, init's and
parametrizations' flags, and its own training loop runs them. See docs/megatron_deepspeed.md.

Three ways to switch them on:

* ``python -m megatron_ext.megatron_deepspeed pretrain_gpt_alcf.py [its flags]``;
* ``import megatron_ext.megatron_deepspeed; megatron_ext.megatron_deepspeed.install()`` at the top
  of an entry point;
* ``MEGATRON_EXT_PLUGINS=all|new|off`` in the environment (a start-up hook installed with
  megatron_ext honours it in every Python process, so the fork's own launcher needs no change:
  ``MEGATRON_EXT_PLUGINS=all bash train_alcf.sh``).

``all``: every name we implement is ours (the fork's muon, dshampooadamw, sophiag, schedule-free,
lamb, adamw..., its infinite and constant-plus-cooldown schedules, its LR finder included); ``new``:
only names the fork lacks (e.g. ``--optimizer shampoo|lion``, ``--lr-decay-style wsd``,
``--parametrization mup``); ``off``: nothing changes.

The modules of this package import the rest of megatron_ext inside their functions: in the fork's
process ``megatron`` is the fork's own package, and nothing of ours that imports megatron-core may
load before the fork has imported it (``project_api.py`` is the one door into the package).
"""
from megatron_ext.megatron_deepspeed.activation import ENV_VAR, MODES, install

__all__ = ["install", "ENV_VAR", "MODES"]
