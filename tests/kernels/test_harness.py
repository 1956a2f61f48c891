"""The GPU comparison harness (tests/kernels/harness.py), checked on CPU where it can run: it must pass two
correct implementations whatever the memory layout of their outputs, and fail a gradient wrong in one region."""

import pytest
import torch
import torch.nn.functional as F

from flame.kernels import linear_attn
from tests.kernels.harness import compare

B, T, H, K, V = 2, 37, 3, 8, 6


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, K, generator=g)
    v = torch.randn(B, T, H, V, generator=g)
    gk = F.logsigmoid(torch.randn(B, T, H, K, generator=g)) / 16
    h0 = torch.randn(B, H, K, V, generator=g)
    return q, k, v, gk, h0


def gla(q, k, v, g, h0):
    return linear_attn.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)


def transposed_output(q, k, v, g, h0):
    """The same op, its output handed back as a `[B, T, H, V]` view of `[B, H, T, V]` memory."""
    o, ht = gla(q, k, v, g, h0)
    return o.transpose(1, 2).contiguous().transpose(1, 2), ht


class _Corrupt(torch.autograd.Function):
    """Identity forward; backward doubles the gradient in one slice (a kernel bug confined to one region)."""

    @staticmethod
    def forward(ctx, x, region):
        ctx.region = region
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[ctx.region] *= 2
        return grad, None


def test_layout_of_the_output_does_not_change_the_comparison():
    # Drawing the cotangent with randn_like(o) per run failed exactly this with ratio ~sqrt(2) on every grad.
    o, _ = transposed_output(*_inputs())
    assert not o.is_contiguous()
    compare(transposed_output, gla, _inputs(), tol=1e-5)


@pytest.mark.parametrize(
    "region",
    [
        (slice(None), slice(32, None)),  # the last, partial chunk of 16
        (1, slice(None), 2),  # one batch, one head
    ],
    ids=["last-partial-chunk", "one-batch-head"],
)
def test_a_gradient_wrong_in_one_region_fails(region):
    def wrong_dq(q, k, v, g, h0):
        return gla(_Corrupt.apply(q, region), k, v, g, h0)

    with pytest.raises(AssertionError, match="grad of q") as failure:
        compare(wrong_dq, gla, _inputs(), tol=1e-3, names=["q", "k", "v", "g", "h0"])
    # only q's gradient is wrong, and the report says so without stopping at the first mismatch
    assert "grad of k" not in str(failure.value) and "output" not in str(failure.value)


def test_a_missing_gradient_fails():
    def no_h0_grad(q, k, v, g, h0):
        return gla(q, k, v, g, h0.detach())

    with pytest.raises(AssertionError, match="grad of input 4: portable gave none"):
        compare(no_h0_grad, gla, _inputs(), tol=1e-3)


def _no_backward(q, k, v, g, h0):
    """The op of an inference-only kernel: its backward raises, as FLA's fused_recurrent_gated_delta_rule's does."""

    class NoBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise NotImplementedError("Backward pass is not implemented")

    o, ht = gla(q, k, v, g, h0)
    return NoBackward.apply(o), ht


def test_forward_only_compares_outputs_without_calling_backward():
    compare(gla, _no_backward, _inputs(), 1e-5, backward=False)
    with pytest.raises(AssertionError, match="output: ratio"):
        compare(lambda *a: (gla(*a)[0] * 1.01, gla(*a)[1]), _no_backward, _inputs(), 1e-5, backward=False)
