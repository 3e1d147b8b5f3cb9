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


def communication_backend() -> str:
    """nccl on CUDA, ccl on XPU (or on CPU with oneCCL bindings), gloo otherwise."""
    return _accel().communication_backend_name()


def synchronize() -> None:
    _accel().synchronize()
