"""The memory estimate: bytes per device of the most loaded rank, term by term.

A training step goes through moments that hold different things; the estimate computes the
bytes held at each and reports the largest (docs/memory_plan.md has every formula):

* start-up, under ZeRO 0 with bf16/fp16: DeepSpeed initialises the optimizer states with one step
  on fp32 zero gradients (ZeRO 1/2 also flatten the weights at start-up, but on the host when the
  device lacks the room, so that moment never decides whether a run fits);
* start of backward: weights, master weights, optimizer states, buffers, the activations of every
  micro-batch in flight and the first gradients (the logits' and the output layer's);
* end of backward: the gradients whole (ZeRO 0) or their partition and the reduce buckets, the
  activations of the other micro-batches in flight, and with recomputation the recomputed chunk;
* optimizer step: weights, master weights, gradients, states and the step's temporaries
  (DeepSpeed's flat fp32 gradient of a group, and the optimizer's own, which its plug-in declares).

DeepSpeed's rules (0.19.8): ZeRO 0 keeps torch's fp32 optimizer on the weights, or with bf16/fp16
an fp32 master copy of every weight; ZeRO 1/2 keep an fp32 master partition (even for fp32 weights:
a clone) and the gradient partition in the gradients' dtype; ZeRO 3 also partitions the weights
and keeps its flat gradient partition and a reduce bucket for the whole run. Everything ZeRO
partitions is divided by the data-parallel ranks (x SP; experts by the expert-data-parallel ranks).
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Any, Dict, List, Optional, Tuple

from megatron_ext.planning import features as F
from megatron_ext.planning.layout import Layout
from megatron_ext.models.gpt import padded_vocab_size
from megatron_ext.optimizers.common.param_groups import param_role
from megatron_ext.optimizers.common.state_memory import StepContext
from megatron_ext.optimizers.common.state_memory import describe

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything the estimate reads: the model (resolved flags), the layout, the engine."""

    args: Any  # the run plan's resolved flags (model shape, recomputation, MoE/MLA/MTP, optimizer flags)
    vocab: int  # padded vocabulary
    layout: Layout
    zero_stage: int
    precision: str  # fp32 | bf16 | fp16
    cpu_offload: bool
    micro_batch: int
    accumulation: int  # micro-batches per optimizer step on each data-parallel rank
    optimizer: Any  # the optimizer plug-in's record (its ``memory`` declaration)
    zero_config: Dict[str, Any]  # the DeepSpeed config's zero_optimization section
    backend: str  # attention kernel: sdpa | local | te
    device_kind: str  # cpu | cuda | xpu: which kernels run (score matrices, foreach updates)
    fp32_grad_accumulation: bool = False  # DeepSpeed's bf16 optimizer (ZeRO 1, data_types.grad_accum_dtype fp32)

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    @property
    def seq(self) -> int:
        return self.args.seq_length


@dataclasses.dataclass(frozen=True)
class Term:
    key: str
    label: str
    bytes: float
    formula: str


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    stage: int  # the pipeline stage of the most loaded rank
    phase: str  # when the peak happens
    terms: Tuple[Term, ...]  # what is held then; their sum is the peak
    phases: Tuple[Tuple[str, float], ...]  # every moment's total
    host_bytes: float  # ZeRO-Offload: on the host, per rank
    parameters: int  # all parameters of the model
    rank_parameters: int  # on this rank (its TP/PP/EP shard)
    in_flight: int = 1  # micro-batches whose activations this stage holds at once (1F1B: PP - stage)
    notes: Tuple[str, ...] = ()

    @property
    def total(self) -> float:
        return sum(t.bytes for t in self.terms)

    @property
    def largest(self) -> Term:
        return max(self.terms, key=lambda t: t.bytes)

    def term(self, key: str) -> float:
        return sum(t.bytes for t in self.terms if t.key == key)


