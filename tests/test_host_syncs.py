"""No host synchronisation from megatron_ext's own code in a training step that is not logged.

A sync detector for CPU runs: every operation that hands a tensor's value to Python
(``.item()``, ``float()``, ``bool()``, ``int()``, ``.tolist()``: aten ``_local_scalar_dense``,
``is_nonzero``, ``equal``) or whose output size depends on values (``nonzero``, ``masked_select``)
waits for the accelerator when the tensor lives there. The trainer runs in this process under a
torch dispatch mode that records each such call with the training iteration it happened in
(read from the loop's frame) and the innermost frame of megatron_ext, DeepSpeed or megatron-core
that made it. Ours must not appear outside logging iterations; the third-party ones are listed
(docs/attention.md, "Host synchronisation") but not asserted, they are not ours to change.
"""
import collections
import os
import sys
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TINY, run_trainer

SYNC_OPS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::nonzero", "aten::masked_select"}
OURS, THEIRS = "/megatron_ext/", ("/deepspeed/", "/megatron/core/")

# Syncs of ours that read host memory on an accelerator (on the CPU every tensor is host memory,
# so the detector cannot tell them apart): the exit-signal check reads a pinned host copy made
# one iteration earlier (platform.accelerator.copy_to_host_async).
HOST_MEMORY_READS = {("signals.py", "stop_requested")}


class SyncRecorder(TorchDispatchMode):
    """Records sync operations inside the trainer's loop (``everywhere``: all of them)."""

    def __init__(self, everywhere=False):
        super().__init__()
        self.everywhere = everywhere
        self.calls = collections.Counter()  # (ours?, logging iteration?, file, function, op) -> count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in SYNC_OPS:
            iteration = self._iteration()
            if iteration is not None or self.everywhere:
                frames = [f for f in traceback.extract_stack()[:-1]
                          if OURS in f.filename or any(t in f.filename for t in THEIRS)]
                if frames:
                    f = frames[-1]
                    self.calls[(OURS in f.filename, iteration, os.path.basename(f.filename), f.name, name)] += 1
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _iteration():
        """Whether the trainer's loop is in a logging iteration (None: not inside the loop)."""
        frame = sys._getframe()
        while frame is not None:
            code = frame.f_code
            if code.co_name == "pretrain" and code.co_filename.endswith(os.path.join("training", "trainer.py")):
                return bool(frame.f_locals.get("logging_now")) if "logging_now" in frame.f_locals else None
            frame = frame.f_back
        return None


@pytest.mark.parametrize("extra", [
    ["--optimizer", "muon", "--bf16", "--zero-stage", "1"],  # hybrid: Muon + its AdamW part
    ["--optimizer", "shampoo", "--zero-stage", "0", "--num-experts", "2", "--mtp-num-layers", "1"],
])
def test_no_host_sync_of_ours_outside_logging_iterations(extra):
    recorder = SyncRecorder()
    with recorder:
        run_trainer(TINY + ["--mock-data", "--train-iters", "6", "--log-interval", "3", "--eval-iters", "0",
                            "--exit-signal-handler"] + extra)
    ours_in_steps = {(file, function, op): n for (ours, logging, file, function, op), n in recorder.calls.items()
                     if ours and not logging and (file, function) not in HOST_MEMORY_READS}
    assert ours_in_steps == {}
    # the detector sees syncs at all: the logged iterations read the loss and the gradient norm
    assert any(ours and logging for ours, logging, *_ in recorder.calls)


@pytest.mark.parametrize("norm", [3.0, 0.5, float("nan"), float("inf"), -1.0])
@pytest.mark.parametrize("clip_grad, loss_scale", [(1.0, 1.0), (1.0, 1024.0), (0.0, 1024.0), (0.0, 1.0)])
def test_zero_clipping_without_a_host_sync_scales_like_deepspeed(norm, clip_grad, loss_scale):
    """platform/deepspeed_compat.py: ZeRO 1/2's unscale-and-clip decided on the device."""
    import types

    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from megatron_ext.platform import deepspeed_compat

    assert deepspeed_compat.apply()
    engine_like = types.SimpleNamespace(clip_grad=clip_grad, loss_scale=loss_scale, device="cpu")
    grads, syncs = {}, {}
    for name, fn in (("deepspeed", DeepSpeedZeroOptimizer.original_unscale_and_clip_grads),
                     ("ours", DeepSpeedZeroOptimizer.unscale_and_clip_grads)):
        flat, parts = torch.linspace(-2, 2, 7), [torch.ones(3), torch.full((2,), 5.0)]
        recorder = SyncRecorder(everywhere=True)
        with recorder:
            fn(engine_like, [flat, parts], torch.tensor(norm))
        grads[name], syncs[name] = (flat, parts), sum(recorder.calls.values())
    assert syncs["ours"] == 0 and syncs["deepspeed"] == (1 if clip_grad > 0 else 0)
    for a, b in zip([grads["ours"][0], *grads["ours"][1]], [grads["deepspeed"][0], *grads["deepspeed"][1]]):
        assert torch.equal(a, b)
