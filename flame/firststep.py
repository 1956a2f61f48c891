"""The first training step on a GPU: FLA's Triton kernels compile and autotune for the run's shapes on first use.

On a fresh H200 that took about 6 minutes before GLA-340M's first step (2026-11-28); the results land in the
Triton cache (TRITON_CACHE_DIR, else ~/.triton/cache, FLA's `*.autotune.json` included) and later runs skip it.
So that nobody waits at a silent screen, the engine wraps step 1 in `FirstStep`:

    with FirstStep(device.type, enabled=is_main_process) as first:
        for each update: if it is this process's first, first.begin(); ...update...; first.end() -> seconds
    # the seconds are reported on their own (metrics.jsonl `first_step_s`), never mixed into tokens/s

It prints the notice before the step, shows that it is still working while the step runs (a rich spinner with the
elapsed time on a terminal, a plain line every `every` seconds otherwise) and one line with the time after it.
"""

import os
import threading
import time
from pathlib import Path

from rich.errors import LiveError

from flame import ui


def triton_cache_dir() -> Path:
    """Where Triton keeps compiled kernels and FLA its autotuning results: TRITON_CACHE_DIR, else ~/.triton/cache."""
    return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def compile_notice(device_type: str) -> str | None:
    """The line to print before the first step on `device_type`, or None where no Triton kernels are compiled
    (the CPU runs flame's portable kernels)."""
    if device_type != "cuda":
        return None
    return (
        "first step: FLA's Triton kernels are compiled and autotuned for this run's shapes on first use "
        f"(minutes on a fresh machine); the results are cached in {triton_cache_dir()} and later runs reuse them"
    )


def still_working_line(seconds: float) -> str:
    return f"first step: still compiling/autotuning kernels, {seconds:.0f} s so far"


def done_line(seconds: float, compiled: bool) -> str:
    why = "compilation and autotuning included; " if compiled else ""
    return f"first step took {seconds:.1f} s ({why}not counted in tokens/s)"


class FirstStep:
    """Times the first step and keeps the user informed while it runs (rank 0 only; see the module docstring).

    As a context manager around the whole loop it only guarantees that the spinner and thread stop on an error;
    begin() and end() bracket the step itself, so the loop body needs no extra indentation.
    """

    def __init__(self, device_type: str, *, enabled: bool = True, every: float = 30.0):
        self.device_type, self.enabled, self.every = device_type, enabled, every
        self.seconds: float | None = None
        self._start: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._status = None
        self._compiled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._halt()
        return False

    def begin(self) -> None:
        """Call right before the first step: prints the notice and starts the still-working display."""
        self._start = time.perf_counter()
        notice = compile_notice(self.device_type) if self.enabled else None
        if notice is None:
            return
        self._compiled = True
        ui.print0(notice)
        ui.flush()
        if ui.interactive():
            # Shown inside the run's progress display (rich >= 14 nests live displays); older rich refuses a
            # second live display, and then the plain still-working lines are shown instead.
            status = ui.err_console.status("first step: compiling and autotuning kernels")
            try:
                status.start()
                self._status = status
            except LiveError:
                pass
        self._thread = threading.Thread(target=self._tick, name="flame-first-step", daemon=True)
        self._thread.start()

    def end(self) -> float:
        """Call right after the first step (after a value has been read back, so the GPU work is done): stops the
        display, prints the time and returns it in seconds."""
        self.seconds = time.perf_counter() - self._start
        self._halt()
        if self.enabled:
            ui.print0(done_line(self.seconds, self._compiled))
            ui.flush()
        return self.seconds

    def _tick(self) -> None:
        while not self._stop.wait(self.every if self._status is None else 1.0):
            elapsed = time.perf_counter() - self._start
            if self._status is not None:
                self._status.update(f"first step: compiling and autotuning kernels, {elapsed:.0f} s")
            else:
                ui.print0(still_working_line(elapsed))
                ui.flush()

    def _halt(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._status is not None:
            self._status.stop()
            self._status = None
