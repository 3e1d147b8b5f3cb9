"""The model: megatron-core's GPTModel as this trainer builds it (``gpt``), its layer specs
(``specs``), the sdpa core attention (``sdpa``), and the model features, one record each
(``feature``: the record type; ``features``: the records and the loops every consumer calls).
docs/architecture.md: adding a feature."""
