"""The (gated) delta rule in torch: DeltaNet and Gated DeltaNet.

    S_t = a_t S_t-1 + k_t u_t^T,   u_t = beta_t (v_t - a_t S_t-1^T k_t),   o_t = scale * S_t^T q_t

with a_t = exp(g_t) a scalar decay per head (a_t = 1 for DeltaNet). `recurrent` runs it token by token, as
FLA's naive references do (fla/ops/delta_rule/naive.py, fla/ops/gated_delta_rule/naive.py). `chunked` is the
chunkwise form with the WY / UT representation (Yang et al. 2024, "Parallelizing Linear Transformers with the
Delta Rule over Sequence Length"; Gated: Yang, Kautz, Hatamizadeh 2024): inside a chunk with incoming state S,

    (I + M) U = diag(beta) (V - diag(gamma) K S),   M_ij = beta_i (gamma_i / gamma_j) k_i.k_j  for j < i

so U = U_v - W S with U_v = (I + M)^-1 diag(beta) V and W = (I + M)^-1 diag(beta gamma) K, both independent of
S and solved for all chunks at once (one unit-triangular solve); then

    O = diag(gamma) Q S + (Q K^T * Gamma)_{j <= i} U,   S' = gamma_C S + (K * gamma_C / gamma)^T U

with gamma the cumulative decay inside the chunk and Gamma_ij = gamma_i / gamma_j, taken as exp of differences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flame.kernels import varlen
from flame.kernels.config import settings
from flame.kernels.modules import down, l2norm, state_in, state_out, up


def delta_recurrent(q, k, v, beta, g, h0):
    """q, k: [B, H, T, K]; v: [B, H, T, V]; beta, g: [B, H, T] (g None: no decay). float32, q scaled."""
    B, H, T, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1]) if h0 is None else h0
    outs = []
    for t in range(T):
        if g is not None:
            S = S * g[:, :, t].exp()[..., None, None]
        u = beta[:, :, t, None] * (v[:, :, t] - torch.einsum("bhk,bhkv->bhv", k[:, :, t], S))
        S = S + k[:, :, t, :, None] * u[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    o = torch.stack(outs, dim=2) if outs else v.new_zeros(v.shape)
    return o, S


def delta_chunked(q, k, v, beta, g, h0, chunk_size):
    """Chunkwise form of `delta_recurrent` (see the module docstring)."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    if g is None:
        g = torch.zeros_like(beta)
    if pad:
        # beta = 0 and g = 0 after the end: the state passes through the padding unchanged.
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    N = (T + pad) // C
    q, k = (x.reshape(B, H, N, C, K) for x in (q, k))
    v = v.reshape(B, H, N, C, V)
    beta, b = beta.reshape(B, H, N, C), g.reshape(B, H, N, C).cumsum(dim=-1)

    ones = torch.ones(C, C, dtype=torch.bool, device=q.device)
    incl, strict = ones.tril(), ones.tril(-1)
    diff = b[..., :, None] - b[..., None, :]
    gamma_ij = diff.masked_fill(~incl, float("-inf")).exp()  # [B, H, N, C, C], zero above the diagonal
    M = (beta[..., None] * gamma_ij * (k @ k.transpose(-1, -2))).masked_fill(~strict, 0.0)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = torch.cat([beta[..., None] * v, (beta * b.exp())[..., None] * k], dim=-1)
    sol = torch.linalg.solve_triangular(eye + M, rhs, upper=False, unitriangular=True)
    u_v, w = sol[..., :V], sol[..., V:]
    P = (q @ k.transpose(-1, -2)) * gamma_ij  # [B, H, N, C, C]
    q_dec = q * b.exp()[..., None]
    k_dec = k * (b[..., -1:] - b).exp()[..., None]

    S = q.new_zeros(B, H, K, V) if h0 is None else h0
    outs = []
    for n in range(N):
        u = u_v[:, :, n] - w[:, :, n] @ S
        outs.append(q_dec[:, :, n] @ S + P[:, :, n] @ u)
        S = S * b[:, :, n, -1, None, None].exp() + k_dec[:, :, n].transpose(-1, -2) @ u
    o = torch.stack(outs, dim=2).reshape(B, H, N * C, V)[:, :, :T]
    return o, S


