"""Mixture of experts (MoE) and multi-token prediction (MTP): the flags (Megatron-LM's names), their
checks, and what they set in megatron-core's ``TransformerConfig`` (the layer specs follow it:
``models.specs.base_layer_specs``).

At expert-parallel size 1 the experts are ordinary data-parallel parameters (megatron-core's
all-gather dispatcher); with ``--expert-model-parallel-size`` each rank holds its share of every
MoE layer's experts and tokens travel to them through megatron-core's all-to-all dispatcher (their
gradients reduce over the expert-data-parallel group: training/expert_parallel.py). megatron-core's
MoE with tensor parallelism needs sequence parallelism, which this trainer does not have, so MoE
runs at tensor-parallel size 1. See docs/moe_mtp.md and docs/parallelism.md.
"""
from __future__ import annotations

import argparse
import ast
from typing import List, Optional

from megatron_ext.argtypes import choice_ci, nonneg_float, positive_float, positive_int
from megatron_ext.models.feature import Feature, Support, saved_value

# (global_aux_loss is left out: its router state needs a reset after every optimizer step.)
LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "sinkhorn", "none")

# Destinations of the MoE flags that mean nothing without --num-experts (all default None).
MOE_ONLY = ("moe_router_topk", "moe_ffn_hidden_size", "moe_aux_loss_coeff", "moe_z_loss_coeff",
            "moe_router_load_balancing_type", "moe_router_dtype", "moe_router_score_function",
            "moe_router_topk_scaling_factor", "moe_layer_freq", "moe_first_k_dense",
            "moe_shared_expert_intermediate_size", "moe_router_bias_update_rate", "moe_router_num_groups",
            "moe_router_group_topk")
MOE_SWITCHES = ("moe_router_pre_softmax", "moe_router_enable_expert_bias", "moe_shared_expert_overlap")


def moe_layer_freq(value: str):
    """Megatron's ``--moe-layer-freq``: N (one MoE layer every N layers, starting with the first)
    or a 0/1 pattern with one entry per layer, written as a list expression: ``[0,1,1,1]`` or
    ``([0]*1+[1]*3)``. Parsed with ``ast``, never ``eval``."""
    try:
        return positive_int(value)
    except argparse.ArgumentTypeError:
        pass
    try:
        pattern = _int_list(ast.parse(value.strip(), mode="eval").body)
    except (SyntaxError, ValueError):
        raise argparse.ArgumentTypeError(
            f"expected N or a 0/1 list like [0,1,1,1] or ([0]*1+[1]*3), got {value!r}") from None
    if not pattern or any(v not in (0, 1) for v in pattern):
        raise argparse.ArgumentTypeError(f"the pattern must be a non-empty list of 0 (dense) and 1 (MoE), got {value!r}")
    return pattern


def _int_list(node) -> List[int]:
    if isinstance(node, ast.List):
        values = [n.value for n in node.elts if isinstance(n, ast.Constant) and type(n.value) is int]
        if len(values) != len(node.elts):
            raise ValueError
        return values
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _int_list(node.left) + _int_list(node.right)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        count = node.right if isinstance(node.left, ast.List) else node.left
        items = node.left if isinstance(node.left, ast.List) else node.right
        if not (isinstance(count, ast.Constant) and type(count.value) is int and 0 <= count.value <= 100_000):
            raise ValueError
        return _int_list(items) * count.value
    raise ValueError


# The word-valued flags' types (the launcher checks its variables with them too).
VALUE_TYPES = {
    "--moe-router-dtype": choice_ci("fp32", "fp64"),
    "--moe-router-score-function": choice_ci("softmax", "sigmoid"),
    "--moe-router-load-balancing-type": choice_ci(*LOAD_BALANCING_TYPES),
    "--moe-layer-freq": moe_layer_freq,
}


