"""megatron-core 0.16.1 hard-codes CUDA in a few places that ordinary CPU training reaches
(RNG state save/restore, the tensor-parallel RNG tracker, RoPE's device placement, the default
causal mask; under pipeline parallelism the schedules' token counter and the tied embedding's
first sync; under expert parallelism the all-to-all dispatcher's side stream). When CUDA is absent
we redirect exactly those entry points to their CPU equivalents. Without Transformer Engine (on any machine) its MoE router also lacks a name, which
is defined here, and its multi-latent attention tests against a stand-in for a Transformer Engine
class, which is switched off here. With deepspeed_compat, the only modules that patch third-party code; `apply()` is idempotent
and, on machines with CUDA, does only the Transformer Engine part."""
import contextlib
import importlib
import types

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

    _pipeline_schedules_on_host()
    _alltoall_dispatcher_on_host()
    _applied = True
    return True


def torch_with(**overrides) -> types.ModuleType:
    """A stand-in for the ``torch`` module one megatron-core module sees: torch's own attributes
    with ``overrides``. Only that module's global name changes; every other module keeps torch."""
    proxy = types.ModuleType("torch")
    proxy.__dict__.update({k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    proxy.__dict__.update(overrides)
    return proxy


def _pipeline_schedules_on_host() -> None:
    """Pipeline parallelism: megatron-core's schedules (1F1B and no-pipelining alike) allocate their
    token counter with ``torch.zeros(..., device="cuda")`` (an AssertionError without CUDA)."""
    from megatron.core.pipeline_parallel import schedules

    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)

    schedules.torch = torch_with(zeros=zeros)


@contextlib.contextmanager
def cuda_moves_stay_on_host():
    """While building a model: ``Tensor.cuda()`` leaves a tensor where it is when CUDA is absent.
    Pipeline parallelism with a tied embedding: megatron-core's last stage moves its copy of the
    word embedding with ``weight.data.cuda()`` before summing it with the first stage's
    (``LanguageModule.setup_embeddings_and_output_layer``), an AssertionError on a CUDA-less torch."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor
    try:
        yield
    finally:
        torch.Tensor.cuda = original


class _HostStream:
    """Stands in for a CUDA stream or event on the host, where work already runs in order."""

    def wait_stream(self, other) -> None:
        pass

    def record_event(self, *args) -> "_HostStream":
        return self

    def synchronize(self) -> None:
        pass


def _alltoall_dispatcher_on_host() -> None:
    """Expert parallelism: megatron-core's all-to-all token dispatcher copies its split sizes to the
    host on a ``torch.cuda.Stream`` it creates at construction (a RuntimeError without CUDA), and
    turns them into numpy arrays only when they were on the device: CPU tensors stay tensors, which
    ``all_to_all_single`` refuses as split sizes ("incompatible function arguments")."""
    from megatron.core.transformer.moe import token_dispatcher

    stream = _HostStream()
    host_cuda = types.SimpleNamespace(Stream=lambda *a, **k: stream, current_stream=lambda *a: stream,
                                      stream=lambda s: contextlib.nullcontext(),
                                      current_device=torch.cuda.current_device, is_available=lambda: False)
    token_dispatcher.torch = torch_with(cuda=host_cuda)
    move = token_dispatcher.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


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
