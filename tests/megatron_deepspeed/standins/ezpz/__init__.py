"""Stand-in for ALCF's ``ezpz`` launcher library (test harness; ezpz is not on the package index).

What the fork calls: rank/world helpers (from the launcher's environment variables), the device type,
``setup_torch`` (starts torch.distributed: gloo on CPU), ``timeitlogit`` (a timing decorator), loggers,
``setup_wandb`` (never reached: the tests run with ``WANDB_MODE=disabled``). Importing it configures
the root logger at INFO, as ezpz does, since the fork logs its iteration lines through ``logging``.
"""
import logging
import os
import socket
import sys

from ezpz import dist, profile, utils  # noqa: F401
from ezpz.dist import timeitlogit  # noqa: F401

if not logging.getLogger().handlers:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="[%(asctime)s][%(levelname)s][%(name)s] %(message)s")


def get_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def get_torch_device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def get_torch_device() -> str:
    return get_torch_device_type()


def get_hostname() -> str:
    return socket.gethostname()


def get_logger(name=None, level="INFO"):
    logger = logging.getLogger(name)
    logger.setLevel(level)
    return logger


def setup_torch(backend=None, port=None, seed=None, timeout=None, **_):
    """Start torch.distributed from the launcher's environment (env://); returns the rank."""
    import torch.distributed as tdist

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if port is not None:
        os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("MASTER_PORT", "29500")
    if not tdist.is_initialized():
        tdist.init_process_group(backend="gloo" if get_torch_device_type() == "cpu" else "nccl",
                                 rank=get_rank(), world_size=get_world_size())
    if seed is not None:
        import torch

        torch.manual_seed(seed)
    return get_rank()


def setup_wandb(*args, **kwargs):
    return None


def breakpoint(rank=0):  # noqa: A001 - ezpz's name
    return None
