"""``megatron-ext smoke``: a short distributed self-test on whatever ranks it is launched with
(what ALCF users ran ``ezpz-test`` for): every rank reports its host, device and backend, an
all-reduce is checked, and a tiny model trains a few steps on synthetic data.

    torchrun --nproc_per_node 2 -m megatron_ext.cli smoke
    mpiexec -n 24 -ppn 12 megatron-ext smoke --steps 10 [trainer flags]
"""
import socket
import time

PASS_THROUGH = True

SMOKE_MODEL = ["--mock-data", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
               "--seq-length", "64", "--micro-batch-size", "2", "--lr", "1e-3", "--eval-iters", "0",
               "--log-interval", "1"]


def add_parser(sub):
    sub.add_parser("smoke", help="distributed self-test: ranks, devices, all-reduce, a few training steps",
                   add_help=False)


def run_argv(argv) -> int:
    import argparse

    opts = argparse.ArgumentParser(prog="megatron-ext smoke", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    opts.add_argument("--steps", type=int, default=5, help="training steps of the tiny model")
    own, trainer_flags = opts.parse_known_args(argv)

    import torch

    from megatron_ext.plan import parse_plan
    from megatron_ext.platform import accelerator, init_distributed

    t0 = time.time()
    dist = init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = accelerator.current_device()
    report = f"rank {rank}/{world} local {dist.local_rank} host {socket.gethostname()} device {device} " \
             f"backend {torch.distributed.get_backend()} launcher {dist.launcher}"
    reports = [None] * world
    torch.distributed.all_gather_object(reports, report)
    value = torch.ones(4, device=device) * (rank + 1)
    torch.distributed.all_reduce(value)
    expected = world * (world + 1) / 2
    allreduce_ok = bool(torch.allclose(value.cpu(), torch.full((4,), expected)))
    if rank == 0:
        print("\n".join(reports))
        print(f"all-reduce: {'ok' if allreduce_ok else 'WRONG'} (sum of ranks+1 = {value[0].item():g}, "
              f"expected {expected:g}) in {time.time() - t0:.1f} s")

    from megatron_ext.training.trainer import pretrain

    plan = parse_plan(SMOKE_MODEL + ["--train-iters", str(own.steps)] + trainer_flags, world_size=world)
    result = pretrain(plan)
    losses_ok = len(result.train_losses) == own.steps and all(l == l and l < 100 for l in result.train_losses)
    ok = allreduce_ok and losses_ok
    if rank == 0:
        print(f"training: {'ok' if losses_ok else 'FAILED'} ({own.steps} steps, loss "
              f"{result.train_losses[0]:.3f} -> {result.train_losses[-1]:.3f}, "
              f"{result.tokens_per_second:.0f} tokens/s)")
        print(f"smoke test {'passed' if ok else 'FAILED'} on {world} rank(s) in {time.time() - t0:.1f} s")
    return 0 if ok else 1
