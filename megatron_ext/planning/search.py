"""Search: the layouts of a model on N devices that fit, ranked by estimated throughput.

Every combination of tensor, pipeline, expert and sequence parallel sizes, ZeRO stage, micro batch
and recomputation that divides the model and the global batch is estimated; only those a runner
runs (``layout.RUNNABLE``) and the optimizer supports (its plug-in's engine support) are kept.
Dimensions the user fixed with a flag are not searched.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Optional, Tuple

from megatron_ext.planning.layout import Layout, runnable
from megatron_ext.planning.memory import Setup, estimate
from megatron_ext.planning.report import Assessment
from megatron_ext.planning.throughput import step_time
from megatron_ext.registry import EngineSettings

MICRO_BATCHES = (1, 2, 4, 8, 16)
ZERO_STAGES = (0, 1, 2, 3)


@dataclasses.dataclass
class Searched:
    fitting: List[Assessment]
    considered: int  # layouts that divide the model and the batch
    not_runnable: int  # of those, left out because no runner runs them
    too_big: int  # runnable but over the device's memory (with the headroom)
    best_unfitting: Optional[Assessment]  # the smallest of those, to say how far off it is


def _divisors(n: int, limit: Optional[int] = None) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0 and (limit is None or d <= limit)]


def model_problem(args, layout: Layout) -> Optional[str]:
    """Why the model cannot be split this way (heads, layers, experts, sequence), or None."""
    if args.num_attention_heads % (layout.tp * layout.sp):
        return "heads"
    if not args.multi_latent_attention and args.num_key_value_heads % layout.tp:
        return "kv heads"
    if args.multi_latent_attention and (args.kv_lora_rank + args.qk_pos_emb_head_dim) % layout.tp:
        return "kv rank"
    if args.num_layers % layout.pp:
        return "layers"
    if layout.ep > 1 and (not args.num_experts or args.num_experts % layout.ep or layout.dp % layout.ep):
        return "experts"
    if args.seq_length % layout.sp:
        return "sequence"
    return None


def candidates(base: Setup, devices: int, per_node: int, fixed: Dict[str, object]) -> Iterable[Setup]:
    """Every setup of ``base``'s model and global batch on ``devices`` ranks (``fixed``: the
    dimensions the user gave: tp, pp, ep, sp, zero, micro_batch, recompute)."""
    a = base.args
    global_batch = base.micro_batch * base.accumulation * base.layout.dp
    tps = [fixed["tp"]] if "tp" in fixed else _divisors(devices, per_node)
    pps = [fixed["pp"]] if "pp" in fixed else _divisors(a.num_layers, 32)
    eps = [fixed["ep"]] if "ep" in fixed else (_divisors(a.num_experts) if a.num_experts else [1])
    sps = [fixed["sp"]] if "sp" in fixed else [1, 2, 4, 8]
    zeros = [fixed["zero"]] if "zero" in fixed else list(ZERO_STAGES)
    mbs = [fixed["micro_batch"]] if "micro_batch" in fixed else list(MICRO_BATCHES)
    recomputes = [fixed["recompute"]] if "recompute" in fixed else [False, True]
    for tp in tps:
        for pp in pps:
            for sp in sps:
                if devices % (tp * pp * sp):
                    continue
                dp = devices // (tp * pp * sp)
                for ep in eps:
                    layout = Layout(tp=tp, pp=pp, ep=ep, sp=sp, dp=dp)
                    if model_problem(a, layout):
                        continue
                    for mb in mbs:
                        if global_batch % (mb * dp):
                            continue
                        for zero in zeros:
                            for recompute in recomputes:
                                yield dataclasses.replace(
                                    base, layout=layout, zero_stage=zero, micro_batch=mb,
                                    accumulation=global_batch // (mb * dp),
                                    args=_with(a, recompute_activations=recompute,
                                               recompute_num_layers=1 if recompute else a.recompute_num_layers))


def _with(args, **changes):
    import argparse

    return argparse.Namespace(**{**{k: v for k, v in vars(args).items() if k != "_frozen"}, **changes})


def optimizer_problem(setup: Setup) -> Optional[str]:

    plugin = setup.optimizer
    if plugin is None:
        return None
    engine = EngineSettings(zero_stage=setup.zero_stage, cpu_offload=setup.cpu_offload, tensor_parallel=setup.layout.tp,
                            precision=setup.precision, pipeline_parallel=setup.layout.pp,
                            expert_parallel=setup.layout.ep)
    return plugin.engine.problem(f"--optimizer {plugin.name}", engine)


def search(base: Setup, device, devices: int, device_memory: float, train_iters: int,
           fixed: Dict[str, object], mfu: Optional[float] = None, peak_tflops: Optional[float] = None) -> Searched:
    fitting, considered, not_runnable, too_big = [], 0, 0, 0
    best_unfitting: Optional[Assessment] = None
    for setup in candidates(base, devices, device.per_node, fixed):
        considered += 1
        runner, _ = runnable(setup.layout, setup.zero_stage, moe=bool(setup.args.num_experts),
                             precision=setup.precision, cpu_offload=setup.cpu_offload)
        if runner is None or optimizer_problem(setup):
            not_runnable += 1
            continue
        a = Assessment(setup, estimate(setup), step_time(setup, device, train_iters, mfu, peak_tflops), device,
                       device_memory)
        if a.fits:
            fitting.append(a)
        else:
            too_big += 1
            if best_unfitting is None or a.memory.total < best_unfitting.memory.total:
                best_unfitting = a
    fitting.sort(key=rank_key)
    return Searched(fitting, considered, not_runnable, too_big, best_unfitting)


def rank_key(a: Assessment) -> Tuple:
    """Fastest first; among equals: less memory, fewer model-parallel ranks, lower ZeRO stage."""
    speed = -(a.time.tokens_per_second or 0.0)
    lay = a.setup.layout
    return (round(speed, 3), lay.tp * lay.pp * lay.sp, a.setup.zero_stage, -a.setup.micro_batch, a.memory.total)


def launcher_variables(a: Assessment, model: Optional[str], per_node: int) -> str:
    """The layout as ``train_alcf.sh`` variables."""
    s, lay = a.setup, a.setup.layout
    parts = []
    if model:
        parts.append(f"MODEL_ARCH={model}")
    parts.append(f"NGPU_PER_HOST={per_node}")
    parts.append(f"TP={lay.tp}")
    if lay.pp > 1:
        parts.append(f"PP={lay.pp}")
    if lay.sp > 1:
        parts.append(f"SP={lay.sp}")
    if lay.ep > 1:
        parts.append(f"EP={lay.ep}")
    parts += [f"ZERO_STAGE={s.zero_stage}", f"MICRO_BATCH={s.micro_batch}",
              f"GLOBAL_BATCH={s.micro_batch * s.accumulation * lay.dp}", f"DTYPE={s.precision}"]
    if s.args.recompute_activations:
        parts.append("USE_ACTIVATION_CHECKPOINTING=1")
    return " ".join(parts)
