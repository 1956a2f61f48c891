"""A faster backward for FLA's layer and RMS norms at wide rows (D > 512), on the GPU.

FLA 0.6 runs the backward of `LayerNormFunction` (every block's two prenorms and the final norm of GLA, Gated
DeltaNet and most FLA models) at D > 512 with one program per SM, each walking its share of the rows one row at a
time. At GLA-340M's shapes (65,536 rows of 1,024 at batch 32) that leaves each SM one program, waiting on memory
for each row in turn. This kernel gives every program a tile of rows and launches several programs per SM, so the
loads of one hide behind the arithmetic of another; each program keeps its partial weight (and bias) gradient,
summed after. Same arguments and results as FLA's `layer_norm_bwd`, except that an fp32 residual stream's gradient
stays fp32 (FLA's row kernel rounds it to bf16 first); what it does not cover (grouped norms, recomputing the output
for `LayerNormLinearFunction`, rows of 512 or less, which FLA already tiles) goes to FLA's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from flame.kernels.config import settings


@dataclass(frozen=True)
class Launch:
    rows: int
    """Rows per tile: each step of a program's loop reads this many whole rows."""
    warps: int
    waves: int
    """Programs per SM (each takes an equal share of the rows)."""


def launch_for(width: int) -> Launch:
    """The launch for rows of `width`, from benchmarks/norm_backward.py --sweep on an H200 (RESULTS.md, twentieth
    session): 8 rows of 1,024 a tile, 4 warps, 2 programs per SM were the fastest or within 5% of it at 16K and 64K
    rows; wider rows take fewer per tile (the same registers), and 4 warps stayed best up to rows of 4,096."""
    return Launch(rows=max(1, 8192 // triton.next_power_of_2(width)), warps=4, waves=2)


@triton.jit
def _norm_bwd_kernel(
    X, W, B, DY, DRES, DX, DRES_IN, DW, DB, MEAN, RSTD,
    T, SPAN,
    D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_DRES: tl.constexpr, STORE_DRES_IN: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BD)
    in_row = cols < D
    if HAS_W:
        w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
        dw = tl.zeros((BT, BD), dtype=tl.float32)
    if HAS_B:
        db = tl.zeros((BT, BD), dtype=tl.float32)
    first = pid.to(tl.int64) * SPAN
    for start in range(0, SPAN, BT):
        rows = first + start + tl.arange(0, BT)
        live = rows < T
        at = rows[:, None] * D + cols[None, :]
        mask = live[:, None] & in_row[None, :]
        x = tl.load(X + at, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + at, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=live, other=0.0)
        if IS_RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=live, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            wdy = dy * w[None, :]
            dw += dy * xhat
        else:
            wdy = dy
        if HAS_B:
            db += dy
        c1 = tl.sum(xhat * wdy, axis=1) / D
        if IS_RMS:
            dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(wdy, axis=1) / D
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DRES:
            dx += tl.load(DRES + at, mask=mask, other=0.0).to(tl.float32)
        if STORE_DRES_IN:
            tl.store(DRES_IN + at, dx.to(DRES_IN.dtype.element_ty), mask=mask)
        tl.store(DX + at, dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_W:
        tl.store(DW + pid * D + cols, tl.sum(dw, axis=0), mask=in_row)
    if HAS_B:
        tl.store(DB + pid * D + cols, tl.sum(db, axis=0), mask=in_row)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def covers(dy: torch.Tensor, x: torch.Tensor, dres: torch.Tensor | None, num_groups: int, recompute_output: bool):
    """Whether norm_backward takes this call (else FLA's own backward does)."""
    return (
        x.is_cuda
        and x.dim() == 2
        and x.shape[0] > 0
        and x.shape[-1] > 512
        and num_groups == 1
        and not recompute_output
        and x.is_contiguous()
        and dy.is_contiguous()
        and (dres is None or dres.is_contiguous())
    )


def in_front_of(original):
    """FLA's `layer_norm_bwd` with norm_backward taking the calls it covers, in the `auto` kernels mode (`triton`
    runs FLA's own kernels only)."""

    @functools.wraps(original)
    def layer_norm_bwd(
        dy, x, weight, bias, mean=None, rstd=None, dres=None, has_residual=False, is_rms_norm=False, x_dtype=None,
        recompute_output=False, num_groups=1,
    ):  # fmt: skip
        if settings.mode == "auto" and covers(dy, x, dres, num_groups, recompute_output):
            return norm_backward(dy, x, weight, bias, mean, rstd, dres, has_residual, is_rms_norm, x_dtype)
        return original(
            dy=dy, x=x, weight=weight, bias=bias, mean=mean, rstd=rstd, dres=dres, has_residual=has_residual,
            is_rms_norm=is_rms_norm, x_dtype=x_dtype, recompute_output=recompute_output, num_groups=num_groups,
        )  # fmt: skip

    return layer_norm_bwd


def norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor | None = None,
    rstd: torch.Tensor | None = None,
    dres: torch.Tensor | None = None,
    has_residual: bool = False,
    is_rms_norm: bool = False,
    x_dtype: torch.dtype | None = None,
    launch: Launch | None = None,
):
    """(dx, dw, db, dres_in) as FLA's `layer_norm_bwd` returns them, for a call `covers` accepts."""
    T, D = x.shape
    launch = launch or launch_for(D)
    dx = torch.empty(T, D, dtype=x_dtype or x.dtype, device=x.device)
    # The residual's gradient is dx itself unless the residual stream keeps another dtype (fp32) than the input.
    dres_in = torch.empty_like(x) if has_residual and dx.dtype != x.dtype else None
    BD = triton.next_power_of_2(D)
    programs = max(1, min(triton.cdiv(T, launch.rows), _sm_count(x.device.index) * launch.waves))
    span = triton.cdiv(triton.cdiv(T, programs), launch.rows) * launch.rows
    programs = triton.cdiv(T, span)
    dw = torch.empty(programs, D, dtype=torch.float32, device=x.device) if weight is not None else None
    db = torch.empty(programs, D, dtype=torch.float32, device=x.device) if bias is not None else None
    _norm_bwd_kernel[(programs,)](
        x, weight, bias, dy, dres, dx, dres_in, dw, db, mean, rstd,
        T, span,
        D=D, BT=launch.rows, BD=BD,
        IS_RMS=is_rms_norm, HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_DRES=dres is not None, STORE_DRES_IN=dres_in is not None,
        num_warps=launch.warps,
    )  # fmt: skip
    dw = dw.sum(0).to(weight.dtype) if weight is not None else None
    db = db.sum(0).to(bias.dtype) if bias is not None else None
    if has_residual and dres_in is None:
        dres_in = dx
    return dx, dw, db, dres_in
