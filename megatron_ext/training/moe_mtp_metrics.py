"""The auxiliary training losses of MoE and MTP models, and per-expert load, for the log.

megatron-core adds the MoE load-balancing / z-loss and the MTP loss to the gradient, not to the
returned LM loss: each is attached to an activation through an autograd function
(``MoEAuxLossAutoScaler``, ``MTPLossAutoScaler``) whose backward feeds the loss a gradient of
``main_loss_backward_scale``. That scale must equal the gradient the LM loss receives, which under
DeepSpeed is 1/accumulation steps (times the fp16 loss scale); ``AuxiliaryLosses.attach`` reads it
from the LM loss's own gradient. The logged LM loss therefore stays the pure next-token loss.

megatron-core records the (unweighted) auxiliary losses per layer in its trackers on every training
forward; ``collect`` averages them over the micro-batches since the last log, the data-parallel
ranks and the MoE layers (Megatron's ``load_balancing_loss``, ``z_loss``, ``mtp_N loss``).
Expert load is counted here from each router's routing map: tokens sent to each expert of each MoE
layer, summed over the data-parallel ranks and the iterations since the last log.
"""
from __future__ import annotations

from typing import Dict, List

import torch

# megatron-core tracker name -> metrics.jsonl key
_MOE_TRACKED = {"load_balancing_loss": "moe_aux_loss", "seq_load_balancing_loss": "moe_aux_loss",
                "z_loss": "moe_z_loss"}


class AuxiliaryLosses:
    def __init__(self, model: torch.nn.Module, args):
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
        from megatron.core.transformer.moe.router import TopKRouter
        from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        # megatron-core keeps these trackers in module globals, sized by the first model that
        # logged into them: a second run in the same process (a sweep, a notebook) starts them anew.
        # So does the MoE loss scale, which it copies into the tensor it kept first (a scalar here,
        # shape [1] from megatron-core's pipeline schedule).
        get_moe_layer_wise_logging_tracker().clear()
        MTPLossLoggingHelper.tracker.clear()
        MoEAuxLossAutoScaler.main_loss_backward_scale = None
        self.moe = args.num_experts is not None
        self.mtp = args.mtp_num_layers is not None
        self.routers: List[str] = []
        self.biases: List[torch.nn.Module] = []
        self.load = None
        self.handles = []
        if not self.moe:
            return
        routers = [(name, m) for name, m in model.named_modules() if isinstance(m, TopKRouter)]
        self.routers = [name.rsplit(".mlp.router", 1)[0] for name, _ in routers]  # decoder.layers.1, mtp.layers.0
        self.biases = [m for _, m in routers] if args.moe_router_enable_expert_bias else []
        device = next(model.parameters()).device
        self.load = torch.zeros(len(routers), args.num_experts, dtype=torch.long, device=device)
        for index, (_, router) in enumerate(routers):
            self.handles.append(router.register_forward_hook(self._count(index)))

    def _count(self, index: int):
        def hook(module, inputs, output):
            # Training forwards with autograd only: evaluation runs under no_grad, and full
            # activation recomputation runs each layer twice, once without and once with grad.
            if module.training and torch.is_grad_enabled():
                _, routing_map = output
                self.load[index] += routing_map.sum(dim=0).to(torch.long)

        return hook

    @property
    def enabled(self) -> bool:
        return self.moe or self.mtp

    def attach(self, loss: torch.Tensor) -> None:
        """Give megatron-core's auxiliary losses the gradient scale the LM ``loss`` receives in this backward."""
        if not self.enabled or not loss.requires_grad:
            return

        def set_scale(grad):
            from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
            from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

            scale = grad.detach().clone()  # MoE's setter copies into the tensor it keeps
            MoEAuxLossAutoScaler.set_loss_scale(scale)
            MTPLossAutoScaler.set_loss_scale(scale.clone())
            return grad

        loss.register_hook(set_scale)

    def collect(self, micro_batches: int) -> Dict[str, object]:
        """metrics.jsonl fields for the ``micro_batches`` training micro-batches (per rank) since the
        last call; resets the trackers and counts. Every rank must call it. Under pipeline
        parallelism each stage holds its own MoE layers (and the last the MTP layers): each stage's
        part, summed over its data-parallel ranks, is gathered over the pipeline group."""
        if not self.enabled:
            return {}
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker
        from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

        group, dp = ps.get_data_parallel_group(), ps.get_data_parallel_world_size()
        stage: Dict[str, object] = {"routers": len(self.routers), "losses": {}}
        if self.moe:
            tracker = get_moe_layer_wise_logging_tracker()
            for name in sorted(tracker):
                values = tracker[name]["values"].detach().float().clone()
                torch.distributed.all_reduce(values, group=group)  # gloo has no AVG: sum, then divide
                key = _MOE_TRACKED.get(name, f"moe_{name}")
                stage["losses"][key] = stage["losses"].get(key, 0.0) + values.sum().item()
            clear_aux_losses_tracker()
            load = self.load.clone()
            torch.distributed.all_reduce(load, group=group)
            stage["expert_load"] = {name: row.tolist() for name, row in zip(self.routers, load)}
            self.load.zero_()
            if self.biases:  # --moe-router-enable-expert-bias: the bias after the last optimizer step
                stage["expert_bias"] = {name: router.expert_bias.tolist()
                                        for name, router in zip(self.routers, self.biases)}
        if self.mtp and "values" in MTPLossLoggingHelper.tracker:
            values = MTPLossLoggingHelper.tracker["values"].detach().float().clone()
            torch.distributed.all_reduce(values, group=group)
            stage["mtp_losses"] = (values / (max(micro_batches, 1) * dp)).tolist()
            MTPLossLoggingHelper.tracker["values"].zero_()
        stages = [stage]
        if ps.get_pipeline_model_parallel_world_size() > 1:
            stages = [None] * ps.get_pipeline_model_parallel_world_size()
            torch.distributed.all_gather_object(stages, stage, group=ps.get_pipeline_model_parallel_group())
        return _merged(stages, max(micro_batches, 1) * dp)


