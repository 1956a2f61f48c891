"""Settings of the portable kernels (one process-wide instance, `settings`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from flame.errors import ConfigError

MODES = ("auto", "torch", "triton")


def _mode_from_env() -> str:
    return os.environ.get("FLAME_KERNELS", "auto").strip().lower() or "auto"


@dataclass
class KernelSettings:
    mode: str = field(default_factory=_mode_from_env)
    """Which implementation an FLA op runs: `auto` (torch on CPU tensors, FLA's Triton kernels on GPU tensors, with
    flame's faster norm backward in front of FLA's), `torch` (the portable torch code everywhere, to debug or
    compare on a GPU) or `triton` (always FLA's own kernels, as if flame.kernels were not installed). Default from
    the FLAME_KERNELS environment variable."""

    chunk_size: int | None = 16
    """Tokens per chunk of the chunkwise-parallel linear-attention forms; None runs the per-token recurrence
    (FLA's naive reference; exact but slow, kept as the baseline of benchmarks/kernels_cpu.py)."""

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(
                f"unknown kernels mode {self.mode!r}",
                f"use one of {', '.join(MODES)} (option --kernels or FLAME_KERNELS)",
            )
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"kernels chunk_size must be a positive integer, got {self.chunk_size}")


settings = KernelSettings()
