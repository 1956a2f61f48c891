"""transformers >= 5.2x hands the generation cache to `forward(cache=...)`; FLA 0.6.0 models read only
`past_key_values`, so without this every decoding step after the first starts from an empty state. install()
renames the key in the inputs FLA's generation mixin prepares (on every device: it is not a kernel matter)."""

from __future__ import annotations

import functools


def patch_generation_cache_name() -> None:
    from fla.models.generation_utils import FLAGenerationMixin

    prepare = FLAGenerationMixin.prepare_inputs_for_generation
    if getattr(prepare, "__flame_original__", None) is not None:
        return

    @functools.wraps(prepare)
    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = prepare(self, *args, **kwargs)
        if "cache" in inputs and inputs.get("past_key_values") is None:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    prepare_inputs_for_generation.__flame_original__ = prepare
    FLAGenerationMixin.prepare_inputs_for_generation = prepare_inputs_for_generation


class _DropCacheNameWarning:
    """FLA 0.6.0 builds its outputs with `past_key_values=`, which transformers >= 5.2x answers with a
    "`past_key_values`/`cache_params` are deprecated" warning on every run: a matter between those two libraries
    that a flame user can do nothing about, so it is filtered from transformers' logger."""

    def filter(self, record) -> bool:
        return "`past_key_values`/`cache_params` are deprecated" not in record.getMessage()


def quiet_cache_name_warning() -> None:
    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger("transformers.utils.generic")
    if not any(isinstance(f, _DropCacheNameWarning) for f in logger.filters):
        logger.addFilter(_DropCacheNameWarning())


# FLA 0.6.0 refuses the backward pass of its gated `chunk_bwd_dqkwg` (used by chunk_gated_delta_rule and
# chunk_simple_gla with a gate) on Hopper GPUs with Triton >= 3.4.0 and < 3.7.1, which compute it wrongly there
# (fla-org/flash-linear-attention#640). Its TileLang backend stands in for the gated delta rule when tilelang is
# installed, not for simple GLA (whose state stays in float32). Found on an H200 with Triton 3.6.0, 2026-11-28:
# without this check the RuntimeError came mid-step, after minutes of autotuning. With tilelang 0.1.15 installed,
# Gated DeltaNet trained there (2026-11-30: gradients as flame's portable ones, benchmarks/RESULTS.md).
_GATED_DQKWG = {"gated_deltanet": True, "comba": True, "mom": True, "simple_gla": False, "yoco": False}


def _version(text: str) -> tuple[int, ...]:
    import re

    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def _portable(mode: str | None) -> bool:
    """True when flame's portable kernels run on the GPU instead of FLA's Triton ones (install(mode="torch") or
    FLAME_KERNELS=torch): then no Triton limitation applies. None asks the installed setting."""
    if mode is None:
        from flame.kernels import settings

        mode = settings.mode
    return mode == "torch"


def hopper_triton_blocker(
    model_type: str,
    *,
    capability: tuple[int, int] | None = None,
    device_name: str = "",
    triton_version: str | None = None,
    tilelang: bool | None = None,
    mode: str | None = None,
) -> tuple[str, str] | None:
    """(why FLA will refuse to train `model_type` on this GPU, the fix), or None. With no arguments, asks CUDA,
    Triton and the installed packages; the arguments let a test describe another machine."""
    if model_type not in _GATED_DQKWG or _portable(mode):
        return None
    if capability is None:
        import torch

        if not torch.cuda.is_available():
            return None
        capability, device_name = torch.cuda.get_device_capability(), torch.cuda.get_device_name()
    if capability[0] != 9:
        return None
    if triton_version is None:
        import triton

        triton_version = triton.__version__
    if not (3, 4, 0) <= _version(triton_version) < (3, 7, 1):
        return None
    if tilelang is None:
        import importlib.util

        tilelang = importlib.util.find_spec("tilelang") is not None
    if tilelang and _GATED_DQKWG[model_type]:
        return None
    # tilelang first where it applies: it was run (H200, 2026-11-30) and leaves torch's pinned Triton alone; a fixed
    # Triton comes with torch 2.13 (which requires triton==3.7.1), and a newer Triton under an older torch conflicts.
    fix = "pip install 'torch>=2.13' (its Triton 3.7.1 is fixed)"
    if _GATED_DQKWG[model_type]:
        fix = f"pip install tilelang (FLA then runs that kernel in TileLang), or {fix}"
    why = (
        f"{model_type} cannot train on this {device_name or 'Hopper GPU'} with Triton {triton_version}: "
        "FLA refuses its backward pass there (wrong results on Hopper with Triton 3.4.0 to 3.7.0, "
        "flash-linear-attention#640)"
    )
    return why, f"{fix}, or train on another GPU (or with flame's slower portable kernels: FLAME_KERNELS=torch)"


def triton_shape_blocker(config, *, mode: str | None = None) -> tuple[str, str] | None:
    """(why FLA's Triton kernels cannot compile for this model's shapes, the fix), or None. FLA 0.6.0's chunked
    GLA kernels tile a dimension of size D by next_power_of_2(D), and Triton's dot needs tiles of at least 16:
    GSA feeds its memory slots through them as a head dimension, so `num_slots` below 16 ends in a Triton
    CompilationError ("K >= 16") mid-step. Found on an H200 with a GSA of 8 slots, 2026-11-29."""
    if _portable(mode):
        return None
    slots = getattr(config, "num_slots", None) if getattr(config, "model_type", None) == "gsa" else None
    if slots is not None and slots < 16:
        return (
            f"gsa with num_slots={slots} cannot run on FLA's Triton kernels: they need at least 16 slots",
            "set num_slots to 16 or more in the model config (FLA's default is 64)",
        )
    return None
