"""``--exit-signal-handler``: stop cleanly when the batch system announces the end of the job.

SLURM sends SIGTERM at the time limit (SIGKILL follows after ``KillWait``, 30 s by default) and, with
``--signal=USR1@120``, SIGUSR1 120 s before it; PBS sends SIGTERM at the walltime (SIGKILL after
``kill_delay``). The handler only records the signal: the training step goes on undisturbed. At
every step boundary the trainer calls ``stop_requested``, one all-reduce (MAX) of the recorded
signal over all ranks, so a signal that reached any rank stops every rank after the same
iteration; the trainer then saves and returns, and the process exits with code 0.

If SIGKILL comes before the save is complete, the crash-safe save (``checkpointing.save_checkpoint``)
leaves the previous checkpoint as ``latest``.
"""
from __future__ import annotations

import contextlib
import signal
from typing import Dict, Optional

import torch
from megatron_ext.platform.accelerator import copy_to_host_async

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StartupInterrupted(Exception):
    """SIGTERM/SIGUSR1 arrived before the first iteration: nothing to save."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_startup: Dict[int, object] = {}  # the handlers the start-up handler replaced


def _interrupt_startup(signum, frame):
    raise StartupInterrupted(signum)


@contextlib.contextmanager
def interruptible_startup():
    """Until ``startup_complete``, SIGTERM/SIGUSR1 (a batch job ending while the run is still
    starting) raise ``StartupInterrupted``, which the entry point turns into one line and exit 0."""
    for sig in EXIT_SIGNALS:
        _startup[sig] = signal.signal(sig, _interrupt_startup)
    try:
        yield
    finally:
        startup_complete()


def startup_complete() -> None:
    """The training loop begins: the previous handlers come back (``--exit-signal-handler`` installs
    its own over them)."""
    while _startup:
        sig, previous = _startup.popitem()
        signal.signal(sig, previous)


class ExitSignalHandler:
    """Records SIGTERM/SIGUSR1 while installed; ``stop_requested`` is a collective."""

    def __init__(self, device, signals=EXIT_SIGNALS):
        self.received = 0  # the last signal number this process got (0: none)
        self._device = device
        self._pending = None  # the previous boundary's all-reduce: a function returning its result
        self._previous: Dict[int, object] = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._record)

    @classmethod
    def from_args(cls, args, device) -> Optional["ExitSignalHandler"]:
        return cls(device) if args.exit_signal_handler else None

    def _record(self, signum, frame) -> None:
        # Only a store: the handler runs between two bytecodes of whatever the main thread is doing.
        self.received = signum

    def stop_requested(self, iteration: int) -> int:
        """The signal any rank had received by the previous boundary (0: none); every rank must call
        this at the same step boundaries."""

        # torch.full is a fill kernel; torch.tensor([...], device=...) would copy from host memory and wait
        flag = torch.full((1,), self.received, dtype=torch.int64, device=self._device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # queued on the device
        previous, self._pending = self._pending, copy_to_host_async(flag)
        if previous is None:
            return 0
        signum = int(previous()[0])
        if signum and torch.distributed.get_rank() == 0:
            print(f"received {signal.Signals(signum).name}: every rank stops after iteration {iteration}, "
                  "saves a checkpoint and exits", flush=True)
        return signum

    def restore(self) -> None:
        """Put back the handlers that were installed before."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