def add_moe_mtp_arguments(g) -> None:
    g.add_argument("--num-experts", "--num-moe-experts", dest="num_experts", type=positive_int, default=None,
                   help="experts per MoE layer (megatron-core MoE, top-k routing); unset: dense MLP layers")
    g.add_argument("--moe-router-topk", type=positive_int, default=None,
                   help="experts each token is routed to (default 2)")
    g.add_argument("--moe-ffn-hidden-size", type=positive_int, default=None,
                   help="hidden size of each expert's MLP (default --ffn-hidden-size)")
    g.add_argument("--moe-aux-loss-coeff", type=nonneg_float, default=None,
                   help="weight of the load-balancing loss added to the training loss (default 0 as in "
                        "Megatron; 1e-2 is the usual start)")
    g.add_argument("--moe-z-loss-coeff", type=nonneg_float, default=None,
                   help="weight of the router z-loss (ST-MoE; 1e-3 is the usual start; default off)")
    g.add_argument("--moe-router-load-balancing-type", type=VALUE_TYPES["--moe-router-load-balancing-type"],
                   default=None, help="aux_loss (per micro-batch, default), seq_aux_loss (per sequence, "
                                      "DeepSeek), sinkhorn, none")
    g.add_argument("--moe-router-dtype", type=VALUE_TYPES["--moe-router-dtype"], default=None,
                   help="precision of the router logits, top-k and expert-output weighting "
                        "(default: the model's dtype)")
    g.add_argument("--moe-router-score-function", type=VALUE_TYPES["--moe-router-score-function"], default=None,
                   help="router score (default softmax)")
    g.add_argument("--moe-router-pre-softmax", action="store_true",
                   help="softmax over all experts before choosing the top-k (needed for top-1 softmax routing; "
                        "otherwise the softmax is over the chosen experts)")
    g.add_argument("--moe-router-topk-scaling-factor", type=positive_float, default=None,
                   help="expert scaling: multiply the chosen experts' weights by this (DeepSeek's "
                        "routed_scaling_factor)")
    g.add_argument("--moe-layer-freq", type=VALUE_TYPES["--moe-layer-freq"], default=None,
                   help="N: one MoE layer every N layers (default 1: all), or a per-layer 0/1 pattern "
                        "like ([0]*1+[1]*3)")
    g.add_argument("--moe-first-k-dense", "--first-k-dense-replace", dest="moe_first_k_dense", type=positive_int,
                   default=None, help="the first K layers keep a dense MLP (DeepSeek/OpenSeek first_k_dense_replace)")
    g.add_argument("--moe-shared-expert-intermediate-size", type=positive_int, default=None,
                   help="shared experts: one MLP of this width that every token passes through next to its routed "
                        "experts (number of shared experts x their width; DeepSeek n_shared_experts)")
    g.add_argument("--moe-shared-expert-overlap", action="store_true",
                   help="accepted for Megatron compatibility; refused: it overlaps the shared expert with the "
                        "all-to-all dispatcher's communication, which this trainer does not use")
    g.add_argument("--moe-router-enable-expert-bias", action="store_true",
                   help="aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for choosing "
                        "experts only, moved after every optimizer step towards balance (needs sigmoid scores)")
    g.add_argument("--moe-router-bias-update-rate", type=nonneg_float, default=None,
                   help="how far each expert bias moves per optimizer step (default 1e-3)")
    g.add_argument("--moe-router-num-groups", type=positive_int, default=None,
                   help="group-limited routing: the experts form this many equal groups (DeepSeek n_group)")
    g.add_argument("--moe-router-group-topk", type=positive_int, default=None,
                   help="group-limited routing: each token chooses its experts inside this many groups "
                        "(DeepSeek topk_group)")
    g.add_argument("--expert-model-parallel-size", type=positive_int, default=1,
                   help="expert parallelism: each MoE layer's experts are spread over this many data-parallel "
                        "ranks (it divides --num-experts and the data-parallel size; docs/parallelism.md)")
    g.add_argument("--mtp-num-layers", "--num-mtp-predictor", dest="mtp_num_layers", type=positive_int,
                   default=None, help="multi-token prediction depth: extra layers each predicting one more "
                                      "future token (OpenSeek: num_mtp_predictor)")
    g.add_argument("--mtp-loss-scaling-factor", "--mtp-loss-coeff", dest="mtp_loss_scaling_factor",
                   type=nonneg_float, default=None,
                   help="weight of the mean MTP loss added to the training loss (default 0.1; "
                        "OpenSeek: mtp_loss_coeff)")


