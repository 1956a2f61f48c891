"""flame's norm backward (flame/kernels/norm_backward.py): its Triton kernel against torch's autograd on the CPU
(Triton's interpreter, TRITON_INTERPRET=1, in a subprocess since the flag is read when a kernel is defined), and
on a GPU against FLA's own backward, one op and a whole GLA model (pytest -m gpu)."""

import json
import sys

import pytest
import torch

from tests.kernels.harness import REPO, interpreted

sys.path.insert(0, str(REPO / "benchmarks"))
import norm_backward as bench  # noqa: E402  (benchmarks/norm_backward.py: the inputs, made with FLA's forward)

# Gradients through torch's autograd of the norm's math in fp32, and the kernel's, for each case: rows, width,
# RMS or layer norm, prenorm (the residual's gradient added and returned) and the residual stream's dtype.
INTERPRETED = r"""
import json, sys, torch
from flame.kernels import norm_backward as nb

nb._sm_count = lambda index: 2  # no GPU to ask
out = []
for rows, width, rms, prenorm, residual_dtype, rows_per_tile in json.loads(sys.argv[1]):
    torch.manual_seed(0)
    residual_dtype = getattr(torch, residual_dtype)
    x = (torch.randn(rows, width) * 2).to(residual_dtype).requires_grad_()  # the norm's input (its res_out)
    w = (1 + 0.1 * torch.randn(width)).requires_grad_()
    b = None if rms else (0.1 * torch.randn(width)).requires_grad_()
    xf = x.float()
    mean = None if rms else xf.mean(-1)
    centred = xf if rms else xf - mean[:, None]
    rstd = torch.rsqrt(centred.pow(2).mean(-1) + 1e-6)
    y = centred * rstd[:, None] * w + (0 if rms else b)
    dy = torch.randn(rows, width).to(torch.bfloat16)
    dres = torch.randn(rows, width).to(residual_dtype) if prenorm else None
    ((y * dy.float()).sum() + ((xf * dres.float()).sum() if prenorm else 0)).backward()
    launch = nb.Launch(rows=rows_per_tile, warps=4, waves=2)
    dx, dw, db, dres_in = nb.norm_backward(
        dy, x.detach(), w.detach(), None if rms else b.detach(), None if rms else mean.detach(), rstd.detach(), dres,
        prenorm, rms, torch.bfloat16, launch,
    )
    scale = x.grad.float().abs().max()
    out.append({
        "dx": ((dx.float() - x.grad.float()).abs().max() / scale).item(),
        "dx_dtype": str(dx.dtype),
        "dw": ((dw - w.grad).abs().max() / w.grad.abs().max()).item(),
        "db": None if rms else ((db - b.grad).abs().max() / b.grad.abs().max()).item(),
        "dres_in": None if dres_in is None else ((dres_in.float() - x.grad.float()).abs().max() / scale).item(),
        "dres_in_dtype": None if dres_in is None else str(dres_in.dtype),
        "dres_in_is_dx": dres_in is dx,
    })
print(json.dumps(out))
"""

CASES = [  # rows, width, rms, prenorm, residual dtype, rows per tile
    (37, 640, True, False, "bfloat16", 4),  # a tail of rows and of columns (640 of a 1024 block)
    (37, 640, True, True, "bfloat16", 4),
    (20, 1024, True, True, "float32", 8),
    (9, 768, False, True, "float32", 1),
    (16, 1024, False, False, "bfloat16", 2),
]


def test_kernel_matches_autograd_in_tritons_interpreter():
    results = interpreted(INTERPRETED, CASES)
    for (rows, width, rms, prenorm, residual_dtype, _), r in zip(CASES, results, strict=True):
        assert r["dx_dtype"] == "torch.bfloat16"  # the input's dtype, whatever the residual's
        assert r["dx"] < 1e-2  # bf16 rounding of dx
        assert r["dw"] < 1e-5  # fp32 sums (partial per program, then summed)
        if not rms:
            assert r["db"] < 1e-5
        if not prenorm:
            assert r["dres_in"] is None
        elif residual_dtype == "float32":  # the residual's gradient kept in fp32, apart from dx
            assert r["dres_in_dtype"] == "torch.float32" and not r["dres_in_is_dx"]
            assert r["dres_in"] < 1e-5
        else:
            assert r["dres_in_is_dx"]


