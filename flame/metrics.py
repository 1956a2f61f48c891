"""Throughput, MFU, ETA and peak memory: the numbers `flame train` logs every --logging steps.

    from flame.metrics import Throughput, mfu, peak_flops
    meter = Throughput(n_devices=8)
    meter.update(tokens=global_batch_tokens, seconds=step_time)
    mfu(meter.tokens_per_s, flops_per_token(config, 2048), 8, peak_flops(torch.cuda.get_device_name(), "bf16"))

MFU (model FLOPs utilisation, PaLM appendix B) = achieved model FLOPs / peak FLOPs of the devices, with the model
FLOPs from flame.models.flops_per_token (what the model really computes, no recomputation counted).
"""

from __future__ import annotations

import os
import time
from collections import deque

import torch

# Dense (no 2:4 sparsity) tensor-core peak FLOP/s per device, from the vendors' data sheets.
# Keys are matched as lower-case substrings of torch.cuda.get_device_name(); the first match wins, so the
# more specific names come first.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("gh200", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    ("h200", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    ("h100 pcie", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("h100 nvl", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("h100", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),  # SXM
    ("h800", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    ("b200", {"bf16": 2250e12, "fp16": 2250e12, "tf32": 1100e12, "fp32": 80e12}),
    ("a100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("a800", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("l40s", {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("a10g", {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 31.2e12}),
    ("rtx 4090", {"bf16": 165e12, "fp16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    ("rtx 3090", {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12}),
    ("v100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("mi300x", {"bf16": 1307e12, "fp16": 1307e12, "fp32": 163e12}),
    ("mi250x", {"bf16": 383e12, "fp16": 383e12, "fp32": 47.9e12}),
]

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def peak_flops(device_name: str | None, dtype: str | torch.dtype = "bf16") -> float | None:
    """Peak FLOP/s of one device for a dtype ("bf16", "fp16", "tf32", "fp32" or a torch dtype); None when
    unknown (CPU, a GPU not in the table): callers then show no MFU rather than a wrong one."""
    if not device_name:
        return None
    dtype = _DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, torch.dtype) else str(dtype).lower()
    name = device_name.lower()
    for key, table in PEAK_FLOPS:
        if key in name:
            return table.get(dtype)
    return None


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]: tokens/s (all devices together) x FLOPs/token / (devices x peak)."""
    if peak is None or peak <= 0 or n_devices <= 0:
        return None
    return tokens_per_s * flops_per_token / (n_devices * peak)


class Throughput:
    """Tokens per second over a sliding window of the last `window` steps or more (the first, warm-up steps age out):
    the newest updates that cover `window` steps, each update one step or several at once.

    `tokens` given to update() are the tokens of the step summed over all devices.
    """

    def __init__(self, n_devices: int = 1, window: int = 20):
        self.n_devices = max(1, n_devices)
        self.window = window
        self._steps: deque[tuple[int, float, int]] = deque()
        self._last: float | None = None

    def update(self, tokens: int, seconds: float | None = None, steps: int = 1) -> None:
        """Record `steps` steps (one unless told): their tokens and wall time (measured since the previous update
        when not given). The engine updates when it has waited for the GPU, so the time is the GPU's too."""
        now = time.perf_counter()
        if seconds is None:
            seconds = 0.0 if self._last is None else now - self._last
        self._last = now
        if seconds > 0:
            self._steps.append((tokens, seconds, steps))
            while len(self._steps) > 1 and sum(n for _, _, n in self._steps) - self._steps[0][2] >= self.window:
                self._steps.popleft()

    def reset_clock(self) -> None:
        """Restart the step clock, e.g. after an evaluation or a checkpoint save that should not count."""
        self._last = time.perf_counter()

    @property
    def tokens_per_s(self) -> float:
        """All devices together."""
        seconds = sum(s for _, s, _ in self._steps)
        return sum(t for t, _, _ in self._steps) / seconds if seconds > 0 else 0.0

    @property
    def tokens_per_s_per_device(self) -> float:
        return self.tokens_per_s / self.n_devices

    @property
    def seconds_per_step(self) -> float:
        return sum(s for _, s, _ in self._steps) / sum(n for _, _, n in self._steps) if self._steps else 0.0


def eta(steps_done: int, steps_total: int, seconds_per_step: float) -> float:
    """Seconds left: remaining steps x seconds per step (0 once done)."""
    return max(0, steps_total - steps_done) * max(0.0, seconds_per_step)


def peak_memory_gib(device: torch.device | str | None = None) -> float:
    """Peak memory in GiB: torch.cuda.max_memory_allocated on a GPU, the process's peak RSS on the CPU."""
    device = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        return torch.cuda.max_memory_allocated(device) / 1024**3
    return _peak_rss_bytes() / 1024**3


def reset_peak_memory(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def _peak_rss_bytes() -> int:
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is KiB on Linux, bytes on macOS
        return peak if os.uname().sysname == "Darwin" else peak * 1024
    except (ImportError, AttributeError):  # Windows
        return 0


def measure_training_peak(model, batch: int, context: int, *, steps: int = 3, seed: int = 0) -> dict[str, float]:
    """Peak GPU memory (GiB) and tokens/s of plain training steps on random tokens: bf16 autocast over the
    model's fp32 weights, fused AdamW, grad-norm clipping, zero_grad(set_to_none=True), as `flame train` runs
    a step with --update 1. For checking estimate_memory() and for benchmarks; needs CUDA.

    The peak is read over the steps after the first, when AdamW's moments exist.
    """
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError("measure_training_peak needs the model on a CUDA device")
    generator = torch.Generator(device=device).manual_seed(seed)
    vocab = model.config.vocab_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()
    elapsed, tokens = 0.0, 0
    for step in range(steps):
        ids = torch.randint(0, vocab, (batch, context), device=device, generator=generator)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        if step == 0:
            torch.cuda.reset_peak_memory_stats(device)
        else:
            elapsed += time.perf_counter() - start
            tokens += ids.numel()
    return {
        "peak_gib": torch.cuda.max_memory_allocated(device) / 1024**3,
        "tokens_per_s": tokens / elapsed if elapsed else 0.0,
        "loss": float(loss),
    }
