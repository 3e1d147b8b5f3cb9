"""Attention backends (``--attention-backend``): which core-attention kernel the model runs, chosen
once, from the flags and the machine, by the run plan; and the layer specs that carry the choice.

* ``sdpa``: ``models.sdpa.SDPACoreAttention``, megatron-core's core-attention interface over
  ``torch.nn.functional.scaled_dot_product_attention``. torch picks the kernel: flash or
  memory-efficient attention on CUDA and XPU, a fused flash kernel on CPU; none of them builds the
  [batch, heads, seq, seq] score matrix. It is put in place of megatron-core's local
  ``DotProductAttention`` in whatever layer spec the model uses (dense, MoE, MTP, multi-latent
  attention), so parameter names and checkpoints are those of ``local``.
* ``te``: Transformer Engine's layer spec (its fused attention, and its fused norm+linear modules:
  parameter names differ from local/sdpa, see docs/attention.md). Needs ``transformer_engine``
  and CUDA; refused in one line otherwise.
* ``local``: megatron-core's unfused ``DotProductAttention`` (materialises the score matrix).
* ``auto`` (default): ``te`` on CUDA when Transformer Engine imports, otherwise ``sdpa``.

Megatron-LM's spellings are accepted: ``flash`` and ``fused`` ask for a fused kernel (as ``auto``:
te where it runs, else sdpa; with ``te`` Transformer Engine is told which of its kernels to use),
``unfused`` is ``local``. The Megatron-DeepSpeed flags ``--use-flash-attn`` (``-v1``), ``-v2``,
``-triton`` and ``-builder`` ask for flash attention: they mean ``flash``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from megatron_ext.argtypes import choice_ci
from megatron_ext.models.feature import Feature, Support, saved_value
from megatron_ext.models.specs import with_core_attention
from megatron_ext.platform.accelerator import accelerator_name

BACKENDS = ("auto", "sdpa", "te", "local")
MEGATRON_LM_SPELLINGS = ("flash", "fused", "unfused")
FLASH_FLAGS = {"use_flash_attn_v1": "--use-flash-attn", "use_flash_attn_v2": "--use-flash-attn-v2",
               "use_flash_attn_triton": "--use-flash-attn-triton", "use_flash_attn_builder": "--use-flash-attn-builder"}


def add_attention_arguments(g) -> None:
    g.add_argument("--attention-backend", type=choice_ci(*BACKENDS, *MEGATRON_LM_SPELLINGS), default="auto",
                   help="auto (default: te on CUDA when Transformer Engine imports, else sdpa), sdpa "
                        "(torch scaled_dot_product_attention: flash / memory-efficient kernels), te "
                        "(Transformer Engine layer spec), local (megatron-core's unfused attention); "
                        "Megatron-LM's flash/fused mean a fused kernel, unfused means local (docs/attention.md)")
    g.add_argument("--use-flash-attn", "--use-flash-attn-v1", dest="use_flash_attn_v1", action="store_true",
                   help="Megatron-DeepSpeed: flash attention (= --attention-backend flash)")
    for flag in ("--use-flash-attn-v2", "--use-flash-attn-triton", "--use-flash-attn-builder"):
        g.add_argument(flag, action="store_true", help="Megatron-DeepSpeed: flash attention (= --attention-backend flash)")


# -- resolving the backend -------------------------------------------------------------------
def transformer_engine_problem() -> Optional[str]:
    """Why Transformer Engine cannot run here (None: it can)."""

    if accelerator_name() != "cuda":
        return f"Transformer Engine needs a CUDA GPU (this machine's accelerator is {accelerator_name()})"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means it is not usable
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"transformer_engine is not importable ({first}); pip install transformer_engine[pytorch]"
    return None


def requested_backend(args) -> str:
    """The user's request in one word (the Megatron-DeepSpeed flash flags folded in); raises
    ValueError (one line) when the flags contradict each other."""
    requested = args.attention_backend
    flash = [flag for dest, flag in FLASH_FLAGS.items() if getattr(args, dest, False)]
    if flash:
        if requested in ("local", "unfused"):
            raise ValueError(f"{flash[0]} asks for flash attention but --attention-backend {requested} is the "
                             "unfused one; drop one of them")
        if requested == "auto":
            requested = "flash"
    return requested


def resolve(args) -> Tuple[str, str]:
    """``(backend, why)``: the backend that will run (sdpa, te or local) and the reason, for the
    start-up table. Raises ValueError (one line) when the request cannot be served here."""
    requested = requested_backend(args)
    if requested in ("sdpa", "local"):
        return requested, "requested"
    if requested == "unfused":
        return "local", "--attention-backend unfused (Megatron-LM) = megatron-core's unfused attention"
    problem = transformer_engine_problem()
    if requested == "te":
        if problem:
            raise ValueError(f"--attention-backend te: {problem}")
        return "te", "requested"
    # auto / flash / fused: the fastest that runs here
    if problem is None:
        return "te", f"{requested}: CUDA with Transformer Engine"
    return "sdpa", f"{requested}: {problem.split(';')[0]}"


def plan_fields(args) -> dict:
    """The derived fields the run plan stores: the concrete backend, the request it came from and why."""
    requested = requested_backend(args)
    backend, why = resolve(args)
    return {"attention_backend": backend, "attention_backend_requested": requested, "attention_backend_reason": why}


def backend_of(args) -> str:
    """The concrete backend of ``args`` (planned flags carry it; others are resolved the same way)."""
    if getattr(args, "attention_backend_reason", None) is not None:
        return args.attention_backend
    return resolve(args)[0]


def config_kwargs(args) -> dict:
    """TransformerConfig fields: which Transformer Engine kernel a Megatron-LM spelling asks for."""
    if backend_of(args) != "te":
        return {}
    from megatron.core.transformer.enums import AttnBackend

    requested = getattr(args, "attention_backend_requested", None) or requested_backend(args)
    kernel = {"flash": AttnBackend.flash, "fused": AttnBackend.fused}.get(requested, AttnBackend.auto)
    return {"attention_backend": kernel}


# -- layer specs -----------------------------------------------------------------------------
def spec_options(args) -> dict:
    """megatron-core's Transformer Engine specs for ``te``, its local ones otherwise."""
    return {"use_transformer_engine": backend_of(args) == "te"}


