"""The first training step on a GPU: FLA's Triton kernels compile and autotune for the run's shapes on first use.

On a fresh H200 that took about 6 minutes before GLA-340M's first step (2026-11-28); the results land in the
Triton cache (TRITON_CACHE_DIR, else ~/.triton/cache, FLA's `*.autotune.json` included) and later runs skip it.
So that nobody waits at a silent screen, the engine wraps step 1 in `FirstStep`:

    with FirstStep(device.type, enabled=is_main_process) as first:
        for each update: if it is this process's first, first.begin(); ...update...; first.end() -> seconds
    # the seconds are reported on their own (metrics.jsonl `first_step_s`), never mixed into tokens/s

Once the step has run `quiet_for` seconds (3) it prints the notice and then shows that it is still working (a rich
spinner with the elapsed time on a terminal, a plain line every `every` seconds otherwise); after the step, one
line with the time. A step served from a warm cache (about 1 s for GLA-340M on an H200) prints only that line.

What the time goes to is measured, not guessed: during the first step `Tuning` wraps Triton's autotuner (each
config it benchmarks, the kernel and the autotune key, i.e. the shapes) and Triton's compile hooks. The
still-working display names the kernel being tuned, and after the step one line sums it up (kernels tuned, configs
benchmarked, seconds in autotuning, of which compiling, and the slowest kernels).
"""

import os
import threading
import time
from dataclasses import dataclass
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


@dataclass
class Tuned:
    kernel: str
    key: str  # the autotune key: the shapes and dtypes the choice is made for
    configs: int = 0  # configs benchmarked
    seconds: float = 0.0  # benchmarking them, their compilation included


class Tuning:
    """Records Triton autotuning and compilation while installed (see the module docstring).

    Wraps `Autotuner._bench` (one call per config benchmarked; a key found in Triton's on-disk autotune cache is
    never benchmarked, so it costs nothing here) and sets Triton's JIT cache/post-compile hooks where they are free.
    Triton being absent, or laid out differently, only turns the record off.
    """

    def __init__(self):
        self.tuned: dict[tuple[str, str], Tuned] = {}
        self.current: Tuned | None = None
        self.compiles, self.compile_s = 0, 0.0
        self._undo: list = []
        self._compile_start = threading.local()

    @property
    def configs(self) -> int:
        return sum(t.configs for t in self.tuned.values())

    @property
    def seconds(self) -> float:
        return sum(t.seconds for t in self.tuned.values())

    def install(self) -> "Tuning":
        try:
            from triton.runtime.autotuner import Autotuner
        except Exception:
            return self
        original = getattr(Autotuner, "_bench", None)
        if original is None:
            return self
        tuning = self

        def _bench(autotuner, *args, config, **meta):
            entry = tuning._entry(autotuner, args, meta)
            tuning.current = entry
            start = time.perf_counter()
            try:
                return original(autotuner, *args, config=config, **meta)
            finally:
                entry.configs += 1
                entry.seconds += time.perf_counter() - start

        Autotuner._bench = _bench
        self._undo.append(lambda: setattr(Autotuner, "_bench", original))
        self._install_compile_hooks()
        return self

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.current = None

    def _install_compile_hooks(self) -> None:
        try:
            from triton import knobs

            runtime = knobs.runtime
            if runtime.jit_cache_hook is not None or runtime.jit_post_compile_hook is not None:
                return  # someone else's hooks: leave them alone
        except Exception:
            return

        def before(*args, **kwargs):
            self._compile_start.t = time.perf_counter()
            return False  # a true value would tell Triton to skip the compilation

        def after(*args, **kwargs):
            start = getattr(self._compile_start, "t", None)
            if start is not None:
                self.compiles += 1
                self.compile_s += time.perf_counter() - start
                self._compile_start.t = None
            return False

        runtime.jit_cache_hook, runtime.jit_post_compile_hook = before, after

        def undo():
            runtime.jit_cache_hook = runtime.jit_post_compile_hook = None

        self._undo.append(undo)

    def _entry(self, autotuner, args, meta) -> Tuned:
        fn = autotuner.fn
        while hasattr(fn, "fn"):
            fn = fn.fn
        name = getattr(fn, "__name__", "kernel")
        values = dict(zip(getattr(autotuner, "arg_names", ()), args)) | meta
        # a tensor key (rare) is shown by its dtype, as Triton's own key records it
        key = ",".join(f"{k}={getattr(values.get(k), 'dtype', values.get(k))}" for k in getattr(autotuner, "keys", ()))
        entry = self.tuned.get((name, key))
        if entry is None:
            entry = self.tuned[(name, key)] = Tuned(name, key)
        return entry

    def doing(self) -> str:
        """What is being tuned now, for the still-working display ("" before anything is)."""
        if self.current is None:
            return ""
        return f"autotuning {self.current.kernel} ({self.current.key}), {len(self.tuned)} kernels so far"

    def summary(self, top: int = 3) -> str | None:
        """One line: what the autotuning cost; None when nothing was tuned (a warm cache)."""
        if not self.tuned:
            return None
        compiling = (
            f", of which compiling {self.compile_s:.0f} s ({self.compiles} compilations)" if self.compiles else ""
        )
        slowest = sorted(self.tuned.values(), key=lambda t: -t.seconds)[:top]
        worst = "; ".join(f"{t.kernel} ({t.key}) {t.configs} configs {t.seconds:.0f} s" for t in slowest)
        return (
            f"first step: autotuned {len(self.tuned)} kernel/shape pairs, {self.configs} configs benchmarked in "
            f"{self.seconds:.0f} s{compiling}; slowest: {worst}"
        )

    def record(self) -> dict:
        """For metrics.jsonl: the totals, and every kernel/shape pair tuned with its configs and seconds."""
        return {
            "kernels_tuned": len(self.tuned),
            "configs_benchmarked": self.configs,
            "tuning_s": round(self.seconds, 3),
            "compile_s": round(self.compile_s, 3),
            "compilations": self.compiles,
            "tuned": [
                {"kernel": t.kernel, "key": t.key, "configs": t.configs, "seconds": round(t.seconds, 3)}
                for t in sorted(self.tuned.values(), key=lambda t: -t.seconds)
            ],
        }


