"""Gated linear attention in torch: GLA, RetNet (retention), simple GLA, HGRN2.

All of them are one recurrence over a state S (`[K, V]` per head):

    S_t = diag(exp(gk_t)) S_t-1 diag(exp(gv_t)) + k_t v_t^T,        o_t = scale * S_t^T q_t

with log-space gates `gk` (per key channel) and optional `gv` (per value channel). Two forms compute it:

- `recurrent`: one step per token, FLA's naive reference written once (fla/ops/gla/naive.py). Exact, slow.
- `chunked`: the chunkwise-parallel form of the GLA paper (Yang et al. 2023, "Gated Linear Attention
  Transformers with Hardware-Efficient Training", section 4): inside a chunk of C tokens the outputs come from a
  masked C x C attention, between chunks a loop of T / C steps carries S. The decay between positions i >= j
  inside a chunk is exp(b_i - b_j) with b the cumulative log gate, computed explicitly per key channel
  (a `[C, C, K]` tensor) so that nothing overflows however strong the gates are; everything runs in float32.

Autograd differentiates both forms; no backward is hand-written.
"""

from __future__ import annotations

import torch

from flame.kernels import varlen
from flame.kernels.config import settings
from flame.kernels.modules import down, state_in, state_out, up


def gla_recurrent(q, k, v, gk, gv, h0):
    """q, k, gk: [B, H, T, K]; v, gv: [B, H, T, V]; h0: [B, H, K, V] or None. float32, q already scaled."""
    B, H, T, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1]) if h0 is None else h0
    outs = []
    for t in range(T):
        if gk is not None:
            S = S * gk[:, :, t].exp()[..., None]
        if gv is not None:
            S = S * gv[:, :, t].exp()[..., None, :]
        S = S + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    o = torch.stack(outs, dim=2) if outs else v.new_zeros(v.shape)
    return o, S


def gla_chunked(q, k, v, gk, gv, h0, chunk_size):
    """Chunkwise form of `gla_recurrent`. Every decay factor is exp of a difference <= 0, so none overflows."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    if gk is None:
        gk = torch.zeros_like(k)
    if pad:
        # Zero keys and zero log-gates after the end leave the state as it was at the last real token.
        q, k, v, gk = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v, gk))
        gv = None if gv is None else torch.nn.functional.pad(gv, (0, 0, 0, pad))
    N = (T + pad) // C
    q, k, gk = (x.reshape(B, H, N, C, K) for x in (q, k, gk))
    v = v.reshape(B, H, N, C, V)

    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()[..., None]
    bk = gk.cumsum(dim=-2)  # cumulative log decay inside each chunk, <= 0 and non-increasing
    diff = (bk[..., :, None, :] - bk[..., None, :, :]).masked_fill(~causal, float("-inf"))
    attn = (q[..., :, None, :] * k[..., None, :, :] * diff.exp()).sum(-1)  # [B, H, N, C, C]
    bk_last = bk[..., -1, :]  # [B, H, N, K]
    k_end = k * (bk_last[..., None, :] - bk).exp()
    q_dec = q * bk.exp()
    if gv is None:
        o = attn @ v
        v_end, decay = v, bk_last.exp()[..., None]
    else:
        bv = gv.reshape(B, H, N, C, V).cumsum(dim=-2)
        diff_v = (bv[..., :, None, :] - bv[..., None, :, :]).masked_fill(~causal, float("-inf"))
        o = (attn[..., None] * v[..., None, :, :] * diff_v.exp()).sum(-2)
        bv_last = bv[..., -1, :]
        v_end = v * (bv_last[..., None, :] - bv).exp()
        decay = bk_last.exp()[..., None] * bv_last.exp()[..., None, :]
    kv = k_end.transpose(-1, -2) @ v_end  # the chunk's contribution to S: [B, H, N, K, V]

    S = q.new_zeros(B, H, K, V) if h0 is None else h0
    states = []
    for n in range(N):
        states.append(S)
        S = S * decay[:, :, n] + kv[:, :, n]
    inter = q_dec @ torch.stack(states, dim=2)
    if gv is not None:
        inter = inter * bv.exp()
    o = o + inter
    return o.reshape(B, H, N * C, V)[:, :, :T], S


def _run(q, k, v, gk, gv, scale, initial_state, output_final_state, state_v_first, cu_seqlens, reverse=False):
    """Shared frame of every entry point: layout [B, T, H, D] -> [B, H, T, D] in float32, varlen, state layout."""
    if reverse:
        raise NotImplementedError("reverse=True has no portable torch implementation")
    dtype = v.dtype
    if scale is None:
        scale = q.shape[-1] ** -0.5
    h0 = state_in(initial_state, state_v_first)
    mask = None
    if cu_seqlens is not None:
        mask, (q, k, v, gk, gv) = varlen.pack(cu_seqlens, q, k, v, gk, gv)
    q, k, v = ((up(x).transpose(1, 2)) for x in (q, k, v))
    gk, gv = ((None if x is None else up(x).transpose(1, 2)) for x in (gk, gv))
    q = q * scale
    if settings.chunk_size is None:
        o, S = gla_recurrent(q, k, v, gk, gv, h0)
    else:
        o, S = gla_chunked(q, k, v, gk, gv, h0, settings.chunk_size)
    o = o.transpose(1, 2)
    if mask is not None:
        o = varlen.unpack(o, mask)
    return down(o, dtype), state_out(S, output_final_state, state_v_first)


def chunk_gla(
    q,
    k,
    v,
    g,
    scale=None,
    initial_state=None,
    output_final_state=False,
    state_v_first=False,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
    **kwargs,
):
    """fla.ops.gla.chunk_gla"""
    return _run(q, k, v, g, None, scale, initial_state, output_final_state, state_v_first, cu_seqlens)


def fused_recurrent_gla(
    q,
    k,
    v,
    gk=None,
    gv=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    reverse=False,
    state_v_first=False,
    cu_seqlens=None,
    **kwargs,
):
    """fla.ops.gla.fused_recurrent_gla"""
    return _run(q, k, v, gk, gv, scale, initial_state, output_final_state, state_v_first, cu_seqlens, reverse)


def _scalar_gate(q, g, g_gamma):
    """Simple GLA's per-head decay ([B, T, H] `g` or constant [H] `g_gamma`) as a per-key-channel gate."""
    B, T, H, K = q.shape
    if g is None and g_gamma is None:
        return None
    if g is None:
        g = up(g_gamma).view(1, 1, H).expand(B, T, H)
    return up(g)[..., None].expand(B, T, H, K)