def validate_moe_mtp_args(args) -> None:
    """Fill the MoE/MTP defaults and reject what cannot work: ValueError, one line naming the flag."""
    if args.mtp_num_layers is None and args.mtp_loss_scaling_factor is not None:
        raise ValueError("--mtp-loss-scaling-factor needs --mtp-num-layers")
    if args.mtp_num_layers is not None and args.mtp_loss_scaling_factor is None:
        args.mtp_loss_scaling_factor = 0.1
    if args.num_experts is None:
        given = [d for d in MOE_ONLY if getattr(args, d) is not None] + [d for d in MOE_SWITCHES if getattr(args, d)]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} needs --num-experts")
        return
    for dest, default in (("moe_router_topk", 2), ("moe_aux_loss_coeff", 0.0), ("moe_layer_freq", 1),
                          ("moe_router_load_balancing_type", "aux_loss"), ("moe_router_score_function", "softmax")):
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    if args.moe_ffn_hidden_size is None:
        args.moe_ffn_hidden_size = args.ffn_hidden_size
    if args.moe_router_topk > args.num_experts:
        raise ValueError(f"--moe-router-topk {args.moe_router_topk} is larger than --num-experts {args.num_experts}")
    if args.tensor_model_parallel_size != 1:
        raise ValueError(f"--num-experts with --tensor-model-parallel-size {args.tensor_model_parallel_size}: "
                         "megatron-core's MoE with tensor parallelism needs sequence parallelism, which is not "
                         "supported; use tensor-parallel size 1")
    balancing = args.moe_router_load_balancing_type
    if (args.moe_router_topk == 1 and args.moe_router_score_function == "softmax"
            and not args.moe_router_pre_softmax and balancing != "sinkhorn"):
        raise ValueError("--moe-router-topk 1 with softmax scores needs --moe-router-pre-softmax "
                         "(a softmax over the one chosen expert has zero gradient)")
    _validate_deepseek_routing(args)
    if balancing in ("sinkhorn", "none") and args.moe_aux_loss_coeff > 0:
        raise ValueError(f"--moe-aux-loss-coeff {args.moe_aux_loss_coeff:g} has no effect with "
                         f"--moe-router-load-balancing-type {balancing}; use 0 or an aux-loss type")
    if balancing == "sinkhorn" and args.moe_router_score_function != "softmax":
        raise ValueError("--moe-router-load-balancing-type sinkhorn needs --moe-router-score-function softmax")
    pattern = moe_layer_pattern(args)
    if len(pattern) != args.num_layers:
        raise ValueError(f"--moe-layer-freq has {len(pattern)} entries but --num-layers is {args.num_layers}")
    if args.moe_first_k_dense is not None and args.moe_first_k_dense >= args.num_layers:
        raise ValueError(f"--moe-first-k-dense {args.moe_first_k_dense} leaves no MoE layer of --num-layers "
                         f"{args.num_layers}")
    if not any(pattern):
        raise ValueError("--moe-layer-freq leaves no MoE layer")


def _validate_deepseek_routing(args) -> None:
    """Shared experts, aux-loss-free expert bias and group-limited routing."""
    if args.moe_shared_expert_overlap:
        raise ValueError("--moe-shared-expert-overlap: it overlaps the shared expert with the all-to-all dispatcher's "
                         "communication on a side stream, which this trainer does not use (it runs the shared expert "
                         "before the router): drop the flag")
    if args.moe_shared_expert_intermediate_size and args.add_bias_linear:
        raise ValueError("--moe-shared-expert-intermediate-size with --add-bias-linear: megatron-core's shared experts "
                         "have no biases; use --disable-bias-linear (the llama style's default)")
    if args.moe_router_enable_expert_bias:
        if args.moe_router_score_function != "sigmoid":
            raise ValueError("--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid (megatron-core "
                             "adds the bias to sigmoid scores only)")
        if args.moe_router_load_balancing_type == "sinkhorn":
            raise ValueError("--moe-router-enable-expert-bias with --moe-router-load-balancing-type sinkhorn: "
                             "sinkhorn routing ignores the expert bias")
        if args.moe_router_bias_update_rate is None:
            args.moe_router_bias_update_rate = 1e-3
    elif args.moe_router_bias_update_rate is not None:
        raise ValueError("--moe-router-bias-update-rate needs --moe-router-enable-expert-bias")
    groups, group_topk = args.moe_router_num_groups, args.moe_router_group_topk
    if (groups is None) != (group_topk is None):
        raise ValueError("group-limited routing needs both --moe-router-num-groups and --moe-router-group-topk")
    if groups is not None:
        if args.moe_router_load_balancing_type == "sinkhorn":
            raise ValueError("--moe-router-num-groups with --moe-router-load-balancing-type sinkhorn: sinkhorn "
                             "routing is not group-limited")
        if args.num_experts % groups:
            raise ValueError(f"--moe-router-num-groups {groups} does not divide --num-experts {args.num_experts}")
        if group_topk > groups:
            raise ValueError(f"--moe-router-group-topk {group_topk} is larger than --moe-router-num-groups {groups}")
        per_group = args.num_experts // groups
        if args.moe_router_topk < group_topk or args.moe_router_topk > group_topk * per_group:
            raise ValueError(f"--moe-router-topk {args.moe_router_topk} must be between --moe-router-group-topk "
                             f"{group_topk} and the experts of the chosen groups ({group_topk} x {per_group})")