class FirstStep:
    """Times the first step and keeps the user informed while it runs (rank 0 only; see the module docstring).

    As a context manager around the whole loop it only guarantees that the spinner and thread stop on an error;
    begin() and end() bracket the step itself, so the loop body needs no extra indentation.
    """

    def __init__(self, device_type: str, *, enabled: bool = True, every: float = 30.0, quiet_for: float = 3.0):
        self.device_type, self.enabled, self.every, self.quiet_for = device_type, enabled, every, quiet_for
        self.seconds: float | None = None
        self._start: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._status = None
        self._announced = False
        self.tuning: Tuning | None = None
        self._notice: str | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._halt()
        return False

    def begin(self) -> None:
        """Call right before the first step: starts recording the tuning and the clock of the notice."""
        self._start = time.perf_counter()
        self._notice = compile_notice(self.device_type) if self.enabled else None
        if self._notice is None:
            return
        self.tuning = Tuning().install()
        self._thread = threading.Thread(target=self._tick, name="flame-first-step", daemon=True)
        self._thread.start()

    def _announce(self) -> None:
        """The step is taking a while: print the notice and start the still-working display."""
        self._announced = True
        ui.print0(self._notice)
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

    def end(self) -> float:
        """Call right after the first step (after a value has been read back, so the GPU work is done): stops the
        display, prints the time and returns it in seconds."""
        self.seconds = time.perf_counter() - self._start
        self._halt()
        if self.enabled:
            summary = self.tuning.summary() if self.tuning is not None else None
            if summary:
                ui.print0(summary)
            tuned = self.tuning is not None and bool(self.tuning.tuned)
            ui.print0(done_line(self.seconds, self._announced or tuned))
            ui.flush()
        return self.seconds

    def _tick(self) -> None:
        if self._stop.wait(self.quiet_for):
            return
        self._announce()
        while not self._stop.wait(self.every if self._status is None else 1.0):
            elapsed = time.perf_counter() - self._start
            doing = self.tuning.doing() if self.tuning is not None else ""
            if self._status is not None:
                self._status.update(f"first step: {doing or 'compiling and autotuning kernels'}, {elapsed:.0f} s")
            else:
                ui.print0(still_working_line(elapsed) + (f" ({doing})" if doing else ""))
                ui.flush()

    def _halt(self) -> None:
        if self.tuning is not None:
            self.tuning.uninstall()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._status is not None:
            self._status.stop()
            self._status = None
