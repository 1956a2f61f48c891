"""Settings of the portable kernels (one process-wide instance, `settings`), and the launch of flame's elementwise GPU
kernels over flat offsets (`Launch`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from flame.errors import ConfigError

MODES = ("auto", "torch", "triton")
GLA_STATES = ("fla", "recompute", "keep")


@dataclass(frozen=True)
class Launch:
    """How a kernel over flat offsets (flame.kernels.swiglu, flame.kernels.adamw) is launched."""

    block: int
    """Elements per program."""
    warps: int


def _mode_from_env() -> str:
    return os.environ.get("FLAME_KERNELS", "auto").strip().lower() or "auto"


def _gla_states_from_env() -> str:
    return os.environ.get("FLAME_GLA_STATES", "recompute").strip().lower() or "recompute"


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

    gla_states: str = field(default_factory=_gla_states_from_env)
    """What the backward of GLA's chunked form gets for its chunk states on a GPU in the `auto` mode
    (flame/kernels/gla_states.py): `recompute` (bf16, recomputed), `keep` (the forward's bf16 states, saved: no
    recompute, more memory) or `fla` (FLA's own: recomputed in fp32). Default from FLAME_GLA_STATES."""

    def gla_states_taken(self, varlen: bool) -> str | None:
        """What flame's GLA backward does with a GPU call (`recompute` or `keep`), or None where FLA's own takes it:
        outside the `auto` mode, with `fla`, and for varlen calls (cu_seqlens), which have not run on a GPU yet."""
        return self.gla_states if self.mode == "auto" and self.gla_states != "fla" and not varlen else None

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(
                f"unknown kernels mode {self.mode!r}",
                f"use one of {', '.join(MODES)} (option --kernels or FLAME_KERNELS)",
            )
        if self.gla_states not in GLA_STATES:
            raise ConfigError(
                f"unknown GLA states setting {self.gla_states!r}",
                f"use one of {', '.join(GLA_STATES)} (FLAME_GLA_STATES)",
            )
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"kernels chunk_size must be a positive integer, got {self.chunk_size}")


settings = KernelSettings()
