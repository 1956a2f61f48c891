"""RWKV-7 in torch: the diagonal-plus-low-rank (DPLR) delta rule and the small fused ops around it.

    S_t = diag(exp(w_t)) S_t-1 + k_t v_t^T + b_t (a_t^T S_t-1),     o_t = scale * S_t^T r_t

(state `[K, V]`; RWKV-7 "Goose", Peng et al. 2025, passes a = -kk, b = kk * a). `recurrent` is FLA's naive
dplr_recurrence (fla/ops/generalized_delta_rule/dplr/naive.py); `chunked` solves a chunk at once. With incoming
state S, cumulative log decay c (c' = c - w, the decay before the current token) and for j < i

    A_ak[i,j] = sum_d a_i k_j exp(c'_i - c_j),  A_ab[i,j] = sum_d a_i b_j exp(c'_i - c_j)

the low-rank reads U (rows u_i = a_i^T S_i-1) satisfy (I - A_ab) U = A_ak V + (a * exp(c')) S, one unit-triangular
solve; then O = (r * exp(c)) S + A_rk V + A_rb U (j <= i) and S' = exp(c_C) S + (k e)^T V + (b e)^T U with
e = exp(c_C - c). Every exponent is a difference <= 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flame.kernels import varlen
from flame.kernels.config import settings
from flame.kernels.modules import down, up


def dplr_recurrent(q, k, v, a, b, w, h0):
    """All [B, H, T, D] float32 (q scaled); h0 [B, H, K, V] or None."""
    B, H, T, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1]) if h0 is None else h0
    outs = []
    for t in range(T):
        read = torch.einsum("bhk,bhkv->bhv", a[:, :, t], S)
        S = (
            S * w[:, :, t].exp()[..., None]
            + k[:, :, t, :, None] * v[:, :, t, None, :]
            + b[:, :, t, :, None] * read[..., None, :]
        )
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(outs, dim=2), S


def _pairs(x, y, diff, mask):
    """sum_d x_i[d] y_j[d] exp(diff[i, j, d]) where mask[i, j], else 0: [..., C, C]."""
    return (x[..., :, None, :] * y[..., None, :, :] * diff.masked_fill(~mask, float("-inf")).exp()).sum(-1)


def dplr_chunked(q, k, v, a, b, w, h0, chunk_size):
    B, H, T, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    if pad:
        # zero keys, b and log decay after the end: the state passes through unchanged
        q, k, v, a, b, w = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, a, b, w))
    N = (T + pad) // C
    q, k, a, b, w = (x.reshape(B, H, N, C, K) for x in (q, k, a, b, w))
    v = v.reshape(B, H, N, C, V)
    c = w.cumsum(dim=-2)
    c_before = c - w
    ones = torch.ones(C, C, dtype=torch.bool, device=q.device)
    incl, strict = ones.tril()[..., None], ones.tril(-1)[..., None]
    d_incl = c[..., :, None, :] - c[..., None, :, :]
    d_strict = c_before[..., :, None, :] - c[..., None, :, :]
    A_qk, A_qb = _pairs(q, k, d_incl, incl), _pairs(q, b, d_incl, incl)
    A_ak, A_ab = _pairs(a, k, d_strict, strict), _pairs(a, b, d_strict, strict)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = torch.cat([A_ak @ v, a * c_before.exp()], dim=-1)
    sol = torch.linalg.solve_triangular(eye - A_ab, rhs, upper=False, unitriangular=True)
    u_v, w_s = sol[..., :V], sol[..., V:]  # U = u_v + w_s @ S
    q_dec = q * c.exp()
    e = (c[..., -1:, :] - c).exp()
    k_end, b_end = k * e, b * e
    o_local = A_qk @ v

    S = q.new_zeros(B, H, K, V) if h0 is None else h0
    outs = []
    for n in range(N):
        u = u_v[:, :, n] + w_s[:, :, n] @ S
        outs.append(o_local[:, :, n] + q_dec[:, :, n] @ S + A_qb[:, :, n] @ u)
        S = (
            S * c[:, :, n, -1, :, None].exp()
            + k_end[:, :, n].transpose(-1, -2) @ v[:, :, n]
            + b_end[:, :, n].transpose(-1, -2) @ u
        )
    return torch.stack(outs, dim=2).reshape(B, H, N * C, V)[:, :, :T], S


def _run(q, k, v, a, b, w, scale, initial_state, output_final_state, cu_seqlens):
    dtype = v.dtype
    if scale is None:
        scale = q.shape[-1] ** -0.5
    h0 = None if initial_state is None else up(initial_state)
    mask = None
    if cu_seqlens is not None:
        mask, (q, k, v, a, b, w) = varlen.pack(cu_seqlens, q, k, v, a, b, w)
    q, k, v, a, b, w = (up(x).transpose(1, 2) for x in (q, k, v, a, b, w))
    q = q * scale
    if settings.chunk_size is None:
        o, S = dplr_recurrent(q, k, v, a, b, w, h0)
    else:
        o, S = dplr_chunked(q, k, v, a, b, w, h0, settings.chunk_size)
    o = o.transpose(1, 2)
    if mask is not None:
        o = varlen.unpack(o, mask)
    return down(o, dtype), (S if output_final_state else None)


def chunk_rwkv7(
    r,
    w,
    k,
    v,
    a,
    b,
    scale=1.0,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
    safe_gate=False,
    chunk_size=None,
    disable_recompute=False,
    cp_context=None,
    lower_bound=None,
):
    """fla.ops.rwkv7.chunk_rwkv7"""
    if cp_context is not None:
        raise NotImplementedError("context parallelism has no portable torch implementation")
    return _run(r, k, v, a, b, w, scale, initial_state, output_final_state, cu_seqlens)


def fused_recurrent_rwkv7(
    r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=False, reverse=False, cu_seqlens=None, **kw
):
    """fla.ops.rwkv7.fused_recurrent_rwkv7"""
    if reverse:
        raise NotImplementedError("reverse=True has no portable torch implementation")
    return _run(r, k, v, a, b, w, scale, initial_state, output_final_state, cu_seqlens)


def fused_mul_recurrent_rwkv7(
    r, w, k, v, kk, a, scale=1.0, initial_state=None, output_final_state=False, reverse=False, cu_seqlens=None
):
    """fla.ops.rwkv7.fused_mul_recurrent_rwkv7: the DPLR rule with a = -kk, b = kk * a"""
    if reverse:
        raise NotImplementedError("reverse=True has no portable torch implementation")
    return _run(r, k, v, -kk, kk * a, w, scale, initial_state, output_final_state, cu_seqlens)


def fused_addcmul_rwkv7(hidden_states, delta, xr, xw, xk, xv, xa, xg=None):
    """fla.ops.rwkv7.fused_addcmul.fused_addcmul_rwkv7: hidden + delta * x_i for each of the six mixes"""
    out = [torch.addcmul(hidden_states, delta, x) for x in (xr, xw, xk, xv, xa)]
    return (*out, None if xg is None else torch.addcmul(hidden_states, delta, xg))


def fused_k_rwkv7(k, a, ka, cu_seqlens=None, cu_seqlens_cpu=None):
    """fla.ops.rwkv7.fused_k_update.fused_k_rwkv7: k * (1 + (a - 1) * ka)"""
    return k.addcmul(k * (a - 1), ka)


def gate_output_correction(o, r, k, r_k, v, g):
    """fla.ops.rwkv7.gate_output_correction: (o + ((r * k * r_k).sum(-1) * v)) * g"""
    correction = ((r * k * r_k[None, None]).sum(-1, keepdim=True) * v).reshape(o.shape)
    return (o + correction) * g
