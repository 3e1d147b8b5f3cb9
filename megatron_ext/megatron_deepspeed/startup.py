"""Imported at interpreter start-up by ``megatron_ext_plugins.pth`` (installed with megatron_ext)
when ``MEGATRON_EXT_PLUGINS`` is set to something other than ``off``: registers the import hook
that patches the fork once its training module runs. Imports nothing else (it runs in every
Python process of the environment)."""
from megatron_ext.megatron_deepspeed.activation import install_from_environment

install_from_environment()
