"""Progress of the long conversions (``export-hf``, ``import-hf``, ``convert``): each stage counts
tensors and bytes.

On a terminal (stderr is a TTY) a stage is a ``tqdm`` bar: bytes when the stage knows how many it
will handle (else tensors), with the rate and the time remaining, and the other count beside it.
Elsewhere (a batch job's log) a stage is one line when it ends::

    export-hf: writing model.safetensors: 291 tensors, 13.5 GiB in 41.2 s (335.6 MiB/s)

A stage whose work happens out of our sight (DeepSpeed's converter, a ``torch.save``) can be given
``poll``, a function returning (tensors, bytes) done so far, e.g. counted in its output folder; it
is called twice a second.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Callable, Iterator, Optional, Tuple

POLL_SECONDS = 0.5


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def tensor_bytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def folder_bytes(folder: str, suffix: str = "") -> int:
    """Bytes of the files under ``folder`` (named ``*suffix``) now; files that vanish while counting
    are skipped."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            if not name.endswith(suffix):
                continue
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, name))
    return total


class Stage:
    """Counts of one stage; ``add`` (or ``tensor``) as work is done."""

    def __init__(self, prog: str, what: str, tensors: Optional[int], nbytes: Optional[int], stream, terminal: bool):
        self.prog, self.what, self.stream = prog, what, stream
        self.total_tensors, self.total_bytes = tensors, nbytes
        self.tensors = self.bytes = 0
        self.start = time.time()
        self._lock = threading.Lock()
        self._bar = None
        if terminal:
            from tqdm import tqdm

            by_bytes = nbytes is not None or tensors is None
            self._bar = tqdm(total=nbytes if by_bytes else tensors, desc=f"{prog}: {what}", file=stream,
                             unit="iB" if by_bytes else " tensors", unit_scale=by_bytes, unit_divisor=1024,
                             dynamic_ncols=True, leave=True)
            self._by_bytes = by_bytes

    def add(self, tensors: int = 0, nbytes: int = 0) -> None:
        self.set(self.tensors + tensors, self.bytes + nbytes)

    def tensor(self, tensor) -> None:
        """One tensor handled (its bytes counted)."""
        self.add(1, tensor_bytes(tensor))

    def set(self, tensors: int, nbytes: int) -> None:
        """The counts so far (never going back; bytes at most the stage's total: files written count
        their headers too)."""
        with self._lock:
            tensors, nbytes = max(tensors, self.tensors), max(nbytes, self.bytes)
            if self.total_bytes is not None:
                nbytes = min(nbytes, self.total_bytes)
            if self._bar is not None:  # the other count beside the bar, then the bar (which redraws)
                other = (f"{tensors}" + (f"/{self.total_tensors}" if self.total_tensors else "") + " tensors"
                         if self._by_bytes else human_bytes(nbytes))
                self._bar.set_postfix_str(other, refresh=False)
                self._bar.update((nbytes - self.bytes) if self._by_bytes else (tensors - self.tensors))
            self.tensors, self.bytes = tensors, nbytes

    def close(self, finished: bool) -> None:
        seconds = time.time() - self.start
        if self._bar is not None:
            self._bar.close()
        elif finished:
            rate = f" ({human_bytes(self.bytes / seconds)}/s)" if seconds > 0 and self.bytes else ""
            print(f"{self.prog}: {self.what}: {self.tensors} tensors, {human_bytes(self.bytes)} in {seconds:.1f} s{rate}",
                  file=self.stream, flush=True)


class Progress:
    """The stages of one conversion command (``prog``: its name in the lines), on ``stream`` (stderr)."""

    def __init__(self, prog: str, stream=None):
        self.prog = prog
        self.stream = stream or sys.stderr
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())

    def around(self, say: Callable[[str], None]) -> Callable[[str], None]:
        """``say`` for lines printed while a bar may be drawn: the bar steps aside for them."""
        if not self.terminal:
            return say

        def said(line: str) -> None:
            from tqdm import tqdm

            with tqdm.external_write_mode(file=self.stream):
                say(line)

        return said

    @contextlib.contextmanager
    def stage(self, what: str, tensors: Optional[int] = None, nbytes: Optional[int] = None,
              poll: Optional[Callable[[], Tuple[int, int]]] = None) -> Iterator[Stage]:
        stage = Stage(self.prog, what, tensors, nbytes, self.stream, self.terminal)
        stop = threading.Event()
        poller = None
        if poll is not None:
            def watch():
                while not stop.wait(POLL_SECONDS):
                    stage.set(*poll())

            poller = threading.Thread(target=watch, name=f"progress: {what}", daemon=True)
            poller.start()
        finished = False
        try:
            yield stage
            finished = True
        finally:
            if poller is not None:
                stop.set()
                poller.join()
                if finished:
                    stage.set(*poll())
            stage.close(finished)