def moe_layer_pattern(args) -> Optional[List[int]]:
    """Per decoder layer: 1 = MoE, 0 = dense MLP (None without --num-experts)."""
    if args.num_experts is None:
        return None
    freq = args.moe_layer_freq
    pattern = list(freq) if isinstance(freq, list) else [int(i % freq == 0) for i in range(args.num_layers)]
    k = args.moe_first_k_dense or 0
    return [0] * min(k, len(pattern)) + pattern[k:]


def config_kwargs(args) -> dict:
    """The TransformerConfig fields the MoE/MTP flags set (empty for a dense model without MTP)."""
    kwargs = {}
    if args.mtp_num_layers is not None:
        kwargs.update(mtp_num_layers=args.mtp_num_layers, mtp_loss_scaling_factor=args.mtp_loss_scaling_factor)
    if args.num_experts is not None:
        kwargs.update(
            num_moe_experts=args.num_experts,
            moe_router_topk=args.moe_router_topk,
            moe_ffn_hidden_size=args.moe_ffn_hidden_size,
            moe_aux_loss_coeff=args.moe_aux_loss_coeff,
            moe_z_loss_coeff=args.moe_z_loss_coeff,
            moe_router_load_balancing_type=args.moe_router_load_balancing_type,
            moe_router_dtype=args.moe_router_dtype,
            moe_router_score_function=args.moe_router_score_function,
            moe_router_pre_softmax=args.moe_router_pre_softmax,
            moe_router_topk_scaling_factor=args.moe_router_topk_scaling_factor,
            moe_layer_freq=moe_layer_pattern(args),
            moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
            moe_shared_expert_overlap=False,
            moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
            moe_router_bias_update_rate=args.moe_router_bias_update_rate or 1e-3,
            moe_router_num_groups=args.moe_router_num_groups,
            moe_router_group_topk=args.moe_router_group_topk,
            expert_model_parallel_size=args.expert_model_parallel_size,
            # all-gather: megatron-core's default (every rank holds every expert); all-to-all sends each
            # token to the ranks holding its experts
            moe_token_dispatcher_type="alltoall" if args.expert_model_parallel_size > 1 else "allgather",
            moe_grouped_gemm=False,  # grouped GEMM needs Transformer Engine / grouped_gemm kernels
        )
    return kwargs


def summary(args) -> str:
    """One line for the start-up table ('' for a dense model without MTP)."""
    parts = []
    if args.num_experts is not None:
        pattern = moe_layer_pattern(args)
        line = (f"MoE {args.num_experts} experts top-{args.moe_router_topk} in {sum(pattern)}/{len(pattern)} "
                f"layers (aux loss coeff {args.moe_aux_loss_coeff:g}")
        if args.moe_router_load_balancing_type != "aux_loss":
            line += f" {args.moe_router_load_balancing_type}"
        if args.moe_router_score_function != "softmax":
            line += f", {args.moe_router_score_function} scores"
        if args.moe_shared_expert_intermediate_size:
            line += f", shared expert {args.moe_shared_expert_intermediate_size}"
        if args.moe_router_enable_expert_bias:
            line += f", expert bias rate {args.moe_router_bias_update_rate:g}"
        if args.moe_router_num_groups:
            line += f", {args.moe_router_group_topk} of {args.moe_router_num_groups} groups"
        if args.expert_model_parallel_size > 1:
            line += f", expert parallel {args.expert_model_parallel_size}"
        parts.append(line + ")")
    if args.mtp_num_layers is not None:
        parts.append(f"MTP {args.mtp_num_layers} layer(s) (loss scale {args.mtp_loss_scaling_factor:g})")
    return "; ".join(parts)


