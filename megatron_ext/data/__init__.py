"""Data preparation: tokenizers, data-file lists and the preprocessing tool that writes megatron-core indexed datasets."""
