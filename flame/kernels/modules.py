"""Torch versions of the Triton kernels behind `fla.modules`: norms, activations, short convolution, losses.

Each function takes the arguments of the FLA autograd Function (or function) it stands in for, minus `ctx`,
and computes what the Triton kernel computes: float32 inside, the input's dtype out. Autograd differentiates
them; none has a hand-written backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flame.kernels import varlen


def up(x: torch.Tensor) -> torch.Tensor:
    """Compute in float32 at least, as the Triton kernels do; float64 stays float64 (gradcheck)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An op's result in the caller's dtype and contiguous, as FLA's kernels return it. The recurrences compute
    in `[B, H, T, D]` and hand back a transposed view otherwise, whose memory order differs from the Triton
    output's: callers that `.view` it, or draw `torch.randn_like` cotangents for it, would see another tensor."""
    return x.contiguous() if x.dtype == dtype else x.to(dtype, memory_format=torch.contiguous_format)


def state_in(h0: torch.Tensor | None, state_v_first: bool) -> torch.Tensor | None:
    """An initial recurrent state as the torch recurrences take it: float32, `[..., K, V]` (FLA may pass `[..., V, K]`
    with transpose_state_layout)."""
    if h0 is None:
        return None
    h0 = up(h0)
    return h0.transpose(-1, -2) if state_v_first else h0


def state_out(S: torch.Tensor, output_final_state: bool, state_v_first: bool) -> torch.Tensor | None:
    """The final state in the layout the caller asked for, or None when it asked for none."""
    if not output_final_state:
        return None
    return S.transpose(-1, -2).contiguous() if state_v_first else S


# --- norms ------------------------------------------------------------------------------------------------------