def _merged(stages: List[dict], denominator: int) -> Dict[str, object]:
    """The record of the whole model from its pipeline stages' parts (in stage order)."""
    record: Dict[str, object] = {}
    routers = sum(part["routers"] for part in stages)
    for part in stages:
        for key, total in part["losses"].items():
            record[key] = record.get(key, 0.0) + total / routers / denominator
    for key in ("expert_load", "expert_bias"):
        if any(key in part for part in stages):
            record[key] = {name: row for part in stages for name, row in part.get(key, {}).items()}
    per_depth = next((part["mtp_losses"] for part in stages if "mtp_losses" in part), None)
    if per_depth is not None:
        record["mtp_loss"] = sum(per_depth) / len(per_depth)
        record["mtp_losses"] = per_depth
    return record


def log_line_fields(record: dict) -> str:
    """The auxiliary losses and expert load in the Megatron log line (empty for a dense model)."""
    out = ""
    if "moe_aux_loss" in record:
        out += f" load_balancing_loss={record['moe_aux_loss']:.6E} |"
    if "moe_z_loss" in record:
        out += f" z_loss={record['moe_z_loss']:.6E} |"
    for depth, value in enumerate(record.get("mtp_losses", ()), start=1):
        out += f" mtp_{depth} loss={value:.6E} |"
    if record.get("expert_load"):
        out += f" expert_load_max/mean={expert_load_imbalance(record['expert_load']):.3f} |"
    return out


def expert_load_imbalance(expert_load: Dict[str, List[int]]) -> float:
    """The most loaded expert's tokens over the mean, worst MoE layer (1.0 = perfectly balanced)."""
    worst = 0.0
    for counts in expert_load.values():
        mean = sum(counts) / len(counts)
        worst = max(worst, max(counts) / mean if mean else 0.0)
    return worst
