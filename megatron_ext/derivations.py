"""The values both trainers derive from the same flags: our run plan (``megatron_ext.plan``) and the
Megatron-DeepSpeed integration's view of the fork's arguments (``megatron_deepspeed.arguments``).

Each rule is written once here so the two cannot drift apart: the data-parallel size of a layout,
the batch arithmetic (global batch, gradient accumulation), the training length in iterations, and
the parametrization a run uses when none is named; for our trainer also how a layout splits the
model (layers per pipeline stage, experts per expert-parallel rank) and which engine settings
DeepSpeed runs it with (docs/parallelism.md). Every problem is one ``ValueError`` line naming the
flags.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

DEFAULT_PARAMETRIZATION = "sp"


def parametrization_name(args) -> str:
    """``--parametrization`` as given, or the standard parametrization (the flag defaults to None so
    that a given one can be told apart)."""
    return getattr(args, "parametrization", None) or DEFAULT_PARAMETRIZATION


def data_parallel_size(world_size: int, tensor: int = 1, pipeline: int = 1, sequence: int = 1) -> int:
    """Ranks that hold the same model shard: the world divided by the model-parallel dimensions."""
    model_parallel = tensor * pipeline * sequence
    if world_size % model_parallel:
        dims = [f"--tensor-model-parallel-size {tensor}"]
        if pipeline != 1:
            dims.append(f"--pipeline-model-parallel-size {pipeline}")
        if sequence != 1:
            dims.append(f"--ds-sequence-parallel-size {sequence}")
        product = " x ".join(dims) + (f" = {model_parallel}" if len(dims) > 1 else "")
        raise ValueError(f"{product} does not divide the world size {world_size}")
    return world_size // model_parallel


def layers_per_stage(num_layers: int, pipeline: int) -> int:
    """Decoder layers each pipeline stage holds (megatron-core's even split)."""
    if num_layers % pipeline:
        raise ValueError(f"--pipeline-model-parallel-size {pipeline} does not divide --num-layers {num_layers} "
                         "(every stage holds the same number of layers)")
    return num_layers // pipeline


def expert_data_parallel_size(data_parallel: int, expert_parallel: int, num_experts: Optional[int]) -> int:
    """Ranks holding the same experts: the data-parallel ranks divided by the expert-parallel size
    (each expert-parallel group of a data-parallel group holds every expert once)."""
    if expert_parallel == 1:
        return data_parallel
    if num_experts is None:
        raise ValueError(f"--expert-model-parallel-size {expert_parallel} needs --num-experts")
    if num_experts % expert_parallel:
        raise ValueError(f"--expert-model-parallel-size {expert_parallel} does not divide --num-experts {num_experts} "
                         "(every rank holds the same number of experts)")
    if data_parallel % expert_parallel:
        raise ValueError(f"--expert-model-parallel-size {expert_parallel} does not divide the data-parallel size "
                         f"{data_parallel} (experts are spread over data-parallel ranks)")
    return data_parallel // expert_parallel


# The ZeRO stages DeepSpeed runs with pipeline stages (its pipeline engine, and our trainer's
# schedules: ZeRO 2/3 reduce inside DeepSpeed's own backward) and with experts spread over ranks
# (DeepSpeed partitions its MoE parameters up to ZeRO 2).
PIPELINE_ZERO_STAGES = (0, 1)
EXPERT_ZERO_STAGES = (0, 1, 2)


def layout_engine_problem(pipeline: int, expert: int, zero_stage: int, precision: str,
                          cpu_offload: bool) -> Optional[str]:
    """Why DeepSpeed cannot run a pipeline- or expert-parallel layout with these engine settings
    (None: it can). Our trainer drives pipeline stages with megatron-core's schedules inside one
    DeepSpeed engine per stage; docs/parallelism.md says why each rule holds."""
    if pipeline > 1 and zero_stage not in PIPELINE_ZERO_STAGES:
        return (f"--pipeline-model-parallel-size {pipeline} runs with --zero-stage 0 or 1, not {zero_stage} "
                "(ZeRO 2/3 reduce gradients inside DeepSpeed's own backward, which the pipeline schedule replaces)")
    if expert > 1 and zero_stage not in EXPERT_ZERO_STAGES:
        return (f"--expert-model-parallel-size {expert} runs with --zero-stage 0, 1 or 2, not 3 (DeepSpeed "
                "partitions expert parameters only up to ZeRO 2)")
    if pipeline > 1 and precision == "fp16":
        return (f"--pipeline-model-parallel-size {pipeline} with --fp16: not supported (the loss scale is not "
                "carried through the pipeline schedule); use --bf16")
    dims = " and ".join(f for f, n in (("--pipeline-model-parallel-size", pipeline),
                                       ("--expert-model-parallel-size", expert)) if n > 1)
    if dims and precision != "fp32" and zero_stage == 0:
        return (f"{dims} with --{precision} needs --zero-stage 1 or more (DeepSpeed's mixed-precision optimizer "
                "without ZeRO computes its gradient norm per pipeline stage and leaves out the experts)")
    if dims and cpu_offload:
        return f"{dims} with --cpu-optimizer: not supported (ZeRO-Offload is not tested with these layouts)"
    return None


def batch_sizes(micro_batch: int, global_batch: Optional[int], accumulation: Optional[int],
                data_parallel: int) -> Tuple[int, int]:
    """``(global batch, gradient accumulation steps)``: the global batch defaults to one micro batch
    per data-parallel rank times the accumulation (1 when not given); both given must agree."""
    per_step = micro_batch * data_parallel
    if global_batch is None:
        global_batch = per_step * (accumulation or 1)
    if global_batch % per_step:
        raise ValueError(f"--global-batch-size {global_batch} is not divisible by data-parallel size "
                         f"{data_parallel} x --micro-batch-size {micro_batch}")
    derived = global_batch // per_step
    if accumulation not in (None, derived):
        raise ValueError(f"--gradient-accumulation-steps {accumulation} disagrees with --global-batch-size "
                         f"{global_batch} / (data-parallel size {data_parallel} x --micro-batch-size "
                         f"{micro_batch}) = {derived}")
    return global_batch, derived


def train_iterations(train_iters: Optional[int], train_samples: Optional[int], train_tokens: Optional[int],
                     global_batch: int, seq_length: int) -> Tuple[Optional[int], List[str]]:
    """``(iterations, notes)``: iterations win, then samples, then tokens, each rounding down (the
    notes say how many were dropped, or which flags lost). ``(None, [])`` when no length is given."""
    tokens_per_iter = global_batch * seq_length
    if train_iters is not None:
        return train_iters, [f"--train-iters {train_iters} wins over {flag} {value}" for flag, value in
                             (("--train-samples", train_samples), ("--train-tokens", train_tokens)) if value is not None]
    if train_samples is not None:
        iters, unit, per_iter, given = train_samples // global_batch, "samples", global_batch, \
            f"--train-samples {train_samples}"
        formula = f"{train_samples} // {global_batch}"
        total = train_samples
    elif train_tokens is not None:
        iters, unit, per_iter, given = train_tokens // tokens_per_iter, "tokens", tokens_per_iter, \
            f"--train-tokens {train_tokens}"
        formula = f"{train_tokens} // ({seq_length} x {global_batch})"
        total = train_tokens
    else:
        return None, []
    if iters < 1:
        raise ValueError(f"training length is shorter than one iteration of {global_batch} samples x "
                         f"{seq_length} tokens")
    trained = iters * per_iter
    return iters, [f"{given} -> --train-iters = {formula} = {iters} ({trained} {unit} trained, "
                   f"{total - trained} dropped by rounding)"]


def rank_groups(world_size: int, tensor: int = 1, pipeline: int = 1, expert: int = 1) -> dict:
    """The ranks of every parallel group of a layout, as megatron-core forms them when the trainer
    initialises it (its ``RankGenerator`` with ``initialize_model_parallel``'s default order, TP
    fastest, PP slowest): ``{"tp"|"pp"|"dp"|"ep"|"edp": [[rank, ...], ...]}``, where ``edp`` is
    expert-data-parallel. The sizes must already be valid (``data_parallel_size``,
    ``expert_data_parallel_size``)."""
    import inspect

    from megatron.core import parallel_state as ps

    order = inspect.signature(ps.initialize_model_parallel).parameters["order"].default
    data = data_parallel_size(world_size, tensor, pipeline)
    dense = ps.RankGenerator(tp=tensor, ep=1, dp=data, pp=pipeline, cp=1, order=order)
    experts = ps.RankGenerator(tp=tensor, ep=expert, dp=data // expert, pp=pipeline, cp=1, order=order)
    return {"tp": dense.get_ranks("tp"), "pp": dense.get_ranks("pp"), "dp": dense.get_ranks("dp"),
            "ep": experts.get_ranks("ep"), "edp": experts.get_ranks("dp")}
