"""The projections of a block that read one input, differentiated as one: their input gradients summed in the GEMMs.

FLA's layers call their projections one by one on the same normed input (GLA: q, k, v, the output gate and the
low-rank forget gate; the MLP: gate and up), so autograd sums their input gradients with an add kernel per extra
projection: four bf16 adds of a whole activation per GLA layer plus one in the MLP, 4% of GLA-340M's step at batch
32 on an H200. Run as one autograd node, the backward accumulates each projection's input gradient into the last
one's inside the GEMM (`addmm_`, cuBLAS's beta = 1), which reads the sum once instead of reading two and writing one.

Under autocast the node also owns the weights' casts. It takes the fp32 weights, casts them itself and saves the
bf16 copies, as autocast's casts would. In the backward, on a GPU, cuBLAS writes each weight's gradient in fp32 straight
from its fp32 accumulator (`torch.mm(..., out_dtype=torch.float32)`). Autocast's path rounds that product to bf16 and
then runs a separate kernel per weight to turn it back into fp32; at GLA-1.3B those passes took 4.6 ms of a 309 ms
step on an H200 (benchmarks/RESULTS.md, twenty-second session). On the CPU the gradient is the bf16 product cast to
fp32, as before.

The groups are found, not assumed: `find_groups` watches one forward (which linears of a block get the very same
tensor), and once `install`ed, the first member of a group called computes every member's output in one autograd
Function and hands the others theirs when they are called. The weights stay separate parameters
(checkpoints, optimizers and sharding see nothing new). Not for DeepSpeed ZeRO-3 (it gathers each module's weight
when that module is called) nor torch.compile (the hand-over is Python state dynamo would have to trace).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def wide(grad: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a half-precision gradient for an fp32 parameter comes straight out of the kernel in fp32 (CUDA)."""
    return grad.is_cuda and dtype == torch.float32 and grad.dtype in (torch.bfloat16, torch.float16)


def weight_grad(grad: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad^T @ rows in the weight's dtype."""
    if wide(grad, dtype):
        return torch.mm(grad.t(), rows, out_dtype=dtype)
    return (grad.t() @ rows).to(dtype)


def bias_grad(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return grad.sum(0, dtype=dtype) if wide(grad, dtype) else grad.sum(0).to(dtype)


class _SharedInput(torch.autograd.Function):
    """y_i = x @ w_i^T + b_i for every i, as one node: dx = sum_i dy_i @ w_i accumulated GEMM by GEMM. dtype: the
    compute dtype the weights and biases are cast to (autocast's), or None to use them as they are; their gradients
    come back in their own dtype."""

    @staticmethod
    def forward(ctx, x, count, dtype, *params):
        weights, biases = params[:count], params[count:]
        ctx.count, ctx.has_bias = count, [b is not None for b in biases]
        ctx.dtypes = [p.dtype if p is not None else None for p in params]
        if dtype is not None:
            weights = [w.to(dtype) for w in weights]
            biases = [b.to(dtype) if b is not None else None for b in biases]
        ctx.save_for_backward(x, *weights)
        return tuple(F.linear(x, w, b) for w, b in zip(weights, biases, strict=True))

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        rows = x.reshape(-1, x.shape[-1])
        need_x = ctx.needs_input_grad[0]
        dx, dws, dbs = None, [], []
        for i, (grad, w) in enumerate(zip(grads, weights, strict=True)):
            if grad is None:  # an output nothing used
                dws.append(None)
                dbs.append(None)
                continue
            g = grad.reshape(-1, grad.shape[-1])
            if need_x:
                dx = g @ w if dx is None else dx.addmm_(g, w)
            dws.append(weight_grad(g, rows, ctx.dtypes[i]) if ctx.needs_input_grad[3 + i] else None)
            has_bias = ctx.has_bias[i] and ctx.needs_input_grad[3 + ctx.count + i]
            dbs.append(bias_grad(g, ctx.dtypes[ctx.count + i]) if has_bias else None)
        if dx is not None:
            dx = dx.view(x.shape)
        return (dx, None, None, *dws, *dbs)


class _Group:
    """Linears that read one tensor in a block's forward. The first member called computes them all; the others
    take their output if they are called with the same tensor (else they compute their own, as before)."""

    def __init__(self, linears: list[nn.Linear]):
        self.linears = linears
        self._input = None  # weak: the group never keeps an activation alive
        self._pending: dict[int, torch.Tensor] = {}

    def call(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self._input is not None and self._input() is x and index in self._pending:
            out = self._pending.pop(index)
            if not self._pending:
                self._input = None
            return out
        outs = self._all(x)
        self._input = weakref.ref(x)
        self._pending = {i: o for i, o in enumerate(outs) if i != index}
        return outs[index]

    def _all(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kind = x.device.type
        weights = [m.weight for m in self.linears]
        biases = [m.bias for m in self.linears]
        if torch.is_autocast_enabled(kind):  # cast as autocast would for F.linear (the weights in the node), without it
            dtype = torch.get_autocast_dtype(kind)
            with torch.autocast(kind, enabled=False):
                return _SharedInput.apply(x.to(dtype), len(weights), dtype, *weights, *biases)
        return _SharedInput.apply(x, len(weights), None, *weights, *biases)


def _linears(block: nn.Module) -> list[nn.Linear]:
    return [m for m in block.modules() if type(m) is nn.Linear]


def find_groups(blocks: list[nn.Module], forward: Callable[[], object]) -> list[list[nn.Linear]]:
    """The linears of each block that get the very same tensor when forward() runs the model once (the engine runs
    it without gradients on the first batch). A linear called on several tensors (shared, or called twice) is left
    out. The tensors are followed by weak references, so none is kept alive and a freed one's id never matches."""
    seen: list[list[tuple[weakref.ref, list[nn.Linear]]]] = [[] for _ in blocks]
    calls: dict[nn.Linear, int] = {}

    def watcher(block: int):
        def pre(module, args):
            if not (args and isinstance(args[0], torch.Tensor)):
                return
            calls[module] = calls.get(module, 0) + 1
            for ref, members in seen[block]:
                if ref() is args[0]:
                    members.append(module)
                    return
            seen[block].append((weakref.ref(args[0]), [module]))

        return pre

    handles = [m.register_forward_pre_hook(watcher(b)) for b, block in enumerate(blocks) for m in _linears(block)]
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()
    return [
        members for block in seen for _, members in block if len(members) > 1 and all(calls[m] == 1 for m in members)
    ]


def install(groups: list[list[nn.Linear]]) -> list[int]:
    """Route each group through one autograd node (between updates: never between a forward and its backward,
    whose saved tensors, or a checkpointed block's recomputation, must match the forward's); the groups' sizes."""
    for linears in groups:
        group = _Group(linears)
        for i, linear in enumerate(linears):
            linear.forward = (lambda g, i: lambda x: g.call(i, x))(group, i)
    return [len(g) for g in groups]
