"""The trainer: DeepSpeed engine around a megatron-core model, data, logging, checkpoints."""
