"""megatron-core 0.16.1 hard-codes CUDA in a few places that ordinary CPU training reaches
(RNG state save/restore, the tensor-parallel RNG tracker, RoPE's device placement, the default
causal mask). When CUDA is absent we redirect exactly those entry points to their CPU
equivalents. Without Transformer Engine (on any machine) its MoE router also lacks a name, which
is defined here, and its multi-latent attention tests against a stand-in for a Transformer Engine
class, which is switched off here. With deepspeed_compat, the only modules that patch third-party code; `apply()` is idempotent
and, on machines with CUDA, does only the Transformer Engine part."""
import importlib

import torch

_applied = False


def apply() -> bool:
    """Patch megatron-core and DeepSpeed for a CUDA-less process. Returns True if patched."""
    global _applied
    if _applied:
        return True
    _define_moe_te_general_gemm()  # Transformer Engine gaps, not CUDA ones: GPUs without TE need them too
    _mla_without_te()
    if torch.cuda.is_available():
        return False

    # torch.cuda.* used by megatron-core's RNG handling -> CPU generator.
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.get_rng_state = lambda device="cpu": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cpu": torch.set_rng_state(state)
    torch.cuda.manual_seed = torch.manual_seed
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.random.set_rng_state = torch.cuda.set_rng_state

    from megatron.core.tensor_parallel import random as tp_random

    tp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(
        new_state
    )
    tp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )

    # The causal mask the local attention builds when none is passed is allocated on "cuda".
    import functools

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as transformer_utils

    @functools.lru_cache(maxsize=None)
    def cpu_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    transformer_utils.get_default_causal_mask = cpu_causal_mask
    fused_softmax.get_default_causal_mask = cpu_causal_mask

    # The aux-loss-free router's token count (a single in-place add) is decorated with torch.compile:
    # ~10 s of C++ compilation at the first MoE forward on CPU for no gain. Call it as written.
    from megatron.core.transformer.moe.router import TopKRouter

    count = TopKRouter._apply_expert_bias
    TopKRouter._apply_expert_bias = getattr(count, "_torchdynamo_orig_callable", count)

    # DeepSpeed JIT-compiles a shared-memory collective op (~30 s of g++) at the first
    # init_distributed on CPU; gloo works without it.
    # (``import deepspeed.comm.torch as m`` would bind the real torch: deepspeed.comm re-exports it.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

    _applied = True
    return True


def _define_moe_te_general_gemm() -> None:
    """Without Transformer Engine, megatron-core's MoE router references an undefined
    ``te_general_gemm`` (NameError); ``None`` selects its plain matmul path."""
    from megatron.core.transformer.moe import moe_utils

    if not getattr(moe_utils, "HAVE_TE", False) and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _mla_without_te() -> None:
    """Without Transformer Engine, megatron-core 0.16.1's ``extensions.transformer_engine`` still
    imports (its TE classes are ``MagicMock`` stand-ins), so ``multi_latent_attention`` believes TE
    is there and calls ``isinstance(..., TELinear)`` with a stand-in: a TypeError when an MLA layer is
    built. Its flag is set to what is true."""
    from megatron.core.extensions import transformer_engine as te_ext
    from megatron.core.transformer import multi_latent_attention

    if not getattr(te_ext, "HAVE_TE", False):
        multi_latent_attention.HAVE_TE = False
