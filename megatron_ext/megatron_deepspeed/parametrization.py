"""Our init and parametrization (``--parametrization sp|mup|completep``, ``--init-method-std auto``,
``--adjust-word-embedding-init``, ``--output-layer-init-std``) on the model the fork built.

The fork's model is not megatron-core's, so the parametrization's numbers are applied here:

* **Init.** The fork draws the word embeddings and the untied output layer with the hidden init
  (its ``--adjust-word-embedding-init`` never reaches the embedding) and the blocks' output
  projections at std/sqrt(2 layers). Each family whose std differs from what our parametrization
  asks is redrawn from N(0, std): the whole (unsharded) tensor from a generator seeded by
  ``--seed`` and the parameter's name, then this rank's tensor-parallel shard (SwiGLU's fused
  ``[gate; up]`` sharded as the fork shards it: ``[gate_r; up_r]`` on rank r), so the result does
  not depend on the TP or PP size (DeepSpeed-MoE experts: see ``_redraw_key``; under ZeRO 3 each
  parameter is gathered whole for it). Families the fork already drew right are left alone
  (standard parametrization with default flags changes nothing).
* **Output logits x l.** The fork computes logits from ``output_layer.weight`` directly (a forward
  hook on the output layer never fires), so the final norm's output is scaled instead (logits are
  linear in it, tied or untied; for ``GPTModelPipe`` the bare ``N.weight`` norm, on the last
  pipeline stage only).
* **Residual branches x r** (CompleteP): forward hooks on every layer's ``self_attention`` and
  ``mlp`` scale their (output, bias) before the fork adds them to the residual stream (for
  DeepSpeed-MoE, the output only, not its auxiliary loss).
* **Attention scale.** The fork's ``CoreAttention`` divides scores by ``norm_factor`` (times the
  layer number with query-key layer scaling, which its softmax multiplies back) and its flash
  attention modules take ``softmax_scale``: both are set so the scores get our scale.

Each hook counts its calls (``Applied.calls``): ``megatron_ext/megatron_deepspeed`` reports them at
the end of training, which shows the multipliers acted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import zlib
from collections import Counter
from typing import Dict, List, Optional

import torch

from megatron_ext.megatron_deepspeed import names, project_api
from megatron_ext.megatron_deepspeed.errors import ActivationError


@dataclasses.dataclass
class Applied:
    """What was done to the model (reported, and read by the tests)."""

    redrawn: Dict[str, float] = dataclasses.field(default_factory=dict)  # family -> std
    measured_std: Dict[str, float] = dataclasses.field(default_factory=dict)  # family -> std after init
    logit_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    softmax_scale: Optional[float] = None
    attention_modules: int = 0
    calls: Counter = dataclasses.field(default_factory=Counter)  # hook -> forward calls
    handles: List = dataclasses.field(default_factory=list)

    def report(self) -> dict:
        return {"redrawn": self.redrawn, "measured_std": self.measured_std,
                "logit_multiplier": self.logit_multiplier, "residual_multiplier": self.residual_multiplier,
                "softmax_scale": self.softmax_scale, "attention_modules": self.attention_modules,
                "hook_calls": dict(self.calls)}


def family_of(core: str) -> Optional[str]:
    """Our init family of a megatron-core parameter name (None: norms, biases, routers keep theirs)."""
    return project_api.init_family(core) or None


def fork_stds(args) -> Dict[str, float]:
    """The stds the fork drew each family with (its ``language_model.py`` / ``utils.py``)."""
    std = float(args.init_method_std)
    return {"embedding": std, "hidden": std, "output_projection": std / math.sqrt(2.0 * args.num_layers),
            "output_layer": std}


def apply(models, args, parametrization) -> Applied:
    """Init, forward multipliers and attention scale of ``parametrization`` on the fork's models."""
    if getattr(args, "init_method_xavier_uniform", False):
        raise ActivationError("--init-method-xavier-uniform: megatron_ext's init (MEGATRON_EXT_PLUGINS=all or "
                              "--parametrization) draws normal weights; drop the flag or use MEGATRON_EXT_PLUGINS=new")
    applied = Applied()
    stds = parametrization.init_stds()
    theirs = fork_stds(args)
    for model in models:
        try:
            entries = names.core_names(model.named_parameters())
        except names.UnknownParameterError as e:
            raise ActivationError(str(e)) from None
        pipeline = names.is_pipeline_model(n for n, _, _ in entries)
        sums: Dict[str, List[float]] = {}
        for fork, core, param in entries:
            family = family_of(core)
            if family is None:
                continue
            if family == "output_layer" and not args.untie_embeddings_and_output_weights:
                continue  # tied: the embedding is the output layer
            with _whole(param):
                if not math.isclose(stds[family], theirs[family], rel_tol=1e-9):
                    gate_up = args.swiglu and core.rsplit(".", 2)[-2] == "linear_fc1"
                    redraw(param, stds[family], args.seed, _redraw_key(fork, param),
                           _tp_layout(param), 2 if gate_up else 1)
                    applied.redrawn[family] = stds[family]
                total = sums.setdefault(family, [0.0, 0.0])
                total[0] += float(param.detach().double().pow(2).sum())
                total[1] += param.numel()
        applied.measured_std.update({f: math.sqrt(s / n) for f, (s, n) in sums.items() if n})
        final_norms = [fork.rsplit(".", 1)[0] for fork, core, _ in entries if core == "decoder.final_layernorm.weight"]
        if not final_norms and not pipeline:
            raise ActivationError("--parametrization: the fork's model has no language_model.encoder.final_layernorm "
                                  "to scale the logits at")
        _attach(model, parametrization, applied, final_norms)  # a pipeline stage before the last has none
    return applied


