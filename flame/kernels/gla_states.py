"""GLA's chunk states for the backward in bf16, as the forward used them, on the GPU.

FLA 0.6's `chunk_gla` computes the states h (one K x V matrix per chunk of 64 tokens and head) in bf16 for the
output, saves q, k, v, g and the intra-chunk scores A, and recomputes h in fp32 at the start of the backward, where
its dq/dk/dg kernel reads them. At GLA-1.3B's widths (K 256, V 512) the two passes over h took 11.0 ms of a 309 ms
step on an H200, and the fp32 h is twice the bytes for the dq/dk/dg kernel to read (RESULTS.md, twenty-second
session). `settings.gla_states` picks what the backward gets:

- `fla`: FLA's own (fp32, recomputed);
- `recompute`: recomputed in bf16, the very values the forward's output was computed from, at no memory;
- `keep`: the forward's bf16 states saved for the backward, so nothing is recomputed, for B x T/64 x H x K x V x 2
  bytes a layer (256 MiB at GLA-1.3B's batch 8 x 2048: 6 GiB for its 24 layers).

Everything else is FLA's: its forward, its backward kernels and their tuning. Calls with `cu_seqlens` (`--varlen`)
stay FLA's: the GPU test of that case did not get through the autotuning of FLA's varlen kernels in the device time
it had (twenty-third session), and no path goes in untested.
"""

from __future__ import annotations

import functools

import torch
import triton
from fla.ops.common.chunk_h import chunk_fwd_h
from fla.ops.gla.chunk import chunk_gla_bwd, chunk_gla_fwd
from fla.ops.utils import prepare_chunk_indices
from fla.ops.utils.constant import RCP_LN2
from fla.ops.utils.cumsum import chunk_local_cumsum
from fla.utils import input_guard

from flame.kernels.config import settings


class ChunkGLA(torch.autograd.Function):
    """FLA's `ChunkGLAFunction` with bf16 states in the backward: kept from the forward (`keep`) or recomputed."""

    @staticmethod
    @input_guard
    def forward(
        ctx, q, k, v, g, scale, initial_state, output_final_state, state_v_first, cu_seqlens, cu_seqlens_cpu, keep
    ):
        chunk_size = min(64, max(16, triton.next_power_of_2(q.shape[1])))  # as FLA's
        chunk_indices = None
        if cu_seqlens is not None:
            chunk_indices = prepare_chunk_indices(cu_seqlens, chunk_size, cu_seqlens_cpu=cu_seqlens_cpu)
        g_cumsum, A, h, ht, o = chunk_gla_fwd(
            q=q, k=k, v=v, g=g, g_cumsum=None, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
            chunk_indices=chunk_indices, state_v_first=state_v_first,
        )  # fmt: skip
        # as FLA's: a low-precision g is cumulated again in the backward, an fp32 one is kept cumulated
        g, g_cumsum = (g, None) if g.dtype != torch.float else (None, g_cumsum)
        ctx.save_for_backward(q, k, v, g, g_cumsum, initial_state, A, chunk_indices, h if keep else None)
        ctx.chunk_size, ctx.scale, ctx.cu_seqlens, ctx.state_v_first = chunk_size, scale, cu_seqlens, state_v_first
        return o, ht

    @staticmethod
    @input_guard
    def backward(ctx, do, dht):
        q, k, v, g, g_cumsum, initial_state, A, chunk_indices, h = ctx.saved_tensors
        chunk_size, cu_seqlens = ctx.chunk_size, ctx.cu_seqlens
        if g_cumsum is None:
            g_cumsum = chunk_local_cumsum(g, chunk_size, scale=RCP_LN2, cu_seqlens=cu_seqlens)
        if h is None:
            h, _ = chunk_fwd_h(
                k=k, v=v, g=None, gk=g_cumsum, gv=None, h0=initial_state, output_final_state=False,
                cu_seqlens=cu_seqlens, chunk_size=chunk_size, states_in_fp32=False, state_v_first=ctx.state_v_first,
            )  # fmt: skip
        dq, dk, dv, dg, dh0 = chunk_gla_bwd(
            q=q, k=k, v=v, g=g, g_cumsum=g_cumsum, scale=ctx.scale, initial_state=initial_state, h=h, A=A, do=do,
            dht=dht, state_v_first=ctx.state_v_first, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
            chunk_indices=chunk_indices,
        )  # fmt: skip
        return dq.to(q), dk.to(k), dv.to(v), dg, None, dh0, None, None, None, None, None


def in_front_of(original):
    """FLA's `ChunkGLAFunction.apply`, with flame's `ChunkGLA` taking the calls on CUDA tensors without `cu_seqlens`
    in the `auto` kernels mode when `settings.gla_states` is not `fla`."""

    @functools.wraps(original)
    def apply(q, k, v, g, scale, initial_state, output_final_state, state_v_first, cu_seqlens, cu_seqlens_cpu):
        args = (q, k, v, g, scale, initial_state, output_final_state, state_v_first, cu_seqlens, cu_seqlens_cpu)
        states = settings.gla_states_taken(varlen=cu_seqlens is not None)
        if q.is_cuda and states is not None:
            return ChunkGLA.apply(*args, states == "keep")
        return original(*args)

    return apply