def _norm(x, weight, bias, residual, eps, residual_in_fp32, is_rms_norm, num_groups=1):
    """Returns (y in float32, pre-norm sum in its storage dtype) as FLA's layer_norm_fwd does."""
    res = up(x) if residual is None else up(x) + up(residual)
    res_dtype = residual.dtype if residual is not None else (torch.float32 if residual_in_fp32 else x.dtype)
    shape = res.shape
    xg = res.reshape(*shape[:-1], num_groups, shape[-1] // num_groups)
    if not is_rms_norm:
        xg = xg - xg.mean(dim=-1, keepdim=True)
    y = (xg * torch.rsqrt(xg.square().mean(dim=-1, keepdim=True) + eps)).reshape(shape)
    if weight is not None:
        y = y * up(weight)
    if bias is not None:
        y = y + up(bias)
    return y, res.to(res_dtype)


def layer_norm(
    x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False, is_rms_norm=False, num_groups=1
):
    """fla.modules.norm.layernorm.LayerNormFunction (LayerNorm, RMSNorm, GroupNorm)"""
    if x.shape[-1] % num_groups != 0:
        raise ValueError("num_channels must be divisible by num_groups")
    y, res = _norm(x, weight, bias, residual, eps, residual_in_fp32, is_rms_norm, num_groups)
    y = y.to(x.dtype)
    return (y, res) if prenorm else y


def layer_norm_linear(
    x,
    norm_weight,
    norm_bias,
    linear_weight,
    linear_bias,
    residual=None,
    eps=1e-5,
    prenorm=False,
    residual_in_fp32=False,
    is_rms_norm=False,
    num_groups=1,
):
    """fla.modules.norm.layernorm.LayerNormLinearFunction (norm followed by a linear layer)"""
    y, res = _norm(x, norm_weight, norm_bias, residual, eps, residual_in_fp32, is_rms_norm, num_groups)
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    bias = linear_bias.to(dtype) if linear_bias is not None else None
    out = F.linear(y.to(dtype), linear_weight.to(dtype), bias)
    return (out, res) if prenorm else out


def _gate(y, g, activation):
    g = up(g)
    if activation in ("swish", "silu"):
        return y * g * torch.sigmoid(g)
    if activation == "sigmoid":
        return y * torch.sigmoid(g)
    raise NotImplementedError(f"gate activation {activation!r} has no portable torch implementation")


def layer_norm_gated(
    x, g, weight, bias, activation, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False, is_rms_norm=False
):
    """fla.modules.norm.fused_norm_gate.LayerNormGatedFunction (FusedRMSNormGated and friends)"""
    y, res = _norm(x, weight, bias, residual, eps, residual_in_fp32, is_rms_norm)
    y = _gate(y, g, activation).to(x.dtype)
    return (y, res) if prenorm else y


def layer_norm_gated_linear(
    x,
    g,
    norm_weight,
    norm_bias,
    linear_weight,
    linear_bias,
    residual=None,
    eps=1e-6,
    prenorm=False,
    residual_in_fp32=False,
    is_rms_norm=False,
):
    """fla.modules.norm.fused_norm_gate.LayerNormGatedLinearFunction (swish gate, then a linear layer)"""
    y, res = _norm(x, norm_weight, norm_bias, residual, eps, residual_in_fp32, is_rms_norm)
    y = _gate(y, g, "swish")
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    bias = linear_bias.to(dtype) if linear_bias is not None else None
    out = F.linear(y.to(dtype), linear_weight.to(dtype), bias)
    return (out, res) if prenorm else out


def layer_norm_group_gated(
    x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True, is_rms_norm=False
):
    """fla.modules.norm.layernorm_gated.LayerNormFn (Mamba2's RMSNormGated, groups of `group_size` channels)"""
    dtype = x.dtype
    xf = up(x)
    zf = None if z is None else up(z)
    if zf is not None and not norm_before_gate:
        xf = xf * F.silu(zf)
    D = xf.shape[-1]
    group = D if group_size is None else group_size
    xg = xf.reshape(*xf.shape[:-1], D // group, group)
    if not is_rms_norm:
        xg = xg - xg.mean(dim=-1, keepdim=True)
    y = (xg * torch.rsqrt(xg.square().mean(dim=-1, keepdim=True) + eps)).reshape(xf.shape) * up(weight)
    if bias is not None:
        y = y + up(bias)
    if zf is not None and norm_before_gate:
        y = y * F.silu(zf)
    return y.to(dtype)


def l2norm(x, eps=1e-6, output_dtype=None):
    """fla.modules.norm.l2norm.L2NormFunction: x / sqrt(sum(x^2) + eps) over the last dim"""
    xf = up(x)
    y = xf * torch.rsqrt(xf.square().sum(dim=-1, keepdim=True) + eps)
    return y.to(x.dtype if output_dtype is None else output_dtype)


# --- activations ------------------------------------------------------------------------------------------------


def sigmoid(x):
    """fla.modules.activations.SigmoidFunction"""
    return torch.sigmoid(up(x)).to(x.dtype)


def swish(x):
    """fla.modules.activations.SwishFunction"""
    return F.silu(up(x)).to(x.dtype)


def logsigmoid(x, temperature=1.0):
    """fla.modules.activations.LogSigmoidFunction"""
    return (F.logsigmoid(up(x)) / temperature).to(x.dtype)


def elu_p1(x):
    """fla.modules.activations.ELUPlusOneFunction"""
    return (F.elu(up(x)) + 1.0).to(x.dtype)


def swiglu(x, y):
    """fla.modules.activations.SwiGLUFunction: silu(x) * y"""
    return (F.silu(up(x)) * up(y)).to(x.dtype)


def swiglu_linear(x, y, weight, bias):
    """fla.modules.activations.SwiGLULinearFunction: linear(silu(x) * y)"""
    return F.linear(swiglu(x, y).to(weight.dtype), weight, bias)


def sigmoidglu(x, y):
    """fla.modules.activations.SigmoidGLUFunction: sigmoid(x) * y"""
    return (torch.sigmoid(up(x)) * up(y)).to(x.dtype)


def sqrelu(x):
    """fla.modules.activations.SquaredReLUFunction: relu(x)^2. FLA's version is torch.compile'd, which on CPU
    means an inductor build (a C compiler, ~10 s per shape) for one elementwise op."""
    return F.relu(up(x)).square().to(x.dtype)


def fast_gelu(input):
    """fla.modules.activations.FastGeLUFunction: tanh-approximated GELU (torch.compile'd in FLA)"""
    return F.gelu(up(input), approximate="tanh").to(input.dtype)


def bias_gelu(input, bias):
    """fla.modules.activations.GeLUFunction: tanh-approximated GELU of input + bias (torch.compile'd in FLA)"""
    return F.gelu(up(input) + up(bias), approximate="tanh").to(input.dtype)


# --- short convolution ------------------------------------------------------------------------------------------


def _conv(x, weight, bias, residual, initial_state, activation):
    """Depthwise causal conv over [B, T, D] with a [B, D, W] state of the last W inputs (oldest first)."""
    B, T, D = x.shape
    W = weight.shape[-1]
    prefix = x.new_zeros(B, W - 1, D) if initial_state is None else initial_state[..., 1:].transpose(1, 2).to(x)
    xp = torch.cat([prefix, x], dim=1)  # [B, W - 1 + T, D]
    y = F.conv1d(
        up(xp.transpose(1, 2)), up(weight).unsqueeze(1), None if bias is None else up(bias), groups=D
    ).transpose(1, 2)
    if activation in ("swish", "silu"):
        y = F.silu(y)
    elif activation is not None:
        raise NotImplementedError(f"convolution activation {activation!r} has no portable torch implementation")
    if residual is not None:
        y = y + up(residual)
    # The state keeps the last W inputs; with fewer than W tokens so far the older slots stay zero (or carry on).
    full = torch.cat(
        [x.new_zeros(B, 1, D) if initial_state is None else initial_state[..., :1].transpose(1, 2).to(x), xp], dim=1
    )
    final = full[:, -W:].transpose(1, 2)
    return y.to(x.dtype), final


def causal_conv1d(
    x,
    weight=None,
    bias=None,
    residual=None,
    initial_state=None,
    output_final_state=False,
    activation=None,
    backend="triton",
    cu_seqlens=None,
    cu_seqlens_cpu=None,
    chunk_indices=None,
    cp_context=None,
    **kwargs,
):
    """fla.modules.causal_conv1d.causal_conv1d: x [B, T, D], weight [D, W]; documents never see each other"""
    if cp_context is not None:
        raise NotImplementedError("context parallelism has no portable torch implementation")
    shape = x.shape
    if x.shape[-1] != weight.shape[0]:
        x = x.reshape(*x.shape[:2], -1)
        residual = None if residual is None else residual.reshape(x.shape)
    if cu_seqlens is None:
        y, final = _conv(x, weight, bias, residual, initial_state, activation)
    else:
        mask, (xp, rp) = varlen.pack(cu_seqlens, x, residual)
        y, _ = _conv(xp, weight, bias, rp, initial_state, activation)
        y = varlen.unpack(y, mask)
        final = None
        if output_final_state:
            # Each document's state is its own last W inputs, read from the unpadded row.
            lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            final = torch.stack(
                [
                    _conv(
                        xp[n : n + 1, :length],
                        weight,
                        bias,
                        None,
                        None if initial_state is None else initial_state[n : n + 1],
                        activation,
                    )[1][0]
                    for n, length in enumerate(lens)
                ]
            )
    return y.reshape(shape), (final if output_final_state else None)


def causal_conv1d_update(x, cache, residual=None, weight=None, bias=None, activation=None):
    """fla.modules.causal_conv1d.causal_conv1d_update: one token per sequence; updates `cache` in place"""
    shape = x.shape
    xt = x.reshape(-1, cache.shape[1])  # [N, D]
    new_cache = torch.cat([cache[..., 1:], xt.unsqueeze(-1).to(cache.dtype)], dim=-1)
    y = (up(new_cache) * up(weight)).sum(-1)
    if bias is not None:
        y = y + up(bias)
    if activation in ("swish", "silu"):
        y = F.silu(y)
    elif activation is not None:
        raise NotImplementedError(f"convolution activation {activation!r} has no portable torch implementation")
    if residual is not None:
        y = y + up(residual.reshape(y.shape))
    with torch.no_grad():
        cache.copy_(new_cache)
    return y.to(x.dtype).reshape(shape), cache


def token_shift(x, cu_seqlens=None, cache=None, output_cache=False, chunk_indices=None):
    """fla.modules.token_shift.TokenShift: x_{t-1} - x_t (x_{-1} from `cache`, else 0), per document"""
    if cu_seqlens is not None:
        mask, (xp,) = varlen.pack(cu_seqlens, x)
    else:
        xp = x
    prev = xp.new_zeros(xp.shape[0], 1, xp.shape[-1]) if cache is None else cache.reshape(xp.shape[0], 1, -1).to(xp)
    shifted = torch.cat([prev, xp[:, :-1]], dim=1)
    out = shifted - xp
    if cu_seqlens is not None:
        out = varlen.unpack(out, mask)
        lens = cu_seqlens[1:] - cu_seqlens[:-1]
        last = xp[torch.arange(xp.shape[0], device=xp.device), (lens - 1).clamp(min=0).to(xp.device)]
    else:
        last = xp[:, -1]
    return out, last.unsqueeze(1)


# --- rotary -----------------------------------------------------------------------------------------------------


def rotary_embedding(
    x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None, chunk_indices=None
):
    """fla.modules.rotary.RotaryEmbeddingFunction: x [B, T, H, D], cos/sin [T_max, R/2]"""
    T = x.shape[1]
    half = cos.shape[-1]
    if cu_seqlens is not None:
        # Position restarts at each document start.
        cu = cu_seqlens.to(torch.long)
        doc = torch.searchsorted(cu[1:], torch.arange(T, device=cu.device), right=True)
        pos = torch.arange(T, device=cu.device) - cu[doc]
        pos = pos + (seqlen_offsets[doc] if isinstance(seqlen_offsets, torch.Tensor) else seqlen_offsets)
        c, s = cos[pos][None, :, None], sin[pos][None, :, None]
    elif isinstance(seqlen_offsets, torch.Tensor):
        pos = seqlen_offsets.to(torch.long)[:, None] + torch.arange(T, device=seqlen_offsets.device)[None]
        c, s = cos[pos][:, :, None], sin[pos][:, :, None]
    else:
        c = cos[seqlen_offsets : seqlen_offsets + T][None, :, None]
        s = sin[seqlen_offsets : seqlen_offsets + T][None, :, None]
    xf = up(x)
    rot, rest = xf[..., : 2 * half], xf[..., 2 * half :]
    c, s = up(c), up(s)
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    return torch.cat([out, rest], dim=-1).to(x.dtype)


# --- losses -----------------------------------------------------------------------------------------------------


def _logits(logits, logit_scale, logit_softcapping):
    z = up(logits) * logit_scale
    if logit_softcapping is not None:
        z = logit_softcapping * torch.tanh(z / logit_softcapping)
    return z


def cross_entropy(
    logits,
    target,
    label_smoothing=0.0,
    logit_scale=1.0,
    lse_square_scale=0.0,
    logit_softcapping=None,
    ignore_index=-100,
    inplace_backward=False,
    process_group=None,
):
    """fla.modules.fused_cross_entropy.FusedCrossEntropyFunction: per-row (loss, z_loss), 0 on ignored rows"""
    if process_group is not None:
        raise NotImplementedError("tensor-parallel cross entropy has no portable torch implementation")
    z = _logits(logits, logit_scale, logit_softcapping)
    lse = torch.logsumexp(z, dim=-1)
    valid = target != ignore_index
    picked = z.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss = lse - picked
    if label_smoothing > 0:
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - z.mean(dim=-1))
    z_loss = lse_square_scale * lse.square()
    loss = torch.where(valid, loss + z_loss, 0.0)
    z_loss = torch.where(valid, z_loss, 0.0).detach()
    return loss, z_loss


def cross_entropy_loss_forward(self, input, target):
    """fla.modules.FusedCrossEntropyLoss.forward, whose first line asserts a GPU tensor"""
    loss, z_loss = cross_entropy(
        input,
        target,
        label_smoothing=self.label_smoothing,
        logit_scale=self.logit_scale,
        lse_square_scale=self.lse_square_scale,
        logit_softcapping=self.logit_softcapping,
        ignore_index=self.ignore_index,
        process_group=self.process_group,
    )
    if self.reduction != "none":
        loss, z_loss = loss.sum(), z_loss.sum()
        if self.reduction == "mean":
            total = (target != self.ignore_index).sum()
            loss, z_loss = loss / total, z_loss / total
    return (loss, z_loss) if self.return_z_loss else loss


def linear_cross_entropy(
    x,
    target,
    weight,
    bias=None,
    ignore_index=-100,
    label_smoothing=0.0,
    logit_scale=1.0,
    logit_softcapping=None,
    num_chunks=8,
    reduction="mean",
    use_l2warp=False,
    l2_penalty_factor=1e-4,
    accumulate_grad_in_fp32=True,
    process_group=None,
):
    """fla.modules.fused_linear_cross_entropy.FusedLinearCrossEntropyFunction (logits are materialised here)"""
    if process_group is not None:
        raise NotImplementedError("tensor-parallel linear cross entropy has no portable torch implementation")
    x2 = x.reshape(-1, x.shape[-1])
    t = target.reshape(-1)
    z = _logits(F.linear(x2, weight, bias), logit_scale, logit_softcapping)
    loss = F.cross_entropy(z, t, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)
    if use_l2warp:
        from fla.modules.l2warp import l2_warp  # pure torch

        loss = l2_warp(loss, z.unsqueeze(0), l2_penalty_factor)
    return loss