def test_covers_only_what_it_implements():
    from flame.kernels.norm_backward import covers

    x = torch.zeros(4, 1024)
    assert not covers(x, x, None, 1, False)  # CPU tensors: never (FLA's Function does not run there either)


# ---------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("width", [1024, 2048, 1536])
@pytest.mark.parametrize(
    "rms, prenorm, residual_dtype",
    [
        (True, False, torch.bfloat16),
        (True, True, torch.bfloat16),
        (True, True, torch.float32),
        (False, True, torch.float32),
    ],
)
def test_matches_fla_on_gpu(width, rms, prenorm, residual_dtype):
    import flame.kernels
    from flame.kernels.norm_backward import norm_backward

    flame.kernels.install()
    from fla.modules.norm import layernorm

    installed = layernorm.layer_norm_bwd
    fla = installed.__flame_original__
    case = bench.make_case(4099, width, prenorm, residual_dtype, rms)
    ref = fla(**case)
    out = norm_backward(**case)
    via_fla_function = installed(**case)  # what LayerNormFunction.backward now calls: flame's kernel
    for name, o, r, v in zip(("dx", "dw", "db", "dres_in"), out, ref, via_fla_function, strict=True):
        assert (o is None) == (r is None), name
        if r is None:
            continue
        assert o.dtype == r.dtype and o.shape == r.shape, name
        assert torch.equal(o, v), name
        rel = bench.max_rel(o, r)
        print(f"{name} {rel:.2e}")
        # FLA's kernel at D > 512 rounds the residual's fp32 gradient to bf16 before storing it (flame's keeps fp32)
        assert rel < (1e-4 if name in ("dw", "db") else 1e-2), name
    assert (out[3] is out[0]) == (ref[3] is ref[0])  # dres_in is dx exactly when FLA's is
    if rms and residual_dtype == torch.float32:  # flame's fp32 residual gradient against the same math in torch
        xhat = case["x"].float() * case["rstd"][:, None]
        wdy = case["dy"].float() * case["weight"]
        exact = (wdy - xhat * (xhat * wdy).mean(-1, keepdim=True)) * case["rstd"][:, None] + case["dres"]
        rel = ((out[3] - exact).abs().max() / exact.abs().max()).item()
        print(f"dres_in against torch {rel:.2e}")
        assert rel < 1e-5


@pytest.mark.gpu
def test_gla_model_gradients_match_fla_kernels(tmp_path):
    """A GLA of width 1024 (its block norms take flame's kernel) trains the same with FLA's own norm backward."""
    import flame.kernels
    from flame.models import build_model

    config = json.loads((REPO / "configs" / "gla_340M.json").read_text()) | {"num_hidden_layers": 2}
    (tmp_path / "gla.json").write_text(json.dumps(config))
    model, _ = build_model(tmp_path / "gla.json", seed=0, dtype=torch.float32, device="cuda")
    ids = torch.randint(3, config["vocab_size"], (2, 2048), device="cuda")
    results = {}
    for mode in ("triton", "auto"):
        flame.kernels.install(mode=mode)
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        results[mode] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    flame.kernels.install(mode="auto")
    (l_fla, g_fla), (l_flame, g_flame) = results["triton"], results["auto"]
    assert abs(l_fla - l_flame) <= 1e-6 * abs(l_fla)  # the forward is FLA's in both
    norms = [n for n in g_fla if "norm" in n and "g_norm" not in n]
    assert len(norms) == 2 * 2 + 1  # two per block and the final norm: the weights flame's kernel differentiates
    worst = max(((g_flame[n] - g_fla[n]).norm() / g_fla[n].norm()).item() for n in g_fla)
    print(f"worst gradient difference {worst:.2e}")
    assert worst < 2e-2  # bf16 rounding of dx, carried down the layers (6.5e-3 on an H200)
