"""Accelerator selection through DeepSpeed's accelerator abstraction (CUDA, XPU, CPU, ...)."""
import functools

import torch


@functools.lru_cache(maxsize=None)
def _accel():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def accelerator_name() -> str:
    """'cuda', 'xpu', 'cpu', ... as DeepSpeed detects it."""
    return _accel().device_name()


def has_gpu() -> bool:
    return accelerator_name() != "cpu"


def device(local_rank: int = 0) -> torch.device:
    name = accelerator_name()
    if name == "cpu":
        return torch.device("cpu")
    return torch.device(name, local_rank)


def current_device() -> torch.device:
    """This process's device (after ``set_device``)."""
    return torch.device(_accel().current_device_name())


def set_device(local_rank: int) -> None:
    if has_gpu():
        _accel().set_device(local_rank)


def total_memory() -> int:
    """Bytes of this process's device (the host's memory on the CPU), as DeepSpeed reports them."""
    return int(_accel().total_memory())


def device_model() -> str:
    """The device's model name (e.g. 'NVIDIA H100 80GB HBM3'); '' on the CPU or when unknown."""
    name = accelerator_name()
    backend = getattr(torch, name, None) if name != "cpu" else None
    try:
        return backend.get_device_name() if backend is not None and hasattr(backend, "get_device_name") else ""
    except Exception:  # noqa: BLE001 - a device that cannot say its name is simply unnamed
        return ""


def communication_backend() -> str:
    """nccl on CUDA, ccl on XPU (or on CPU with oneCCL bindings), gloo otherwise."""
    return _accel().communication_backend_name()


def synchronize() -> None:
    _accel().synchronize()


# CPU capability flags (torch.cpu.get_capabilities) of a native bf16 matrix multiply: Intel AMX and
# AVX512-BF16 on x86, the BF16 extension on Arm. Without one, torch emulates bf16 matmuls in fp32
# with conversions (measured 34x slower than fp32 on an AVX2-only AMD EPYC).
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16")


def native_bf16_matmul() -> tuple:
    """``(native, why)``: whether this process's accelerator multiplies bf16 matrices in hardware."""
    name = accelerator_name()
    if name == "cuda":
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch: no emulation argument
            native = torch.cuda.is_bf16_supported()
        return native, f"cuda {'has' if native else 'lacks'} native bf16"
    if name == "xpu":
        return True, "xpu"
    if name == "cpu":
        caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
        flags = [f for f in _CPU_BF16_FLAGS if caps.get(f)]
        if flags:
            return True, f"cpu with {'/'.join(flags)}"
        return False, f"cpu ({torch.backends.cpu.get_cpu_capability()}) without AVX512-BF16/AMX"
    return False, f"{name}: bf16 support unknown"


def copy_to_host_async(tensor: torch.Tensor):
    """Start copying a (small) device tensor to host memory without waiting for it; returns a
    function that waits for that copy alone, not for the work queued after it, and returns the host
    tensor. ``tensor.item()`` would instead wait for everything queued so far (a host sync)."""
    if tensor.device.type == "cpu":
        return lambda: tensor
    accel = _accel()
    host = accel.pin_memory(torch.empty(tensor.shape, dtype=tensor.dtype))
    host.copy_(tensor, non_blocking=True)
    done = accel.Event()
    done.record()

    def wait() -> torch.Tensor:
        done.synchronize()
        return host

    return wait
