"""Our model in one process (TP=1, fp32), built from a checkpoint's saved flags with whole weights:
the reference that ``--verify`` compares a Hugging Face model against.

It is the trainer's own model (``megatron_ext.models.gpt.build_model``: megatron-core GPTModel, the
parametrization's forward hooks), so a match means the Hugging Face model computes what was trained.
Multi-token-prediction layers are left out (they do not change the next-token logits).
"""
from __future__ import annotations

import types
from typing import Dict, Optional

import torch

from megatron_ext.hf import HFError
from megatron_ext.models.gpt import build_model
from megatron_ext.platform import cpu_compat


def single_process() -> None:
    """torch.distributed with this one process and megatron-core's parallel state (TP=1), once.
    A private store: no port, no launcher variables (a tool run inside a batch job must not join it)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    cpu_compat.apply()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()
        model_parallel_cuda_manual_seed(0)


def build(args, state: Dict[str, torch.Tensor], dtype: Optional[torch.dtype] = None):
    """Our GPTModel (TP=1, fp32, eval mode) holding ``state`` (whole tensors, vocabulary unpadded;
    rounded to ``dtype`` first when given, to compare with a Hugging Face copy stored in it)."""

    single_process()
    flags = dict(vars(args))
    flags.update(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_model_parallel_size=1,
                 bf16=False, fp16=False, mtp_num_layers=None, mtp_loss_scaling_factor=None, recompute_activations=False)
    flags = types.SimpleNamespace(**flags)
    vocab = args.vocab_size_unpadded
    model = build_model(flags, vocab)
    model.eval()
    wanted = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    loaded = {}
    for name, tensor in state.items():
        if name.startswith("mtp."):
            continue
        if name not in wanted:
            raise HFError(f"our model built from the saved flags has no {name}")
        tensor = tensor.to(dtype).float() if dtype is not None else tensor.float()
        target = wanted[name]
        if tensor.shape != target.shape and tensor.shape[0] == vocab and tensor.shape[1:] == target.shape[1:]:
            tensor = torch.cat([tensor, torch.zeros(target.shape[0] - vocab, *target.shape[1:])])  # vocabulary padding
        if tensor.shape != target.shape:
            raise HFError(f"{name}: shape {tuple(tensor.shape)} in the weights, {tuple(target.shape)} in our model")
        loaded[name] = tensor.to(target.device)
    missing = sorted(set(wanted) - set(loaded))
    if missing:
        raise HFError(f"the weights lack {missing[0]}, which our model built from the saved flags has")
    model.load_state_dict(loaded, strict=False)  # strict would also ask for megatron-core's _extra_state entries
    return model


@torch.no_grad()
def logits(model, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """[batch, sequence, vocab] logits of our model (padding columns dropped), on the CPU."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    positions = torch.arange(ids.shape[1], device=device).unsqueeze(0).expand_as(ids)
    out = model(input_ids=ids, position_ids=positions, attention_mask=None)
    return out[..., :vocab].float().cpu()


@torch.no_grad()
def compare(ours, theirs, vocab: int, seq_length: int, batch: int = 2, seed: int = 0):
    """(largest |logit difference|, largest |logit| of ours) between our model and a Hugging Face
    causal LM on random tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_length), generator=generator)
    ref = logits(ours, ids, vocab)
    got = theirs(input_ids=ids.to(theirs.device)).logits[..., :vocab].float().cpu()
    return float((ref - got).abs().max()), float(ref.abs().max())
