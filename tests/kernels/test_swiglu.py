"""flame's SwiGLU kernels (flame/kernels/swiglu.py): against torch's autograd on the CPU (Triton's interpreter, in a
subprocess since TRITON_INTERPRET is read when a kernel is defined), their routing, and on a GPU against FLA's own
kernels, alone and inside FLA's fused MLP (pytest -m gpu)."""

import inspect

import pytest
import torch

from benchmarks.swiglu import fla_kernels  # FLA's own kernels, behind flame's
from tests.kernels.harness import REPO, interpreted

# z = silu(x) * y and its gradients through torch's autograd in fp32, and the kernels', for each case: elements (a
# tail past the last whole block), dtype, elements per program.
INTERPRETED = r"""
import json, sys, torch
from flame.kernels import swiglu

out = []
for n, dtype, block in json.loads(sys.argv[1]):
    torch.manual_seed(0)
    dtype = getattr(torch, dtype)
    x, y, g = (torch.randn(n) * 3).to(dtype), torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    xf, yf = x.float().requires_grad_(), y.float().requires_grad_()
    zf = torch.nn.functional.silu(xf) * yf
    zf.backward(g.float())
    launch = swiglu.Launch(block=block, warps=4)
    z = swiglu.swiglu_fwd(x, y, launch)
    dx, dy, z2 = swiglu.swiglu_fwdbwd(x, y, g, True, launch)
    two = swiglu.swiglu_fwdbwd(x, y, g, False, launch)

    def err(a, b):
        return ((a.float() - b).abs().max() / b.abs().max()).item()

    out.append({
        "dtypes": [str(t.dtype) for t in (z, dx, dy, z2)],
        "z": err(z, zf.detach()), "dx": err(dx, xf.grad), "dy": err(dy, yf.grad),
        "z_again": torch.equal(z, z2), "pair": len(two) == 2 and torch.equal(two[0], dx) and torch.equal(two[1], dy),
    })
print(json.dumps(out))
"""

CASES = [(1000, "bfloat16", 256), (4096, "bfloat16", 1024), (777, "float32", 512)]


def test_kernels_match_autograd_in_tritons_interpreter():
    results = interpreted(INTERPRETED, CASES)
    for (_, dtype, _), r in zip(CASES, results, strict=True):
        assert r["dtypes"] == [f"torch.{dtype}"] * 4  # the inputs' dtype
        bound = 1e-2 if dtype == "bfloat16" else 1e-5  # one rounding to the output dtype
        assert max(r["z"], r["dx"], r["dy"]) < bound, r
        assert r["z_again"] and r["pair"]


# flame's SwiGLULinear (the fused MLP's down projection) with bf16 inputs and fp32 weights, as autocast has them:
# against the same ops composed (bit for bit) and against torch's autograd in fp32; with and without a bias, and with
# the gradients of only some inputs wanted.
INTERPRETED_LINEAR = r"""
import json, sys, torch
import torch.nn.functional as F
from flame.kernels import swiglu

out = []
for tokens, inter, hidden, has_bias, wanted in json.loads(sys.argv[1]):
    torch.manual_seed(0)
    x, y = (torch.randn(tokens, inter) * 2).bfloat16(), torch.randn(tokens, inter).bfloat16()
    weight, g = torch.randn(hidden, inter) / inter**0.5, torch.randn(tokens, hidden).bfloat16()
    bias = torch.randn(hidden) if has_bias else None
    leaves = [t.clone().requires_grad_(w) if t is not None else None for t, w in zip((x, y, weight, bias), wanted)]
    o = swiglu.SwiGLULinear.apply(*leaves, torch.bfloat16)
    o.backward(g)
    grads = [t.grad if t is not None else None for t in leaves]
    w16 = weight.bfloat16()
    z = swiglu.swiglu_fwd(x, y)
    composed = {
        "o": F.linear(z, w16, None if bias is None else bias.bfloat16()),
        "xy": swiglu.swiglu_fwdbwd(x, y, g @ w16),
        "w": (g.t() @ z).float(),
        "b": g.sum(0).float(),
    }
    xf, yf, wf = x.float().requires_grad_(), y.float().requires_grad_(), weight.clone().requires_grad_()
    ref = F.linear(F.silu(xf) * yf, wf, bias)
    ref.backward(g.float())

    def err(a, b):
        return ((a.float() - b).abs().max() / b.abs().max()).item()

    out.append({
        "dtypes": [str(t.dtype) if t is not None else None for t in (o, *grads)],
        "o": torch.equal(o, composed["o"]),
        "x": grads[0] is None or torch.equal(grads[0], composed["xy"][0]),
        "y": grads[1] is None or torch.equal(grads[1], composed["xy"][1]),
        "w": grads[2] is None or torch.equal(grads[2], composed["w"]),
        "b": grads[3] is None or torch.equal(grads[3], composed["b"]),
        "err": max([err(o, ref.detach())] + [err(a, b.grad) for a, b in zip(grads, (xf, yf, wf)) if a is not None]),
    })
print(json.dumps(out))
"""

