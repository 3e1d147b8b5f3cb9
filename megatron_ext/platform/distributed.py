"""Distributed discovery and start-up.

Rank, world size and master address come from whichever launcher started us: torchrun / the
DeepSpeed launcher (RANK, WORLD_SIZE, LOCAL_RANK), mpiexec via PMI/PALS/Open MPI (ALCF Aurora
and Polaris), SLURM's srun, or nothing (a single process). An importable ezpz with
`setup_torch` is preferred when present, as ALCF users expect; it is never required.
"""
import dataclasses
import os
import socket

import torch
from megatron_ext.platform import accelerator, cpu_compat, deepspeed_compat


@dataclasses.dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def _first_int(env, *names):
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            return int(value)
    return None


def _first_host_of(nodefile):
    try:
        with open(nodefile) as f:
            for line in f:
                if line.strip():
                    return line.split()[0]
    except OSError:
        pass
    return None


def _slurm_first_host(nodelist):
    # "nid[001-004,010]" -> "nid001"; "a,b" -> "a". Good enough for the master address.
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def discover(env=None) -> DistEnv:
    """Work out this process's place in the job from the launcher's environment variables."""
    env = os.environ if env is None else env
    port = _first_int(env, "MASTER_PORT") or 29500
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, deepspeed launcher
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=_first_int(env, "LOCAL_RANK") or 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=port,
            launcher="torchrun",
        )
    rank = _first_int(env, "PMI_RANK", "PALS_RANKID", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
    if rank is not None:  # mpiexec (MPICH/PALS on Aurora and Polaris, Open MPI)
        world = _first_int(env, "PMI_SIZE", "PALS_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE") or 1
        local = _first_int(
            env, "PMI_LOCAL_RANK", "PALS_LOCAL_RANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"
        )
        master = env.get("MASTER_ADDR")
        if not master and env.get("PBS_NODEFILE"):
            master = _first_host_of(env["PBS_NODEFILE"])
        if not master and env.get("HOSTFILE"):
            master = _first_host_of(env["HOSTFILE"])
        return DistEnv(rank, world, local or 0, master or "127.0.0.1", port, "mpi")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        master = env.get("MASTER_ADDR") or _slurm_first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        return DistEnv(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            _first_int(env, "SLURM_LOCALID") or 0,
            master,
            port,
            "slurm",
        )
    return DistEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), port if "MASTER_PORT" in env else _free_port(), "single")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _try_ezpz():
    """ALCF's ezpz, when installed, sets up torch.distributed the way ALCF machines need."""
    if os.environ.get("MEGATRON_EXT_NO_EZPZ"):
        return False
    try:
        import ezpz  # noqa: F401
    except Exception:
        return False
    setup = getattr(ezpz, "setup_torch", None)
    if setup is None:
        return False
    setup(backend=None)
    return torch.distributed.is_initialized()


def init_distributed(backend: str = None) -> DistEnv:
    """Start torch.distributed (through DeepSpeed's comm layer) for whatever launcher we are under.

    Always initialises a process group, even for one process: megatron-core's parallel state and
    dataset cache both need one.
    """

    cpu_compat.apply()
    deepspeed_compat.apply()  # gradient clipping without a host sync per param group
    import deepspeed

    dist = discover()
    os.environ.update(
        RANK=str(dist.rank),
        WORLD_SIZE=str(dist.world_size),
        LOCAL_RANK=str(dist.local_rank),
        MASTER_ADDR=dist.master_addr,
        MASTER_PORT=str(dist.master_port),
    )
    accelerator.set_device(dist.local_rank)
    if not torch.distributed.is_initialized():
        if not (accelerator.has_gpu() and _try_ezpz()):
            deepspeed.init_distributed(
                dist_backend=backend or accelerator.communication_backend(),
                auto_mpi_discovery=False,
                verbose=False,
            )
    if not deepspeed.comm.is_initialized():  # ezpz started torch.distributed; let DeepSpeed adopt it
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False, verbose=False)
    return dist
