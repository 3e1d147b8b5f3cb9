"""The dry run's layout block: TP x PP x EP x DP of a run plan, the devices each dimension's groups
span on this machine (hosts x NGPU_PER_HOST) and what each rank holds.

The arithmetic is the trainer's: the sizes come from the run plan (``derivations``), the groups
from ``derivations.rank_groups`` (megatron-core's own rank order); this module only words them.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

from megatron_ext import derivations

_DIMENSIONS = (("tp", "tensor"), ("pp", "pipeline"), ("ep", "expert"), ("dp", "data"), ("edp", "expert-data"))


def spell_ranks(ranks: Sequence[int]) -> str:
    """``[0, 1, 2, 3]`` -> ``0-3``; ``[0, 2, 4]`` -> ``0,2,4``; long strided lists shortened."""
    ranks = list(ranks)
    if len(ranks) > 1 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    if len(ranks) > 4:
        return f"{ranks[0]},{ranks[1]},...,{ranks[-1]} (every {ranks[1] - ranks[0]})"
    return ",".join(map(str, ranks))


def _span(groups: List[List[int]], per_host: int, hosts: int) -> str:
    spans = {len({r // per_host for r in g}) for g in groups}
    if hosts == 1:
        return "on this host"
    if spans == {1}:
        return "each inside one host"
    return f"each across {max(spans)} hosts"


def _holds_of_stage(a, stage: int, stages: int) -> str:
    per_stage = derivations.layers_per_stage(a.num_layers, stages)
    first, last = stage * per_stage, (stage + 1) * per_stage - 1
    parts = [f"layers {first}-{last}" if last > first else f"layer {first}"]
    if stage == 0:
        parts.append("the word embedding")
    if stage == stages - 1:
        parts.append("the final norm and the output layer")
        if stages > 1 and not a.untie_embeddings_and_output_weights:
            parts[-1] += " (a copy of the word embedding, tied)"
        if a.mtp_num_layers:
            parts.append(f"{a.mtp_num_layers} MTP layer(s)")
    return ", ".join(parts)


def _zero_share(zero_stage: int, data: int, expert_data: int, moe: bool, precision: str) -> str:
    state = "optimizer state" if precision == "fp32" else "optimizer state and fp32 master weights"
    if zero_stage == 0 or data == 1:
        return f"its whole {state} (no partition)"
    what = {1: state, 2: f"{state}, gradients", 3: f"{state}, gradients and weights"}[zero_stage]
    experts = f"; the experts' over expert-DP: 1/{expert_data}" if moe and expert_data != data else ""
    return f"ZeRO {zero_stage}: 1/{data} of the {what} (over DP){experts}"


def layout_rows(plan, per_host: int, hosts: int) -> List[Tuple[str, str]]:
    """(label, value) rows of the dry run's layout block for ``plan`` on ``hosts`` x ``per_host``."""
    a = plan.args
    tp, pp, ep = a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.expert_model_parallel_size
    dp, edp = plan.data_parallel_size, a.expert_data_parallel_size
    moe = bool(a.num_experts)
    groups = derivations.rank_groups(plan.world_size, tp, pp, ep)
    sizes = {"tp": tp, "pp": pp, "ep": ep, "dp": dp, "edp": edp}
    where = f"{hosts} host(s) x {per_host}" if hosts > 1 else "1 host"
    rows = [("layout", f"TP {tp} x PP {pp} x DP {dp} = {plan.world_size} ranks on {where}"
             + (f"; EP {ep} x expert-DP {edp} inside DP" if moe else ""))]
    for key, name in _DIMENSIONS:
        if (key in ("ep", "edp") and not moe) or (sizes[key] == 1 and key != "dp"):
            continue
        size, of = sizes[key], groups[key]
        rows.append((f"{name}-parallel groups",
                     f"{len(of)} of {size} rank{'s' if size > 1 else ''}, e.g. {spell_ranks(of[0])}; "
                     f"{_span(of, per_host, hosts)}"))
    shown = range(pp) if pp <= 8 else (0, 1, pp - 2, pp - 1)  # a deep pipeline: its ends
    for stage in shown:
        if pp > 8 and stage == pp - 2:
            rows.append((f"stages 2..{pp - 3}", f"{derivations.layers_per_stage(a.num_layers, pp)} layers each, "
                                                  "in order"))
        ranks = sorted(g[stage] for g in groups["pp"])
        label = f"stage {stage} (rank{'s' if len(ranks) > 1 else ''} {spell_ranks(ranks)})" if pp > 1 else "every rank"
        rows.append((label, _holds_of_stage(a, stage, pp)))
    if tp > 1:
        rows.append(("each TP rank", f"1/{tp} of every weight matrix (norms and routers whole); TP rank = rank mod {tp}"))
    if moe:
        per_rank = a.num_experts // ep
        if ep == 1:
            experts = "every expert"
        elif ep <= 8:
            experts = "; ".join(f"EP rank {e}: experts {e * per_rank}-{(e + 1) * per_rank - 1}" if per_rank > 1 else
                                f"EP rank {e}: expert {e}" for e in range(ep))
        else:
            experts = f"EP rank e: experts {per_rank}e..{per_rank}e+{per_rank - 1}"
        rows.append(("each EP rank", f"{experts} of each MoE layer ({a.num_experts} experts; EP rank = position in "
                                     f"its expert group, e.g. ranks {spell_ranks(groups['ep'][0])})"))
    rows.append(("each DP rank", _zero_share(plan.engine.zero_stage, dp, edp, moe, plan.engine.precision)))
    return rows
