"""The configurations the estimate is checked on by measurement (tests/test_memory_plan.py and
benchmarks/memory_plan.py): small enough to train in seconds on a CPU, large enough that the
optimizer states, gradients and activations each weigh in the peak, so that a wrong formula for
any of them shows.

DeepSpeed's reduce bucket (5e8 elements by default: 2 GB at fp32) would dwarf such a model; the
checks configure a small one (``SMALL_BUCKETS``), which the estimate reads like any user's
DeepSpeed config. ZeRO 3's parameter prefetching is off so that its peak does not depend on timing.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import List, Tuple

SMALL_BUCKETS = {"zero_optimization": {"reduce_bucket_size": 1_000_000, "allgather_bucket_size": 1_000_000,
                                       "stage3_prefetch_bucket_size": 0, "stage3_param_persistence_threshold": 10_000,
                                       "stage3_max_live_parameters": 1_000_000}}

# llama-style, 3.7M parameters, 256 tokens per micro-batch
MODEL = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8", "--seq-length", "128",
         "--micro-batch-size", "2", "--mock-data", "--vocab-size", "1024", "--train-iters", "2", "--eval-iters", "0",
         "--eval-interval", "1000", "--log-interval", "1"]
MLA = ["--multi-latent-attention", "--q-lora-rank", "128", "--kv-lora-rank", "64", "--qk-head-dim", "32",
       "--qk-pos-emb-head-dim", "16", "--v-head-dim", "32", "--qk-layernorm"]
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "384"]


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    flags: Tuple[str, ...]
    ranks: int = 1
    # False: its peak moves from run to run by more than the tolerance allows a check (on gloo,
    # when the asynchronous collectives complete decides when ZeRO 2/3 free buffers); the
    # benchmark shows it, the test does not assert it
    repeatable: bool = True

    def argv(self, ds_config: str) -> List[str]:
        return MODEL + ["--deepspeed-config", ds_config] + list(self.flags)


CHECKS = (
    Check("zero0-fp32-adamw", ("--zero-stage", "0")),
    Check("zero1-bf16-adamw", ("--zero-stage", "1", "--bf16")),
    Check("zero2-fp32-accumulation", ("--zero-stage", "2", "--global-batch-size", "4")),
    Check("zero3-bf16", ("--zero-stage", "3", "--bf16")),
    # activation-bound checks: a larger micro batch (sequence) so that activations dominate the peak
    Check("zero0-recompute", ("--zero-stage", "0", "--recompute-activations", "--micro-batch-size", "8")),
    Check("zero1-moe-bf16", ("--zero-stage", "1", "--bf16", *MOE)),
    Check("zero1-mla", ("--zero-stage", "1", *MLA, "--seq-length", "512")),
    Check("zero1-muon", ("--zero-stage", "1", "--optimizer", "muon")),
    # factors from the first step, in blocks of 256 (the eigendecompositions of 1408-wide ones take seconds)
    Check("zero0-shampoo", ("--zero-stage", "0", "--optimizer", "shampoo", "--dshampooadamw-precondition-freq", "1",
                            "--dshampooadamw-max-preconditioner-dim", "256")),
    Check("zero0-local-attention-gqa", ("--zero-stage", "0", "--attention-backend", "local", "--num-key-value-heads", "2",
                                        "--micro-batch-size", "8", "--seq-length", "256")),
    # several ranks (torchrun on gloo)
    Check("zero1-dp2", ("--zero-stage", "1"), ranks=2),
    Check("zero2-dp2-accumulation", ("--zero-stage", "2", "--global-batch-size", "8"), ranks=2, repeatable=False),
    Check("zero3-dp2", ("--zero-stage", "3"), ranks=2, repeatable=False),
    Check("tp2-zero1", ("--zero-stage", "1", "--tensor-model-parallel-size", "2"), ranks=2),
)


def write_ds_config(folder: str) -> str:
    path = os.path.join(folder, "ds_small_buckets.json")
    with open(path, "w") as f:
        json.dump(SMALL_BUCKETS, f)
    return path
