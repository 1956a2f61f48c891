"""SwiGLU's elementwise kernels (silu(x) * y and its backward) over contiguous tensors, on the GPU.

FLA 0.6's `swiglu_fwd` and `swiglu_fwdbwd` (behind the fused MLP's `SwiGLULinearFunction` of every FLA model with
`fuse_swiglu`, and `SwiGLUFunction`) address each element as (row, column) of a strided matrix: an int64 division and
remainder by the width per element. In GLA-1.3B's step on an H200 they moved their bytes at 2.7 TB/s, 15 ms of a
309 ms step (benchmarks/RESULTS.md, twenty-second session). When every tensor is contiguous, which is how FLA's MLP
calls them, the same arithmetic in the same order runs here over flat offsets; what it does not cover (strided
inputs, mixed dtypes) goes to FLA's.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from flame.kernels.config import Launch, settings

LAUNCH = Launch(block=4096, warps=8)
"""The default launch, from benchmarks/swiglu.py --sweep on an H200 (RESULTS.md, twenty-fourth session)."""


@triton.jit
def _fwd_kernel(X, Y, Z, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    z = x * tl.sigmoid(x) * y  # FLA's order of operations
    tl.store(Z + offs, z.to(Z.dtype.element_ty), mask=mask)


@triton.jit
def _fwdbwd_kernel(X, Y, G, DX, DY, Z, N, BLOCK: tl.constexpr, HAS_Z: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(x)
    xs = x * s
    tl.store(DX + offs, (g * s * (1.0 + x * (1.0 - s)) * y).to(DX.dtype.element_ty), mask=mask)
    tl.store(DY + offs, (g * xs).to(DY.dtype.element_ty), mask=mask)
    if HAS_Z:
        tl.store(Z + offs, (xs * y).to(Z.dtype.element_ty), mask=mask)


def covers(*tensors: torch.Tensor) -> bool:
    """Whether these kernels take a call on these tensors (else FLA's do): CUDA, contiguous, one shape and dtype."""
    first = tensors[0]
    return (
        first.is_cuda
        and first.numel() > 0
        and all(t.is_cuda and t.is_contiguous() and t.shape == first.shape and t.dtype == first.dtype for t in tensors)
    )


def _grid(n: int, launch: Launch) -> tuple[int]:
    return (triton.cdiv(n, launch.block),)


def swiglu_fwd(x: torch.Tensor, y: torch.Tensor, launch: Launch = LAUNCH) -> torch.Tensor:
    """silu(x) * y in x's dtype, computed in fp32."""
    z = torch.empty_like(x)
    _fwd_kernel[_grid(x.numel(), launch)](x, y, z, x.numel(), BLOCK=launch.block, num_warps=launch.warps)
    return z


def swiglu_fwdbwd(
    x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, use_weight: bool = False, launch: Launch = LAUNCH
) -> tuple[torch.Tensor, ...]:
    """(dx, dy), and z = silu(x) * y as well with use_weight, for the output gradient g: as FLA's swiglu_fwdbwd."""
    dx, dy = torch.empty_like(x), torch.empty_like(y)
    z = torch.empty_like(x) if use_weight else None
    n = x.numel()
    _fwdbwd_kernel[_grid(n, launch)](
        x, y, g, dx, dy, z, n, BLOCK=launch.block, HAS_Z=use_weight, num_warps=launch.warps
    )  # fmt: skip
    return (dx, dy, z) if use_weight else (dx, dy)


def fwd_in_front_of(original):
    """FLA's `swiglu_fwd`, with flame's kernel taking the calls it covers in the `auto` kernels mode."""

    @functools.wraps(original)
    def swiglu_fwd_(x, y, output_contiguous=False):
        if settings.mode == "auto" and covers(x, y):
            return swiglu_fwd(x, y)  # contiguous inputs: a contiguous output, whatever output_contiguous says
        return original(x=x, y=y, output_contiguous=output_contiguous)

    return swiglu_fwd_


def fwdbwd_in_front_of(original):
    """FLA's `swiglu_fwdbwd`, with flame's kernel taking the calls it covers in the `auto` kernels mode."""

    @functools.wraps(original)
    def swiglu_fwdbwd_(x, y, g, use_weight=False, output_contiguous=False):
        if settings.mode == "auto" and covers(x, y, g):
            return swiglu_fwdbwd(x, y, g, use_weight)
        return original(x=x, y=y, g=g, use_weight=use_weight, output_contiguous=output_contiguous)

    return swiglu_fwdbwd_
