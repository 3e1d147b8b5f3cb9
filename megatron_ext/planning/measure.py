"""Peak memory of a real training run, measured: the check of the estimate (``megatron_ext.planning.memory``).

``measure(argv)`` plans ``argv`` with the trainer's own plan and runs the trainer's ``pretrain`` on it
in this process, recording the peak of the memory the framework allocates on this process's device:

* CUDA / XPU: the caching allocator's ``max_memory_allocated`` (reset first);
* CPU: torch has no allocator statistics for host memory, so the run is recorded by torch's profiler
  with ``profile_memory=True``: every allocation and free of the CPU allocator, each with the running
  total the allocator reports. The peak of that total over the run is the measurement. It counts
  exactly the bytes torch hands out (tensors, autograd's saved tensors, DeepSpeed's buffers), not
  the process's RSS: other processes on a shared machine, malloc's retained pages and the Python
  heap do not move it, so it repeats to the byte run after run.

``python -m megatron_ext.planning.measure [training flags] --measure-out FILE.json``: one rank's
measurement as JSON (under torchrun every rank writes ``FILE.rank<r>.json``).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Dict, List, Optional
from megatron_ext.plan import parse_plan
from megatron_ext.platform.accelerator import accelerator_name
from megatron_ext.platform.known_warnings import silence_known_warnings
from megatron_ext.train import close_process_group
from megatron_ext.training.trainer import pretrain


def _allocation_peak(profiler) -> int:
    """The highest running total of the CPU allocator while ``profiler`` recorded, above the total
    when it started. (The allocator's running total is kept across recordings: memory allocated
    while an earlier recording ran and freed after it stays counted, hence the baseline.)"""
    from torch._C._profiler import _EventType

    events, stack = [], list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
    if not events:
        return 0
    events.sort()
    _, first_size, first_total = events[0]
    return max(total for _, _, total in events) - (first_total - first_size)


@contextlib.contextmanager
def peak_recorder():
    """``with peak_recorder() as result: ...`` -> ``result["peak_bytes"]`` and ``result["how"]``
    after the block: the peak bytes allocated on this process's device during it."""
    import torch

    result: Dict[str, object] = {}
    name = accelerator_name()
    if name != "cpu":
        device = getattr(torch, name)
        device.synchronize()
        device.reset_peak_memory_stats()
        base = device.memory_allocated()
        yield result
        device.synchronize()
        result.update(peak_bytes=int(device.max_memory_allocated() - base), how=f"torch.{name}.max_memory_allocated")
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield result
    result.update(peak_bytes=int(_allocation_peak(prof)), how="CPU allocator total under torch.profiler")


def measure(argv: List[str], world_size: Optional[int] = None) -> dict:
    """Plan ``argv`` and train it here, recording the peak memory of this rank (see the module doc)."""

    import gc

    plan = parse_plan(list(argv), world_size)
    gc.collect()  # an earlier run's tensors freed while recording would lower the count
    with contextlib.redirect_stdout(sys.stderr), peak_recorder() as result:
        pretrain(plan)
    import torch

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return {"rank": rank, "world_size": plan.world_size, **result}


def main(argv=None) -> int:

    silence_known_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    out = None
    if "--measure-out" in argv:
        i = argv.index("--measure-out")
        out = argv[i + 1]
        del argv[i:i + 2]
    result = measure(argv)
    text = json.dumps(result)
    if out:
        path = out if int(os.environ.get("WORLD_SIZE", "1")) == 1 else f"{out}.rank{result['rank']}.json"
        with open(path, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":

    try:
        sys.exit(main())
    finally:
        close_process_group()