LINEAR_CASES = [
    (100, 256, 64, False, [True, True, True, None]),
    (64, 512, 32, True, [True, True, True, True]),
    (64, 256, 32, False, [False, False, True, None]),  # only the weight's: the product recomputed alone
    (64, 256, 32, False, [True, True, False, None]),
]


def test_swiglu_linear_is_the_fused_mlps_ops_with_an_fp32_weight_gradient_in_tritons_interpreter():
    for (_, _, _, has_bias, wanted), r in zip(LINEAR_CASES, interpreted(INTERPRETED_LINEAR, LINEAR_CASES)):
        dtypes = ["torch.bfloat16", "torch.bfloat16", "torch.bfloat16", "torch.float32", "torch.float32"]
        assert r["dtypes"] == [dtypes[0]] + [d if w else None for d, w in zip(dtypes[1:], wanted)], r
        assert r["o"] and r["x"] and r["y"] and r["w"] and r["b"], r
        assert r["err"] < 2e-2, r  # bf16 roundings of the inputs' gradients and of the product


def test_takes_only_contiguous_cuda_tensors_of_one_shape_and_dtype():
    from flame.kernels.swiglu import covers

    x = torch.zeros(4, 8)
    assert not covers(x, x)  # CPU tensors: never (FLA's kernels do not run there either; flame's torch code does)


def test_install_puts_them_in_front_of_flas_kernels_where_the_fused_mlp_calls_them():
    import flame.kernels

    flame.kernels.install()
    from fla.modules.activations import ops

    for name in ("swiglu_fwd", "swiglu_fwdbwd"):
        ours = getattr(ops, name)
        assert ours.__code__.co_filename == str(REPO / "flame" / "kernels" / "swiglu.py")
        assert ours.__wrapped__ is ours.__flame_original__  # FLA's, called for what flame's does not cover
        # SwiGLULinearFunction and SwiGLUFunction look the name up in this module when they run
        assert inspect.unwrap(ops.SwiGLULinearFunction.forward).__globals__[name] is ours
    from fla.modules import mlp

    ours = mlp.swiglu_linear  # what FLA's GatedMLP calls with fuse_swiglu
    assert ours is ops.swiglu_linear and ours.__code__.co_filename == str(REPO / "flame" / "kernels" / "swiglu.py")
    assert ours.__wrapped__ is ours.__flame_original__


def test_swiglu_linear_leaves_the_cpu_to_flames_torch_code():
    """On the CPU (no CUDA autocast) the fused MLP goes on to FLA's function, whose dispatcher runs flame's torch
    version: the same output as the unfused MLP."""
    from fla.modules import GatedMLP

    import flame.kernels

    flame.kernels.install()
    torch.manual_seed(0)
    fused = GatedMLP(hidden_size=64, hidden_ratio=4, hidden_act="swish", fuse_swiglu=True)
    plain = GatedMLP(hidden_size=64, hidden_ratio=4, hidden_act="swish", fuse_swiglu=False)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 8, 64)
    torch.testing.assert_close(fused(x), plain(x))