@torch.no_grad()
def redraw(param: torch.Tensor, std: float, seed: int, name: str, tp=(0, 0, 1), stride: int = 1) -> None:
    """N(0, std) for ``param``: the whole tensor drawn from a generator keyed by seed and name, then
    this rank's tensor-parallel shard of it (``tp``: partition dim, rank, size); with ``stride`` 2
    the whole tensor is two fused halves, each sharded alike (SwiGLU's [gate; up])."""
    dim, rank, world = tp
    shape = list(param.shape)
    shape[dim] *= world
    gen = torch.Generator(device="cpu")
    gen.manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
    full = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
    if world > 1:
        piece = param.shape[dim] // stride
        full = torch.cat([part.narrow(dim, rank * piece, piece) for part in full.chunk(stride, dim=dim)], dim=dim)
    param.copy_(full.to(dtype=param.dtype, device=param.device))


def _whole(param):
    """The parameter's whole (tensor-parallel) tensor for the body: under ZeRO 3 (the fork builds the
    model inside ``deepspeed.zero.Init``) each rank holds an empty placeholder and a slice; gathered
    one parameter at a time, and the first rank's result partitioned again (every rank draws the same)."""
    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=0)


def _is_expert(param) -> bool:
    return getattr(param, "allreduce", True) is False  # DeepSpeed-MoE's mark (deepspeed.moe.utils.is_moe_param)


def _tp_layout(param):
    """(partition dim, rank, size) of ``param``'s tensor-parallel sharding (DeepSpeed-MoE experts
    without expert tensor parallelism are whole: ``layouts.mark_whole_experts``)."""
    if not project_api.is_tensor_parallel(param):
        return 0, 0, 1
    from megatron.core import parallel_state as ps  # the fork's own (vendored) megatron.core

    return int(param.partition_dim), ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def _redraw_key(fork: str, param) -> str:
    """What ``param`` is redrawn by: its name, and for a DeepSpeed-MoE expert also the data-parallel
    rank. The fork names experts by their index on the rank (``deepspeed_experts.0`` on every
    expert-parallel rank), so the name alone would give every rank the same experts; DeepSpeed
    broadcasts each expert from the first rank of its expert-data-parallel group when the engine
    starts (its expert groups do not exist before), so the copies agree again."""
    if not _is_expert(param):
        return fork
    from megatron.core import parallel_state as ps

    return f"{fork}/data-parallel-rank-{ps.get_data_parallel_rank()}"


# -- forward multipliers ------------------------------------------------------------------------


def _counted(applied: Applied, key: str, fn):
    def hook(*a):
        applied.calls[key] += 1
        return fn(*a)

    return hook


def _scale_output(multiplier: float, moe: bool):
    def hook(module, inputs, output):
        if isinstance(output, tuple):
            first = output[0] * multiplier
            if moe:  # (output, auxiliary loss, expert counts): only the output is the branch
                return (first, *output[1:])
            rest = tuple(x * multiplier if torch.is_tensor(x) else x for x in output[1:2])  # the bias
            return (first, *rest, *output[2:])
        return output * multiplier

    return hook


def _attach(model, parametrization, applied: Applied, final_norms: List[str]) -> None:
    logit, residual = parametrization.logit_multiplier(), parametrization.residual_multiplier()
    scale = parametrization.softmax_scale()
    applied.logit_multiplier, applied.residual_multiplier, applied.softmax_scale = logit, residual, scale
    modules = dict(model.named_modules())
    if logit != 1.0:
        for name in final_norms:
            applied.handles.append(modules[name].register_forward_hook(
                _counted(applied, "logits", _scale_output(logit, False))))
    if residual != 1.0:
        for name, module in modules.items():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("self_attention", "mlp") and _is_layer_branch(name):
                moe = type(module).__name__ == "MoE"
                applied.handles.append(module.register_forward_hook(
                    _counted(applied, f"residual_{leaf}", _scale_output(residual, moe))))
    if scale is not None:
        for module in modules.values():
            if hasattr(module, "norm_factor") and hasattr(module, "hidden_size_per_attention_head"):
                coeff = module.layer_number if getattr(module, "apply_query_key_layer_scaling", False) else 1.0
                module.norm_factor = coeff / scale  # scores * coeff / norm_factor after the softmax's coeff
                applied.attention_modules += 1
            elif hasattr(module, "softmax_scale") and type(module).__name__.startswith("FlashSelfAttention"):
                module.softmax_scale = scale
                applied.attention_modules += 1


def _is_layer_branch(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and (parts[-2].isdigit() or "layers" in parts)