def _run(q, k, v, beta, g, scale, initial_state, output_final_state, state_v_first, cu_seqlens, use_qk_l2norm):
    """Shared frame: [B, T, H, D] -> [B, H, T, D] float32, grouped value heads, varlen, state layout."""
    dtype = v.dtype
    if scale is None:
        scale = k.shape[-1] ** -0.5
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if beta is None:
        beta = torch.ones_like(q[..., 0])
    if v.shape[2] != q.shape[2]:
        # Grouped value attention (GVA): value head j reads query/key head j // (HV / H).
        rep = v.shape[2] // q.shape[2]
        q, k = (x.repeat_interleave(rep, dim=2) for x in (q, k))
    h0 = state_in(initial_state, state_v_first)
    mask = None
    if cu_seqlens is not None:
        mask, (q, k, v, beta, g) = varlen.pack(cu_seqlens, q, k, v, beta, g)
    q, k, v = (up(x).transpose(1, 2) for x in (q, k, v))
    beta = up(beta).transpose(1, 2)
    g = None if g is None else up(g).transpose(1, 2)
    q = q * scale
    if settings.chunk_size is None:
        o, S = delta_recurrent(q, k, v, beta, g, h0)
    else:
        o, S = delta_chunked(q, k, v, beta, g, h0, settings.chunk_size)
    o = o.transpose(1, 2)
    if mask is not None:
        o = varlen.unpack(o, mask)
    return down(o, dtype), state_out(S, output_final_state, state_v_first)


def chunk_delta_rule(
    q,
    k,
    v,
    beta,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
    **kwargs,
):
    """fla.ops.delta_rule.chunk_delta_rule"""
    return _run(
        q, k, v, beta, None, scale, initial_state, output_final_state, False, cu_seqlens, use_qk_l2norm_in_kernel
    )


def fused_recurrent_delta_rule(
    q,
    k,
    v,
    beta=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    cu_seqlens=None,
    **kwargs,
):
    """fla.ops.delta_rule.fused_recurrent_delta_rule"""
    return _run(
        q, k, v, beta, None, scale, initial_state, output_final_state, False, cu_seqlens, use_qk_l2norm_in_kernel
    )


def _gates(g, beta, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, allow_neg_eigval):
    if use_gate_in_kernel:
        # fla.ops.gated_delta_rule.gate.naive_gdn_gate: g = -exp(A_log) * softplus(g + dt_bias)
        g = up(g) if dt_bias is None else up(g) + up(dt_bias)
        g = -up(A_log).exp() * F.softplus(g)
    if use_beta_sigmoid_in_kernel:
        beta = torch.sigmoid(up(beta))
        if allow_neg_eigval:
            beta = beta * 2.0
    return g, beta


def chunk_gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    use_beta_sigmoid_in_kernel=False,
    allow_neg_eigval=False,
    state_v_first=False,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
    chunk_indices=None,
    cp_context=None,
    **kwargs,
):
    """fla.ops.gated_delta_rule.chunk_gated_delta_rule"""
    if cp_context is not None:
        raise NotImplementedError("context parallelism has no portable torch implementation")
    state_v_first = kwargs.pop("transpose_state_layout", state_v_first)
    g, beta = _gates(
        g,
        beta,
        kwargs.get("use_gate_in_kernel", False),
        kwargs.get("A_log"),
        kwargs.get("dt_bias"),
        use_beta_sigmoid_in_kernel,
        allow_neg_eigval,
    )
    return _run(
        q, k, v, beta, g, scale, initial_state, output_final_state, state_v_first, cu_seqlens, use_qk_l2norm_in_kernel
    )


def fused_recurrent_gated_delta_rule(
    q,
    k,
    v,
    g=None,
    gk=None,
    gv=None,
    beta=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    use_gate_in_kernel=False,
    A_log=None,
    dt_bias=None,
    use_beta_sigmoid_in_kernel=False,
    allow_neg_eigval=False,
    state_v_first=False,
    cu_seqlens=None,
    **kwargs,
):
    """fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule (scalar gate g only)"""
    if gk is not None or gv is not None:
        raise NotImplementedError("per-channel gates gk/gv have no portable torch implementation")
    state_v_first = kwargs.pop("transpose_state_layout", state_v_first)
    g, beta = _gates(g, beta, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, allow_neg_eigval)
    return _run(
        q, k, v, beta, g, scale, initial_state, output_final_state, state_v_first, cu_seqlens, use_qk_l2norm_in_kernel
    )