# ---------------------------------------------------------------- on a GPU


def _inputs(tokens: int, width: int, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(tokens, width, device="cuda", generator=g).to(dtype) for _ in range(3)]


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, width", [(4096, 2816), (4096, 5632), (1000, 2816)])
def test_the_same_bits_as_flas_kernels(tokens, width):
    """GLA-340M's and GLA-1.3B's MLP widths (and a row count whose elements end past a block): the same
    arithmetic in the same order as FLA's kernels, so the same bits."""
    import flame.kernels
    from flame.kernels import swiglu

    flame.kernels.install()
    fla_fwd, fla_fwdbwd = fla_kernels()
    x, y, g = _inputs(tokens, width)
    assert torch.equal(swiglu.swiglu_fwd(x, y), fla_fwd(x=x, y=y))
    for use_weight in (True, False):
        ours, theirs = swiglu.swiglu_fwdbwd(x, y, g, use_weight), fla_fwdbwd(x=x, y=y, g=g, use_weight=use_weight)
        assert len(ours) == len(theirs) == (3 if use_weight else 2)
        for a, b in zip(ours, theirs, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.gpu
def test_fla_keeps_the_calls_flame_does_not_cover():
    """A strided input (a column slice) goes to FLA's kernel, which handles row strides."""
    from fla.modules.activations import ops

    import flame.kernels

    flame.kernels.install()
    x, y, g = _inputs(256, 2 * 1024)
    left, right = x[:, :1024], y[:, 1024:]
    fla_fwd, _ = fla_kernels()
    assert torch.equal(ops.swiglu_fwd(x=left, y=right), fla_fwd(x=left, y=right))


@pytest.mark.gpu
def test_flas_fused_mlp_trains_the_same_bits_with_them(monkeypatch):
    """FLA's GatedMLP (fuse_swiglu: SwiGLULinearFunction) under bf16 autocast: output and every gradient the same
    bits with flame's kernels (mode auto) as with FLA's (mode triton), but the down projection's weight gradient,
    which flame's SwiGLULinear writes in fp32 where FLA's is rounded to bf16."""
    from fla.modules import GatedMLP

    import flame.kernels
    from flame.kernels import swiglu
    from flame.kernels.config import settings

    flame.kernels.install()
    calls = []
    for name in ("swiglu_fwd", "swiglu_fwdbwd"):
        kernel = getattr(swiglu, name)
        monkeypatch.setattr(swiglu, name, lambda *a, kernel=kernel, name=name: calls.append(name) or kernel(*a))
    torch.manual_seed(0)
    mlp = GatedMLP(hidden_size=1024, hidden_ratio=4, hidden_act="swish", fuse_swiglu=True).cuda()
    x = torch.randn(2, 512, 1024, device="cuda")

    def run(mode):
        before, settings.mode = settings.mode, mode
        try:
            mlp.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = mlp(xi)
            out.float().pow(2).mean().backward()
            return [out, xi.grad, *(p.grad for p in mlp.parameters())]
        finally:
            settings.mode = before

    theirs = run("triton")
    assert calls == []
    ours = run("auto")
    assert calls == ["swiglu_fwd", "swiglu_fwdbwd"]  # the forward's z, then the backward's dx, dy and z
    names = ["out", "x", *(name for name, _ in mlp.named_parameters())]
    for name, a, b in zip(names, ours, theirs, strict=True):
        if name != "down_proj.weight":
            assert torch.equal(a, b), name
    # the down projection's weight gradient (flame's SwiGLULinear): fp32 out of the GEMM, FLA's rounded to bf16
    ours_dw, theirs_dw = ours[names.index("down_proj.weight")], theirs[names.index("down_proj.weight")]
    assert torch.equal(theirs_dw, theirs_dw.bfloat16().float())
    assert not torch.equal(ours_dw, ours_dw.bfloat16().float())
    assert ((ours_dw - theirs_dw).abs().max() / theirs_dw.abs().max()).item() < 2**-7