# DeepSpeed 0.19.8's defaults (deepspeed/runtime/zero/config.py)
ZERO_DEFAULTS = {"reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7,
                 "stage3_param_persistence_threshold": 1e5, "stage3_max_live_parameters": 1e9,
                 "stage3_max_reuse_distance": 1e9, "contiguous_gradients": True}


def _zero(setup: Setup, key: str):
    aliases = {"stage3_prefetch_bucket_size": "prefetch_bucket_size",
               "stage3_param_persistence_threshold": "param_persistence_threshold",
               "stage3_max_live_parameters": "max_live_parameters",
               "stage3_max_reuse_distance": "max_reuse_distance"}
    z = setup.zero_config or {}
    for name in (key, aliases.get(key)):
        if name and name in z and z[name] != "auto":
            return z[name]
    if key == "overlap_comm":
        return setup.zero_stage == 3
    return ZERO_DEFAULTS[key]


def _fmt(n: float) -> str:
    """A byte count people read: 1.23 GiB, 45.6 MiB."""
    for unit, size in (("GiB", GiB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


# ---------------------------------------------------------------------------------------------
# What one rank holds
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Shard:
    """The parameters one rank holds (its TP/PP/EP shard), by role."""

    dense: float = 0
    expert: float = 0
    by_role: Dict[Tuple[str, bool], int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    hidden_shapes: Dict[Tuple[int, int], int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    largest_param: int = 0
    largest_layer: int = 0  # parameters of the largest decoder layer here (ZeRO 3 gathers a layer)
    persistent: int = 0  # ZeRO 3: parameters under the persistence threshold (kept whole)

    @property
    def total(self) -> int:
        return int(round(self.dense + self.expert))


def _stage_of(p: F.ParamTensor, layers_per_stage: int, pp: int, tied: bool) -> List[int]:
    if p.place == "embedding":
        # tied embeddings: the last stage keeps its own copy for the output layer (Megatron's rule)
        return [0] + ([pp - 1] if tied and pp > 1 and "word_embeddings" in p.name else [])
    if p.place in ("output", "mtp"):
        return [pp - 1]
    return [p.layer // layers_per_stage]


def _inventory(args, vocab: int) -> List[Tuple[F.ParamTensor, str]]:
    """(parameter, its role) of the model, computed once per model shape (a search estimates
    thousands of layouts of one model)."""

    import torch

    key = (vocab,) + tuple((k, repr(getattr(args, k, None))) for k in F.MODEL_FIELDS)
    if key not in _INVENTORIES:
        _INVENTORIES[key] = [(p, param_role(p.name, torch.empty(p.shape, device="meta")))
                             for p in F.parameters(args, vocab)]
    return _INVENTORIES[key]


_INVENTORIES: Dict[tuple, List[Tuple[F.ParamTensor, str]]] = {}


def shard(setup: Setup, stage: int) -> _Shard:
    a, lay = setup.args, setup.layout
    out = _Shard()
    per_stage = a.num_layers // lay.pp
    threshold = _zero(setup, "stage3_param_persistence_threshold")
    layer_sizes: Dict[int, int] = defaultdict(int)
    for p, role in _inventory(a, setup.vocab):
        if stage not in _stage_of(p, per_stage, lay.pp, not a.untie_embeddings_and_output_weights):
            continue
        # a rank holds 1/TP of a split tensor and 1/EP of the experts (whole experts each)
        n = p.numel // (lay.tp if p.tp_dim is not None else 1)
        share = p.count / lay.ep if p.expert else p.count
        if p.expert:
            out.expert += n * share
        else:
            out.dense += n
        out.by_role[(role, p.expert)] += n * share
        out.largest_param = max(out.largest_param, n)
        if p.numel < threshold:
            out.persistent += n * share
        if p.layer is not None:
            layer_sizes[p.layer] += n * share
        if role == "hidden" and len(p.shape) == 2:
            out.hidden_shapes[p.shape] += share
    out.largest_layer = max(layer_sizes.values(), default=0)
    return out


# ---------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------

def estimate(setup: Setup) -> MemoryPlan:
    """The most loaded rank's plan (every pipeline stage is computed; the largest wins)."""
    plans = [_stage_plan(setup, s) for s in range(setup.layout.pp)]
    best = max(plans, key=lambda m: m.total)
    return best


def activation_rows(setup: Setup, stage: int) -> List[Tuple[str, float]]:
    """(what, bytes) of one micro-batch's activations on ``stage``."""
    a, lay = setup.args, setup.layout
    kernels = kernels_for(setup)
    tokens = setup.micro_batch * setup.seq / lay.sp
    per_stage = a.num_layers // lay.pp
    layers = range(stage * per_stage, (stage + 1) * per_stage)
    pattern = F.moe_pattern(a)
    rows: List[Tuple[str, float]] = []
    if stage == 0:
        rows += F.embedding_activations(a)
    if a.recompute_activations:
        chunks = math.ceil(per_stage / a.recompute_num_layers)
        rows.append((f"recomputed layers: {chunks} chunk input(s)", chunks * setup.dtype_bytes * a.hidden_size))
    else:
        dense = [i for i in layers if not pattern[i]]
        moe = [i for i in layers if pattern[i]]
        for kind, count, is_moe in (("dense", len(dense), False), ("MoE", len(moe), True)):
            if count:
                per = sum(b for _, b in F.layer_activations(a, kernels, setup.seq, is_moe))
                rows.append((f"{count} {kind} layer(s)", count * per))
    if stage == lay.pp - 1:
        rows += F.output_activations(a, kernels, setup.vocab)
        if a.mtp_num_layers:
            rows += F.mtp_activations(a, kernels, setup.seq, setup.vocab)
    return [(what, b * tokens) for what, b in rows]


def kernels_for(setup: Setup) -> F.Kernels:
    """What the attention kernel keeps: ``local`` materialises the probabilities; torch's sdpa on
    the CPU runs its math fallback (probabilities, fp32 q/k/v) when the query-key and value widths
    differ (multi-latent attention); flash/memory-efficient kernels and TE keep statistics only."""
    a = setup.args
    mla_widths_differ = a.multi_latent_attention and (a.qk_head_dim + a.qk_pos_emb_head_dim) != a.v_head_dim
    cpu_fallback = setup.backend == "sdpa" and setup.device_kind == "cpu" and mla_widths_differ
    return F.Kernels(backend=setup.backend, score_matrix=setup.backend == "local" or cpu_fallback,
                     upcast_attention=cpu_fallback, dtype_bytes=setup.dtype_bytes, tp=setup.layout.tp,
                     micro_batch=setup.micro_batch)


def _recompute_chunk(setup: Setup, stage: int) -> float:
    """Bytes of one recomputed chunk (its layers' activations for one micro-batch), rebuilt in backward."""
    a = setup.args
    if not a.recompute_activations:
        return 0.0
    kernels = kernels_for(setup)
    per_stage = a.num_layers // setup.layout.pp
    pattern = F.moe_pattern(a)[stage * per_stage:(stage + 1) * per_stage]
    per_layer = max(sum(b for _, b in F.layer_activations(a, kernels, setup.seq, bool(m))) for m in set(pattern))
    return min(a.recompute_num_layers, per_stage) * per_layer * setup.micro_batch * setup.seq / setup.layout.sp


def _stage_plan(setup: Setup, stage: int) -> MemoryPlan:
    a, lay, z = setup.args, setup.layout, setup.zero_stage
    p = setup.dtype_bytes
    low = setup.precision != "fp32"
    sh = shard(setup, stage)
    D, De = lay.zero_ranks, lay.expert_zero_ranks

    def part(dense: float, expert: float) -> float:  # what ZeRO partitions, on this rank
        return dense / D + expert / De if z >= 1 else dense + expert

    phi = sh.total
    phi_part = part(sh.dense, sh.expert)
    memory = getattr(setup.optimizer, "memory", None)
    notes: List[str] = []

    # -- weights, master weights, gradients ------------------------------------------------------
    bf16_optimizer = setup.fp32_grad_accumulation and low and z == 1 and not setup.cpu_offload
    grad_bytes = 4 if setup.fp32_grad_accumulation and low else p
    if z == 3:
        weights = Term("weights", "weights (ZeRO 3 partition)", phi_part * p,
                       f"{phi:,} params / {D} ranks x {p} B")
    else:
        weights = Term("weights", "weights", phi * p, f"{phi:,} params x {p} B ({setup.precision})")
    if z >= 1 or low:
        master_n = phi_part if z >= 1 else phi
        master = Term("master", "fp32 master weights", master_n * 4,
                      f"{int(master_n):,} x 4 B" + (f" ({phi:,} / {D} ranks)" if z >= 1 and D > 1 else ""))
    else:
        master = Term("master", "fp32 master weights", 0.0, "none (fp32 weights, ZeRO 0: the optimizer steps them)")

    if z == 0:
        grads = Term("gradients", "gradients", phi * p, f"{phi:,} x {p} B, whole on every rank")
    elif bf16_optimizer:
        grads = Term("gradients", "gradients (fp32, whole)", phi * 4,
                     f"{phi:,} x 4 B (DeepSpeed's bf16 optimizer keeps fp32 gradients of every weight)")
    elif z == 2 and D > 1:  # its partition buffer holds whole the weights that straddle its edges
        grads = Term("gradients", "gradient partition", (phi_part + sh.largest_param) * grad_bytes,
                     f"({phi:,} / {D} ranks + a straddling weight {sh.largest_param:,}) x {grad_bytes} B")
    else:
        grads = Term("gradients", "gradient partition", phi_part * grad_bytes,
                     f"{phi:,} / {D} ranks x {grad_bytes} B")

    # -- optimizer states ----------------------------------------------------------------------
    if memory is None:
        notes.append(f"--optimizer {getattr(setup.optimizer, 'name', '?')} declares no memory: its states are taken "
                     "as Adam's (2 fp32 per parameter)")
        state_of = lambda args, role: 2.0  # noqa: E731
    else:
        state_of = memory.state
    elementwise = 0.0
    for (role, expert), n in sh.by_role.items():
        per = state_of(a, role)
        elementwise += per * (n / (De if expert else D) if z >= 1 else n)
    matrix = 0.0
    if memory is not None and memory.matrix_state is not None:
        matrix = sum(count * memory.matrix_state(a, r, c) for (r, c), count in sh.hidden_shapes.items())
    states_formula = f"{elementwise:,.0f} element-wise x 4 B"
    if matrix:
        states_formula += f" + {matrix:,.0f} per-matrix x 4 B (every data-parallel rank)"

    roles = {role: n for (role, _), n in sh.by_role.items()}
    states = Term("states", f"optimizer states ({describe(memory, a, roles)})", (elementwise + matrix) * 4,
                  states_formula)

    host = 0.0
    if setup.cpu_offload:  # ZeRO-Offload: master, states and the fp32 gradient partition live on the host
        host = master.bytes + states.bytes + phi_part * 4
        master = Term("master", master.label, 0.0, "on the host (ZeRO-Offload)")
        states = Term("states", states.label, 0.0, "on the host (ZeRO-Offload)")
        grads = Term("gradients", "gradient staging buffer", sh.largest_param * p * 2,
                     f"largest parameter {sh.largest_param:,} x {p} B x 2 (gradients go to the host)")

    # -- DeepSpeed's buffers ---------------------------------------------------------------------
    bucket_n = int(_zero(setup, "reduce_bucket_size"))
    buckets = 0.0
    bucket_formula = ""
    if z in (1, 2) and not bf16_optimizer and _zero(setup, "contiguous_gradients"):
        copies = 2 if _zero(setup, "overlap_comm") else 1
        buckets = bucket_n * grad_bytes * copies
        bucket_formula = f"reduce_bucket_size {bucket_n:,} x {grad_bytes} B" + (" x 2 (overlap_comm)" if copies > 1 else "")
    elif z == 3:
        buckets = bucket_n * grad_bytes
        bucket_formula = f"reduce_bucket_size {bucket_n:,} x {grad_bytes} B"
    bucket_term = Term("buffers", "DeepSpeed reduce bucket", buckets, bucket_formula or "none")
    persistent_buckets = z in (2, 3)  # ZeRO 1 frees its bucket after each backward

    # ZeRO 3: the weights gathered whole. A gathered weight is kept until its reuse when that comes
    # within stage3_max_reuse_distance fetched elements (backward reuses the last layers first: with
    # the default 1e9 a model of fewer weights per rank stays gathered from forward to backward),
    # plus the layer running, the prefetch bucket, the persistent small weights and one buffer of
    # the largest weight.
    gathered = 0.0
    if z == 3:
        prefetch = int(_zero(setup, "stage3_prefetch_bucket_size"))
        reuse = int(_zero(setup, "stage3_max_reuse_distance"))
        kept = min(phi, reuse // 2)  # layer i is reused after 2 x (the layers after it) are fetched
        gathered_n = kept + sh.largest_layer + prefetch + sh.persistent + sh.largest_param
        gathered = min(gathered_n, phi + sh.largest_param) * p
    gathered_term = Term("gathered", "ZeRO 3 gathered weights", gathered,
                         f"min(weights here, stage3_max_reuse_distance / 2) + largest layer {sh.largest_layer:,} + "
                         f"prefetch + persistent + largest weight, x {p} B")

    # -- activations ---------------------------------------------------------------------------
    in_flight = min(lay.pp - stage, setup.accumulation)
    act_rows = activation_rows(setup, stage)
    per_mb = sum(b for _, b in act_rows)
    biggest = max(act_rows, key=lambda r: r[1])
    recompute = " (full recomputation: chunk inputs only)" if a.recompute_activations else ""
    activations = Term("activations", f"activations, {in_flight} micro-batch(es) in flight{recompute}",
                       per_mb * in_flight,
                       f"{_fmt(per_mb)} per micro-batch of {setup.micro_batch} x {setup.seq // lay.sp} tokens "
                       f"(largest: {biggest[0]} {_fmt(biggest[1])}) x {in_flight}")
    tokens = setup.micro_batch * setup.seq / lay.sp
    # the first gradients of backward: the logits' cast back to the model's dtype, or the output
    # layer's input and weight gradients (ZeRO 0 keeps the latter)
    out_weight = setup.vocab * a.hidden_size / lay.tp
    if stage == lay.pp - 1:
        start = max(tokens * setup.vocab / lay.tp * (p if low else 0),
                    tokens * a.hidden_size * p + (out_weight * p if z == 0 else 0))
    else:
        start = tokens * a.hidden_size * p
    chunk = _recompute_chunk(setup, stage)

    # the end of backward's transient: a recomputed chunk, or at ZeRO 0 the flat buffer DeepSpeed's
    # engine all-reduces the gradients through (its MEMORY_OPT_ALLREDUCE_SIZE, 5e8 elements), even alone
    allreduce = min(phi, 500_000_000) * grad_bytes if z == 0 and not setup.cpu_offload else 0.0
    if allreduce > chunk + start:
        end_transient = Term("transient", "gradient all-reduce buffer", allreduce,
                             f"min({phi:,}, 5e8) x {grad_bytes} B (DeepSpeed flattens the gradients to reduce them)")
    else:
        end_transient = Term("transient", "recomputed chunk" if chunk else "layer gradients", chunk + start,
                             "one chunk's activations rebuilt" if chunk else "the last layer's gradients")

    # -- the step -------------------------------------------------------------------------------

    group_sizes = defaultdict(float)
    for (role, expert), n in sh.by_role.items():
        group_sizes[role] += n / (De if expert else D) if z >= 1 else n
    largest_group = max(group_sizes.values(), default=0)
    hidden_whole = sum(n for (role, _), n in sh.by_role.items() if role == "hidden")
    foreach = setup.device_kind in ("cuda", "xpu")
    ctx = StepContext(largest_tensor=int(largest_group if z in (1, 2, 3) else sh.largest_param),
                      hidden_partition=int(group_sizes.get("hidden", 0)), hidden_whole=int(hidden_whole),
                      hidden_shapes=tuple(sh.hidden_shapes.items()), zero_stage=z, data_parallel=D, foreach=foreach)
    opt_ws = (memory.workspace(a, ctx) if memory is not None else 2 * ctx.largest_tensor) * 4
    if setup.cpu_offload:
        engine_ws, opt_ws = 0.0, 0.0
        ws_formula = "the optimizer steps on the host"
    elif z in (1, 2, 3):
        engine_ws = largest_group * 4
        ws_formula = f"DeepSpeed's fp32 flat gradient of the largest group ({int(largest_group):,} x 4 B)"
    elif z == 0 and low:
        engine_ws = phi * 4
        ws_formula = f"fp32 copies of the gradients ({phi:,} x 4 B)"
    elif z == 0:
        engine_ws = sh.largest_param * 4
        ws_formula = f"gradient-norm temporary of the largest parameter ({sh.largest_param:,} x 4 B)"
    else:
        engine_ws = 0.0
        ws_formula = ""
    workspace = Term("workspace", "optimizer step temporaries", engine_ws + opt_ws,
                     (ws_formula + " + " if ws_formula else "") + f"the optimizer's {_fmt(opt_ws)}")

    # -- the moments ---------------------------------------------------------------------------
    resident = [weights, master, states]
    # gradients held while a micro-batch runs forward: those of the micro-batches before it in the
    # step. ZeRO 1 keeps them whole in the weights' .grad until the last micro-batch reduces them
    # (then also into its partition); ZeRO 2 reduces every micro-batch into the partition; ZeRO 3
    # keeps its partition all run long.
    accumulating = setup.accumulation > 1
    whole_grads = Term("gradients", "gradients (whole, accumulating)", phi * grad_bytes,
                       f"{phi:,} x {grad_bytes} B (ZeRO 1 reduces them at the last micro-batch)")
    if z == 1 and accumulating and not bf16_optimizer and not setup.cpu_offload:
        held_grads = whole_grads
        end_grads = Term("gradients", "gradients (whole) and their partition", whole_grads.bytes + grads.bytes,
                         whole_grads.formula + " + " + grads.formula)
    elif z == 2 and accumulating and D > 1 and not setup.cpu_offload:
        # each backward releases the partition buffer while the weights' .grad still view it: the
        # next micro-batch's buffer comes next to it (measured with 2 ranks; one rank keeps one)
        held_grads = end_grads = Term("gradients", "gradient partition buffers (two while accumulating)",
                                      2 * grads.bytes, "2 x " + grads.formula)
    else:
        held_grads = grads if accumulating or z == 3 or bf16_optimizer else \
            Term("gradients", grads.label, 0.0, "none yet (allocated in backward)")
        end_grads = grads
    fb_buckets = bucket_term if (persistent_buckets or z == 1) else Term("buffers", bucket_term.label, 0.0, "none")
    phases = {
        "start of backward": resident + [held_grads, fb_buckets, gathered_term, activations,
                                         Term("transient", "first backward gradients", start,
                                              "logits' gradient in the model's dtype, or the output layer's input "
                                              "and weight gradients")],
        "end of backward": resident + [end_grads, fb_buckets, gathered_term,
                                       Term("activations", f"activations of the other {in_flight - 1} micro-batch(es)",
                                            per_mb * (in_flight - 1), f"{_fmt(per_mb)} x {in_flight - 1}"),
                                       end_transient],
        "optimizer step": resident + [grads, bucket_term if persistent_buckets else
                                      Term("buffers", bucket_term.label, 0.0, "none"), workspace],
    }
    # (ZeRO 1/2 flatten each param group at start-up, the old and the flat copy together, but on the
    # host when the device lacks the room: that moment never decides whether a run fits)
    if z == 0 and low:  # FP16_UnfusedOptimizer initialises the states with one step on zero gradients
        phases["start-up"] = [weights, master, states, Term("gradients", "fp32 zero gradients", phi * 4,
                                                            f"{phi:,} x 4 B"), workspace]
    totals = {name: sum(t.bytes for t in ts) for name, ts in phases.items()}
    peak = max(totals, key=totals.get)
    terms = tuple(t for t in phases[peak] if t.bytes > 0)
    return MemoryPlan(stage=stage, phase=peak, terms=terms, phases=tuple(totals.items()), host_bytes=host,
                      parameters=sum(t.numel * t.count for t, _ in _inventory(a, setup.vocab)), rank_parameters=phi,
                      in_flight=in_flight, notes=tuple(notes))


# ---------------------------------------------------------------------------------------------
# From a run plan
# ---------------------------------------------------------------------------------------------

ASSUMED_VOCAB = 32000  # Llama 2's, when neither a tokenizer nor --vocab-size says


def vocabulary(args, tp: int) -> Tuple[int, Optional[str]]:
    """(padded vocabulary, a note when it was assumed) of resolved flags."""

    if getattr(args, "vocab_size_unpadded", None):
        return padded_vocab_size(args.vocab_size_unpadded, args.make_vocab_size_divisible_by, tp), None
    if args.vocab_size:
        return padded_vocab_size(args.vocab_size, args.make_vocab_size_divisible_by, tp), None
    note = (f"vocabulary {ASSUMED_VOCAB} assumed (the tokenizer was not read; give --vocab-size N or "
            "--tokenizer-model)")
    return padded_vocab_size(ASSUMED_VOCAB, args.make_vocab_size_divisible_by, tp), note


def backend_for(args, device_kind: str, here: bool) -> str:
    """The attention kernel the run uses: the plan's when it runs on this machine, else what the
    request resolves to on the target device (auto/flash/fused: Transformer Engine on CUDA)."""
    if here:
        return args.attention_backend
    requested = getattr(args, "attention_backend_requested", None) or args.attention_backend
    if requested in ("local", "unfused"):
        return "local"
    if requested in ("auto", "flash", "fused", "te") and device_kind == "cuda":
        return "te"
    return "sdpa"


def setup_from_plan(plan, device_kind: str, here: bool = True, layout: Optional[Layout] = None) -> Setup:
    """The estimate's input for a run plan (``megatron_ext.plan.RunPlan``) on a device of
    ``device_kind`` (``here``: this machine, whose resolved attention backend is the plan's)."""
    a = plan.args
    lay = layout or Layout(tp=a.tensor_model_parallel_size, pp=a.pipeline_model_parallel_size,
                           ep=a.expert_model_parallel_size, sp=a.ds_sequence_parallel_size,
                           dp=plan.data_parallel_size)
    vocab, _ = vocabulary(a, lay.tp)
    grad_accum = ((plan.ds_config.get("data_types") or {}).get("grad_accum_dtype") == "fp32")
    return Setup(args=a, vocab=vocab, layout=lay, zero_stage=plan.engine.zero_stage, precision=plan.engine.precision,
                 cpu_offload=plan.engine.cpu_offload, micro_batch=a.micro_batch_size,
                 accumulation=a.gradient_accumulation_steps, optimizer=plan.plugins.get("optimizer"),
                 zero_config=dict(plan.ds_config.get("zero_optimization") or {}),
                 backend=backend_for(a, device_kind, here), device_kind=device_kind,
                 fp32_grad_accumulation=grad_accum)
