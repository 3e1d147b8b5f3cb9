"""An imported model as a checkpoint in the trainer's native layout (the one ``save_checkpoint``
writes), which ``--load DIR --finetune`` reads: ``DIR/latest`` and
``DIR/latest_checkpointed_iteration.txt`` naming ``global_step0``, and one
``mp_rank_XX_model_states.pt`` per tensor-parallel rank holding that rank's shards (vocabulary rows
padded as the trainer pads them), the saved flags (``args``) and DeepSpeed's bookkeeping. It holds
no optimizer state and no LR schedule: it loads only with ``--finetune`` (weights only), at its
tensor-parallel size and any data-parallel size, ZeRO 0, 1 or 2.

Like ``checkpoint_reader``, the only place the Hugging Face tools write this layout (its names from
``checkpoint_layout.py``) and use the trainer's flag parsing (``trainer_args``).
"""
from __future__ import annotations

import argparse
import collections
import os
from typing import Dict, List

import torch

from megatron_ext.hf import HFError
from megatron_ext.hf import tensor_parallel as tp_layout
from megatron_ext.arguments import build_parser
from megatron_ext.checkpoint_layout import LATEST, TRACKER_FILE, model_states_name, tag_for
from megatron_ext.fileio import write_text_atomically
from megatron_ext.models.gpt import padded_vocab_size
from megatron_ext.plan import plan_or_problem
from megatron_ext.training.checkpointing import CHECKPOINT_VERSION
from megatron_ext.training.universal import universal_checkpoint_info

# megatron-core's linear layers carry an (empty) extra state that strict loading expects
_LINEAR_MODULES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def trainer_args(flags: List[str], world_size: int) -> argparse.Namespace:
    """The trainer's own parsing of ``flags`` (``--mock-data`` stands in for data, files are not
    checked); HFError with its one-line message for a combination it refuses."""

    plan, problem = plan_or_problem(build_parser(), flags + ["--mock-data", "--train-iters", "1"], world_size,
                                    check_files=False)
    if problem is not None:
        raise HFError(problem)
    # a copy to describe the imported checkpoint (its vocabulary is filled in from the tokenizer)
    return argparse.Namespace(**vars(plan.args))


def write(load_dir: str, args, state: Dict[str, torch.Tensor], provenance: Dict) -> List[str]:
    """Write ``state`` (whole tensors, vocabulary unpadded, megatron-core names) into ``load_dir`` as
    iteration 0 at ``args.tensor_model_parallel_size``; returns the files written."""
    import deepspeed

    tp = args.tensor_model_parallel_size
    args.padded_vocab_size = padded_vocab_size(args.vocab_size_unpadded, args.make_vocab_size_divisible_by, tp)
    info = universal_checkpoint_info(args)
    shards: List[Dict[str, torch.Tensor]] = [collections.OrderedDict() for _ in range(tp)]
    for name, tensor in state.items():
        if tp_layout.layout(name, info) == tp_layout.VOCAB:
            pad = args.padded_vocab_size - tensor.shape[0]
            tensor = torch.cat([tensor, tensor.new_zeros(pad, *tensor.shape[1:])]) if pad else tensor
        for rank, shard in enumerate(tp_layout.split(name, tensor, tp, info)):
            shards[rank][name] = shard.clone()  # its own storage: a saved view would carry the whole tensor
    extra = sorted({name.rsplit(".", 1)[0] for name in state if name.rsplit(".", 2)[-2] in _LINEAR_MODULES})
    tag = tag_for(0)
    os.makedirs(os.path.join(load_dir, tag))
    files = []
    for rank, module in enumerate(shards):
        for prefix in extra + ["output_layer"]:
            module[f"{prefix}._extra_state"] = None
        client = {
            "module": module, "buffer_names": [], "optimizer": None, "param_shapes": None,
            "frozen_param_shapes": None, "shared_params": None, "frozen_param_fragments": None,
            "lr_scheduler": None, "data_sampler": None, "random_ltd": None, "skipped_steps": 0,
            "global_steps": 0, "global_samples": 0, "dp_world_size": 1, "mp_world_size": tp,
            "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": tp}, "ds_config": None,
            "ds_version": deepspeed.__version__,
            "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0, "consumed_samples": 0, "tokens": 0,
            "universal_checkpoint_info": info, "imported_from": provenance,
        }
        path = os.path.join(load_dir, tag, model_states_name(rank))
        torch.save(client, path)
        files.append(os.path.relpath(path, load_dir))
    write_text_atomically(os.path.join(load_dir, LATEST), tag)
    write_text_atomically(os.path.join(load_dir, TRACKER_FILE), "0")
    return files + [LATEST, TRACKER_FILE]
