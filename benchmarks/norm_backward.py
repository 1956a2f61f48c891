"""The backward of FLA's norms on the GPU: FLA 0.6's kernels against flame.kernels.norm_backward, side by side.

    python benchmarks/norm_backward.py                        # GLA-340M's norms at batch 8 and 32 x 2048
    python benchmarks/norm_backward.py --tokens 65536 --hidden 1024 --sweep
    python benchmarks/norm_backward.py --gated                # also FLA's gated norm (GLA's output norm)

For each case (a plain norm, a prenorm with the residual's gradient; the residual stream bf16 or fp32) it builds
the inputs with FLA's forward, then times FLA's `layer_norm_bwd` and flame's `norm_backward` (triton's do_bench,
L2 flushed between runs), prints each one's time, its bandwidth (bytes it must move / time: the tensors read and
written once) and flame/FLA, and checks that both give the same gradients. --sweep also times every launch
configuration flame could use (rows per tile, warps, programs per SM). GPU only; CI does not run it.
"""

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def fla_backward():
    from fla.modules.norm import layernorm

    fn = layernorm.layer_norm_bwd
    return getattr(fn, "__flame_original__", fn)


def make_case(tokens: int, hidden: int, prenorm: bool, residual_dtype: torch.dtype, rms: bool = True):
    from fla.modules.norm.layernorm import layer_norm_fwd

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
    weight = 1 + 0.1 * torch.randn(hidden, device="cuda", generator=g)
    bias = None if rms else 0.1 * torch.randn(hidden, device="cuda", generator=g)
    residual = torch.randn(tokens, hidden, device="cuda", generator=g).to(residual_dtype) if prenorm else None
    _, mean, rstd, res_out = layer_norm_fwd(
        x=x,
        weight=weight,
        bias=bias,
        eps=1e-6,
        residual=residual,
        residual_dtype=residual_dtype if prenorm else None,
        is_rms_norm=rms,
    )
    dy = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
    dres = torch.randn(tokens, hidden, device="cuda", generator=g).to(res_out.dtype) if prenorm else None
    return dict(
        dy=dy,
        x=res_out,
        weight=weight,
        bias=bias,
        mean=mean,
        rstd=rstd,
        dres=dres,
        has_residual=prenorm,
        is_rms_norm=rms,
        x_dtype=torch.bfloat16,
    )


def moved_bytes(case: dict) -> int:
    x, dy, dres = case["x"], case["dy"], case["dres"]
    total = x.nbytes + dy.nbytes + x.numel() * 2  # read x and dy, write dx (bf16)
    if dres is not None:
        total += dres.nbytes
    if case["has_residual"] and x.dtype != torch.bfloat16:
        total += x.nbytes  # the residual's own gradient, in its dtype
    return total


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def check(case: dict) -> dict:
    from flame.kernels.norm_backward import norm_backward

    ref = fla_backward()(**case)
    out = norm_backward(**case)
    names = ("dx", "dw", "db", "dres_in")
    return {n: max_rel(o, r) for n, o, r in zip(names, out, ref) if o is not None and r is not None}


def gated_case(rows: int, width: int):
    from fla.modules.norm.fused_norm_gate import layer_norm_gated_bwd, layer_norm_gated_fwd

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16, generator=g)
    gate = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16, generator=g)
    weight = 1 + 0.1 * torch.randn(width, device="cuda", generator=g)
    _, mean, rstd, res_out = layer_norm_gated_fwd(
        x=x, g=gate, weight=weight, bias=None, activation="swish", eps=1e-6, is_rms_norm=True
    )
    dy = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16, generator=g)
    args = dict(
        dy=dy,
        x=res_out,
        g=gate,
        weight=weight,
        bias=None,
        activation="swish",
        eps=1e-6,
        mean=mean,
        rstd=rstd,
        is_rms_norm=True,
        x_dtype=torch.bfloat16,
    )
    moved = 5 * x.nbytes  # read x, g, dy; write dx, dg
    fn = getattr(layer_norm_gated_bwd, "__flame_original__", layer_norm_gated_bwd)
    return (lambda: fn(**args)), moved


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="16384,65536", help="rows (batch x context), comma-separated")
    parser.add_argument("--hidden", default="1024", help="row widths (model width), comma-separated")
    parser.add_argument("--sweep", action="store_true", help="time every launch configuration too")
    parser.add_argument("--gated", action="store_true", help="also time FLA's gated norm backward (GLA's output norm)")
    parser.add_argument("--heads", type=int, default=4, help="--gated: heads per token (GLA-340M: 4 of 256)")
    args = parser.parse_args(argv)

    import triton

    from flame.kernels.norm_backward import Launch, launch_for, norm_backward

    device = torch.cuda.get_device_name()
    print(f"device: {device}, torch {torch.__version__}, triton {triton.__version__}")
    fla = fla_backward()
    cases = (  # name, prenorm, residual dtype, RMS
        ("plain", False, torch.bfloat16, True),
        ("prenorm, bf16 residual", True, torch.bfloat16, True),
        ("prenorm, fp32 residual", True, torch.float32, True),
        ("layer norm with bias, prenorm, bf16 residual", True, torch.bfloat16, False),
    )
    for hidden, tokens in itertools.product(
        (int(h) for h in args.hidden.split(",")), (int(t) for t in args.tokens.split(","))
    ):
        for label, prenorm, residual_dtype, rms in cases:
            case = make_case(tokens, hidden, prenorm, residual_dtype, rms)
            name = f"{tokens}x{hidden} {label}"
            errors = check(case)
            moved = moved_bytes(case)
            t_fla = triton.testing.do_bench(lambda: fla(**case), warmup=50, rep=300)
            t_flame = triton.testing.do_bench(lambda: norm_backward(**case), warmup=50, rep=300)
            print(
                f"{name}: FLA {t_fla * 1e3:.1f} us ({moved / t_fla / 1e6:.0f} GB/s), flame {t_flame * 1e3:.1f} us "
                f"({moved / t_flame / 1e6:.0f} GB/s) [{launch_for(hidden)}], FLA/flame {t_fla / t_flame:.2f}x; "
                + "max rel diff "
                + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()),
                flush=True,
            )
            if args.sweep and rms:
                timed = []
                for rows, warps, waves in itertools.product((1, 2, 4, 8, 16), (4, 8), (1, 2, 4, 8)):
                    launch = Launch(rows, warps, waves)
                    try:
                        t = triton.testing.do_bench(lambda: norm_backward(**case, launch=launch), warmup=20, rep=100)
                    except Exception as error:  # noqa: BLE001 - a config that does not compile is skipped
                        print(f"  {launch}: {type(error).__name__}")
                        continue
                    timed.append((t, launch))
                for t, launch in sorted(timed, key=lambda p: p[0])[:6]:
                    print(f"  {t * 1e3:.1f} us ({moved / t / 1e6:.0f} GB/s) {launch}")
        if args.gated:
            rows = tokens * args.heads
            width = hidden // args.heads
            fn, moved = gated_case(rows, width)
            t = triton.testing.do_bench(fn, warmup=50, rep=300)
            print(f"{rows}x{width} gated (FLA): {t * 1e3:.1f} us ({moved / t / 1e6:.0f} GB/s)")


if __name__ == "__main__":
    main()