def chunk_simple_gla(
    q,
    k,
    v,
    g=None,
    g_gamma=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    state_v_first=False,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
    **kwargs,
):
    """fla.ops.simple_gla.chunk_simple_gla"""
    gk = _scalar_gate(q, g, g_gamma)
    return _run(q, k, v, gk, None, scale, initial_state, output_final_state, state_v_first, cu_seqlens)


def fused_recurrent_simple_gla(
    q,
    k,
    v,
    g=None,
    g_gamma=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    reverse=False,
    state_v_first=False,
    cu_seqlens=None,
    **kwargs,
):
    """fla.ops.simple_gla.fused_recurrent_simple_gla"""
    gk = _scalar_gate(q, g, g_gamma)
    return _run(q, k, v, gk, None, scale, initial_state, output_final_state, state_v_first, cu_seqlens, reverse)


def _retention_gamma(q):
    # RetNet's fixed per-head decay (Sun et al. 2023): gamma_h = 1 - 2^(-5 - h), as fla.ops.retention sets it.
    return (1 - 2.0 ** (-5.0 - torch.arange(q.shape[2], dtype=torch.float, device=q.device))).log()


def chunk_retention(q, k, v, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kwargs):
    """fla.ops.retention.chunk_retention (and fused_chunk_retention)"""
    gk = _scalar_gate(q, None, _retention_gamma(q))
    state_v_first = kwargs.get("state_v_first", False)
    return _run(q, k, v, gk, None, scale, initial_state, output_final_state, state_v_first, cu_seqlens)


def fused_recurrent_retention(
    q,
    k,
    v,
    scale=None,
    initial_state=None,
    output_final_state=False,
    reverse=False,
    state_v_first=False,
    cu_seqlens=None,
    **kwargs,
):
    """fla.ops.retention.fused_recurrent_retention"""
    gk = _scalar_gate(q, None, _retention_gamma(q))
    return _run(q, k, v, gk, None, scale, initial_state, output_final_state, state_v_first, cu_seqlens, reverse)


def parallel_retention(q, k, v, scale=None, output_attentions=False, cu_seqlens=None):
    """fla.ops.retention.parallel_retention (outputs only; the attention matrix is not materialised)"""
    if output_attentions:
        raise NotImplementedError("parallel_retention(output_attentions=True) has no portable torch implementation")
    o, _ = chunk_retention(q, k, v, scale=scale, cu_seqlens=cu_seqlens)
    return o, None


def _gsa(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens):
    """Gated slot attention (Zhang et al. 2024, "Gated Slot Attention for Efficient Linear-Time Sequence
    Modeling") as FLA's naive_recurrent_gsa defines it: two gated linear attentions through M memory slots,
    the first gated on its value side (the slots), the second on its key side, a softmax over slots between."""
    dtype = v.dtype
    if scale is None:
        scale = q.shape[-1] ** -0.5
    mask = None
    if cu_seqlens is not None:
        mask, (q, k, v, s, g) = varlen.pack(cu_seqlens, q, k, v, s, g)
    s = up(s)
    if g is None:
        # ABC: slot gates from a running softmax normaliser of s
        z = s.logcumsumexp(dim=1)
        g = torch.cat([z[:, :1], z[:, :-1]], dim=1) - z
        s = (s - z).exp()
        if mask is not None:
            s, g = s * mask[..., None, None], g * mask[..., None, None]
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k, v, s, g = (x.repeat_interleave(groups, dim=2) for x in (k, v, s, g))
    hk0, hv0 = (None, None) if initial_state is None else initial_state
    if groups > 1 and hk0 is not None:
        hk0, hv0 = hk0.repeat_interleave(groups, dim=1), hv0.repeat_interleave(groups, dim=1)
    ok, hk = _run(q, k, s, None, g, scale, hk0, True, False, None)
    ov, hv = _run(ok.softmax(dim=-1), s, v, g, None, 1.0, hv0, True, False, None)
    if mask is not None:
        ov = varlen.unpack(ov, mask)
    final = (hk[:, ::groups], hv[:, ::groups]) if output_final_state else None
    return ov.to(dtype), final


def chunk_gsa(
    q,
    k,
    v,
    s,
    g=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    checkpoint_level=2,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
    **kwargs,
):
    """fla.ops.gsa.chunk_gsa"""
    return _gsa(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens)


def fused_recurrent_gsa(
    q, k, v, s, g=None, scale=None, initial_state=None, output_final_state=False, reverse=False, cu_seqlens=None
):
    """fla.ops.gsa.fused_recurrent_gsa"""
    if reverse:
        raise NotImplementedError("reverse=True has no portable torch implementation")
    return _gsa(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens)
