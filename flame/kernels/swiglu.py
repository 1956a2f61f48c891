"""SwiGLU's elementwise kernels (silu(x) * y and its backward) over contiguous tensors, and the fused MLP's
down projection around them, on the GPU.

FLA 0.6's `swiglu_fwd` and `swiglu_fwdbwd` (behind the fused MLP's `SwiGLULinearFunction` of every FLA model with
`fuse_swiglu`, and `SwiGLUFunction`) address each element as (row, column) of a strided matrix: an int64 division and
remainder by the width per element. In GLA-1.3B's step on an H200 they moved their bytes at 2.7 TB/s, 15 ms of a
309 ms step (benchmarks/RESULTS.md, twenty-second session). When every tensor is contiguous, which is how FLA's MLP
calls them, the same arithmetic in the same order runs here over flat offsets; what it does not cover (strided
inputs, mixed dtypes) goes to FLA's.

`SwiGLULinear` stands in front of FLA's `swiglu_linear` (linear(silu(x) * y), the product recomputed in the
backward), which under autocast casts the down projection's fp32 weight to bf16 twice (the forward's cast is not
kept, so the backward casts again) and returns its gradient in bf16 for autograd to widen in a pass of its own. Here
the weight is cast once and the bf16 copy kept for the backward (what autocast's cast of an unfused linear keeps), and
cuBLAS writes the weight's gradient in fp32 from its fp32 accumulator, as flame's grouped projections do
(flame/projections.py). The output and the input gradients are FLA's bits; the weight gradient is the unrounded one.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from flame.kernels.config import Launch, settings
from flame.projections import bias_grad, weight_grad

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


class SwiGLULinear(torch.autograd.Function):
    """linear(silu(x) * y, weight, bias) with the product recomputed in the backward, as FLA's
    `SwiGLULinearFunction`; `dtype` the compute dtype the weight and bias are cast to (autocast's), or None to use
    them as they are. The cast weight is kept for the backward; the weight's and bias's gradients come back in their
    own dtype (fp32 straight out of the GEMM on a GPU)."""

    @staticmethod
    def forward(ctx, x, y, weight, bias, dtype):
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        if dtype is not None:
            weight = weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        ctx.save_for_backward(x, y, weight)
        return F.linear(swiglu_fwd(x, y), weight, bias)

    @staticmethod
    def backward(ctx, dout):
        x, y, weight = ctx.saved_tensors
        g = dout.reshape(-1, dout.shape[-1])
        dx = dy = z = dw = db = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dz = (g @ weight).view(x.shape)
            if ctx.needs_input_grad[2]:
                dx, dy, z = swiglu_fwdbwd(x, y, dz, True)
            else:
                dx, dy = swiglu_fwdbwd(x, y, dz)
        elif ctx.needs_input_grad[2]:
            z = swiglu_fwd(x, y)
        if ctx.needs_input_grad[2]:
            dw = weight_grad(g, z.reshape(-1, z.shape[-1]), ctx.dtypes[0])
        if ctx.needs_input_grad[3]:
            db = bias_grad(g, ctx.dtypes[1])
        return dx, dy, dw, db, None


def linear_in_front_of(original):
    """FLA's `swiglu_linear`, with flame's `SwiGLULinear` taking the calls it covers in the `auto` kernels mode:
    under CUDA autocast (where the casts are; FSDP and DeepSpeed train bf16 weights without it), on contiguous CUDA
    inputs in autocast's dtype. Under torch.compile FLA's runs (its dispatcher runs it outside the graph)."""

    @functools.wraps(original)
    def swiglu_linear_(x, y, weight, bias):
        if (
            settings.mode == "auto"
            and torch.is_autocast_enabled("cuda")
            and not torch.compiler.is_compiling()
            and covers(x, y)
            and weight.is_cuda
            and x.dtype == torch.get_autocast_dtype("cuda")
        ):
            with torch.autocast("cuda", enabled=False):
                return SwiGLULinear.apply(x, y, weight, bias, x.dtype)
        return original(x, y, weight, bias)

    return swiglu_linear_