def idle_expert_parameters(expert_parameters: int, args) -> int:
    """Of the model's ``expert_parameters`` (its routed experts' weights, all ranks), those a token
    does not pass through (all but its top-k experts): left out of the FLOPs per token, which count
    only the active parameters."""
    if args.num_experts is None:
        return 0
    return int(expert_parameters * (1 - args.moe_router_topk / args.num_experts))


def _not_in_the_fork(saved) -> List[str]:
    """What of the MoE / MTP settings the fork's DeepSpeed-MoE cannot compute (convert, ours -> fork):
    its experts are --ffn-hidden-size wide in every layer (--expert-interval 1), routed by DeepSpeed's
    softmax top-1 gate (weight: the expert's probability: ours with --moe-router-pre-softmax) or top-2
    gate (the two probabilities renormalised: ours without it); no shared experts, expert bias, groups,
    scaling or Sinkhorn, no MTP."""
    value = lambda name, default=None: saved_value(saved, name, default)  # noqa: E731
    uses = [f"--mtp-num-layers {value('mtp_num_layers')}"] if value("mtp_num_layers", 0) > 0 else []
    if value("num_experts", 1) <= 1:
        return uses
    topk, pre_softmax = value("moe_router_topk", 2), bool(value("moe_router_pre_softmax", False))
    freq = value("moe_layer_freq", 1)
    checks = (
        (f"--moe-router-topk {topk}", topk > 2),
        (f"--moe-router-topk 2 {'with' if pre_softmax else 'without'} --moe-router-pre-softmax", topk == 2 and pre_softmax),
        (f"--moe-router-score-function {value('moe_router_score_function')}",
         value("moe_router_score_function", "softmax") != "softmax"),
        (f"--moe-router-load-balancing-type {value('moe_router_load_balancing_type')}",
         value("moe_router_load_balancing_type") == "sinkhorn"),
        (f"--moe-ffn-hidden-size {value('moe_ffn_hidden_size')}",
         value("moe_ffn_hidden_size", value("ffn_hidden_size")) != value("ffn_hidden_size")),
        (f"--moe-layer-freq {freq}", freq != 1),
        (f"--moe-first-k-dense {value('moe_first_k_dense')}", value("moe_first_k_dense", 0) > 0),
        (f"--moe-shared-expert-intermediate-size {value('moe_shared_expert_intermediate_size')}",
         bool(value("moe_shared_expert_intermediate_size"))),
        ("--moe-router-enable-expert-bias", bool(value("moe_router_enable_expert_bias"))),
        (f"--moe-router-num-groups {value('moe_router_num_groups')}", bool(value("moe_router_num_groups"))),
        (f"--moe-router-topk-scaling-factor {value('moe_router_topk_scaling_factor')}",
         value("moe_router_topk_scaling_factor", 1.0) != 1.0),
    )
    return uses + [flag for flag, used in checks if used]


FEATURE = Feature(
    name="mixture of experts and multi-token prediction", title="mixture of experts and multi-token prediction",
    add_arguments=add_moe_mtp_arguments,
    validate=validate_moe_mtp_args,  # (needs the final --ffn-hidden-size: run after the model shape)
    config_kwargs=config_kwargs, summary=summary, row="MoE / MTP",
    # export-hf: MoE as MixtralForCausalLM or DeepseekV3ForCausalLM where one computes it (hf/config_mapping.py
    # names what does not fit); MTP layers are left out (a training aid: the next-token logits do not use them)
    # convert: DeepSpeed-MoE computes the plain top-1 / top-2 softmax MoE (_not_in_the_fork)
    convert=Support(_not_in_the_fork, "no counterpart in Megatron-DeepSpeed's DeepSpeed-MoE (top-1 or top-2 softmax "
                                      "gates over --ffn-hidden-size experts in every layer)"),
)
