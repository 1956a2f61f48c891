"""Portable torch implementations of FLA's Triton kernels, so FLA models train and generate on CPU.

    import flame.kernels
    flame.kernels.install()            # idempotent; safe on GPU machines
    model = GLAForCausalLM(config)     # CPU tensors -> torch code; CUDA tensors -> FLA's Triton kernels
    model(input_ids, labels=input_ids).loss.backward()

After install(), every FLA entry point listed in flame/kernels/registry.py dispatches per call on the device
of its tensors. `install(mode="torch")` or FLAME_KERNELS=torch forces the torch code on a GPU too (to debug or
to compare with Triton); `mode="triton"` always runs FLA's own kernels. Public ops of fla.ops without a torch
version raise a ModelError naming the op and the model type when they are called on CPU. On the GPU, in the
default `auto` mode, flame also puts a faster kernel of its own in front of the FLA functions that
registry.GPU_TARGETS lists (the backward of FLA's norms at rows wider than 512: flame/kernels/norm_backward.py; GLA's
backward with bf16 chunk states: flame/kernels/gla_states.py; SwiGLU's elementwise kernels over contiguous tensors
and the fused MLP's down projection around them: flame/kernels/swiglu.py).

Checked against flash-linear-attention 0.6.x (FLA_VERSIONS); install() refuses other versions and FLA
internals it does not recognise with one ModelError, instead of patching something it does not know.
"""

from __future__ import annotations

from flame.errors import ModelError
from flame.kernels.config import MODES, KernelSettings, settings

FLA_VERSIONS = (">=0.6.0", "<0.7")
"""The flash-linear-attention releases whose internals flame.kernels was checked against."""

_installed = False


def _check_fla_version(version: str) -> None:
    parts = version.split("+")[0].split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        major, minor = -1, -1
    if (major, minor) != (0, 6):
        raise ModelError(
            f"flame.kernels was checked against flash-linear-attention 0.6.x, found {version}",
            "install flash-linear-attention>=0.6.0,<0.7 (pip install 'flash-linear-attention>=0.6.0,<0.7')",
        )


def _check_targets(targets, version: str) -> None:
    from flame.kernels import dispatch

    for target in targets:
        try:
            dispatch.resolve(target.path)
        except (ImportError, AttributeError) as error:
            raise ModelError(
                f"flash-linear-attention {version} does not have {target.path}, which flame.kernels patches",
                "install flash-linear-attention>=0.6.0,<0.7, the versions flame.kernels was checked against",
            ) from error


def install(mode: str | None = None, chunk_size: int | None | str = "keep") -> KernelSettings:
    """Put the torch kernels behind FLA's entry points (once per process) and return the settings in force.

    mode: "auto" (torch on CPU, Triton on GPU), "torch" (torch everywhere) or "triton"; None keeps the current
    mode (FLAME_KERNELS, default auto). chunk_size: tokens per chunk of the chunked forms, None for the per-token
    recurrence; left out keeps the current one.
    """
    global _installed
    if mode is not None:
        settings.mode = mode.strip().lower()
    if chunk_size != "keep":
        settings.chunk_size = chunk_size
    settings.validate()
    if _installed:
        return settings

    import warnings

    with warnings.catch_warnings():
        # On a machine without a GPU, FLA warns that Triton "rolls back to CPU"; flame runs its own torch
        # versions there instead, so the warning would only be noise above every command's output.
        warnings.filterwarnings("ignore", message="Triton is not supported on current platform")
        import fla

    _check_fla_version(fla.__version__)
    # fla imports its layers lazily enough that some modules holding kernel names are not loaded yet.
    import fla.layers  # noqa: F401
    import fla.models  # noqa: F401
    import fla.modules  # noqa: F401

    from flame.kernels import dispatch, registry

    _check_targets((*registry.TARGETS, *registry.GPU_TARGETS), fla.__version__)  # all or nothing
    for target in registry.TARGETS:
        dispatch.patch(target)
    for target in registry.GPU_TARGETS:
        dispatch.patch_gpu(target)
    dispatch.guard_uncovered_ops()
    from flame.kernels.compat import patch_generation_cache_name, quiet_cache_name_warning

    patch_generation_cache_name()
    quiet_cache_name_warning()
    _installed = True
    return settings


def is_installed() -> bool:
    return _installed


def check_model(model_type: str) -> None:
    """Raise a ModelError when a model type has no CPU path (call before building a model on CPU)."""
    from flame.kernels.registry import SUPPORTED_MODEL_TYPES

    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"model type {model_type!r} has no portable torch kernels, so it cannot run on CPU",
            f"run it on a CUDA GPU, or on CPU use one of: {', '.join(SUPPORTED_MODEL_TYPES)}",
        )


def __getattr__(name: str):
    if name == "SUPPORTED_MODEL_TYPES":
        from flame.kernels.registry import SUPPORTED_MODEL_TYPES

        return SUPPORTED_MODEL_TYPES
    raise AttributeError(name)


__all__ = ["FLA_VERSIONS", "MODES", "KernelSettings", "check_model", "install", "is_installed", "settings"]