def layer_specs(specs, config, args):
    """For ``sdpa`` every core attention of the specs (self-attention and multi-latent attention
    alike, decoder and MTP layers) becomes ``SDPACoreAttention`` (models/sdpa.py)."""
    if backend_of(args) != "sdpa":
        return specs
    from megatron_ext.models.sdpa import SDPACoreAttention  # megatron-core: the records are read without it

    return tuple(with_core_attention(spec, SDPACoreAttention) for spec in specs)


# -- checkpoints ------------------------------------------------------------------------------
def saved_backend(saved_args) -> str:
    """The backend a checkpoint's model was built with, from its saved flags (a dict or namespace);
    checkpoints written before --attention-backend existed hold the local spec's names."""
    return saved_value(saved_args, "attention_backend", "local")


def checkpoint_names_problem(saved_args, backend: str) -> Optional[str]:
    """Why a checkpoint's parameters do not fit a model of ``backend`` by name (None when they do).
    Transformer Engine's spec fuses each norm into the linear after it, so its parameters have other
    names (``self_attention.linear_qkv.layer_norm_weight`` for ``input_layernorm.weight``) and its
    modules add ``_extra_state`` entries; sdpa and local share megatron-core's local names. No
    translation is made: it could not be checked against Transformer Engine here (no CUDA)."""
    saved = saved_backend(saved_args)
    if (saved == "te") == (backend == "te"):
        return None
    return (f"it was written with --attention-backend {saved}, this model is built with {backend}: "
            "Transformer Engine's parameter names differ from megatron-core's local ones; "
            + ("continue it with --attention-backend te on a CUDA machine with Transformer Engine"
               if saved == "te" else "continue it with --attention-backend sdpa (or local)"))


def summary(args) -> str:
    """One line for the start-up table."""
    backend = backend_of(args)
    why = getattr(args, "attention_backend_reason", None) or resolve(args)[1]
    what = {"sdpa": "torch scaled_dot_product_attention", "te": "Transformer Engine layer spec",
            "local": "megatron-core unfused DotProductAttention"}[backend]
    return f"{backend} ({what}; {why})"


def _te_checkpoint(saved) -> List[str]:
    return ["--attention-backend te"] if saved_backend(saved) == "te" else []


FEATURE = Feature(
    name="attention backend", title="attention", add_arguments=add_attention_arguments,
    plan_fields=plan_fields,  # the backend that runs here, and why
    config_kwargs=config_kwargs, spec_options=spec_options, layer_specs=layer_specs,
    summary=summary, row="attention",
    export_hf=Support(_te_checkpoint, "Transformer Engine's parameter names are not mapped; export a checkpoint of "
                                      "the sdpa or local backend"),
    convert=Support(_te_checkpoint, "Transformer Engine's fused-norm parameter names have no Megatron-DeepSpeed "
                                    "counterpart here"),
)
