"""Tests of megatron_ext inside the Megatron-DeepSpeed fixture (a package, so that its conftest
does not shadow tests/conftest.py for the other test modules)."""
