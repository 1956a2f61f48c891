"""SwiGLU's elementwise kernels on the GPU: FLA 0.6's against flame.kernels.swiglu, side by side.

    python benchmarks/swiglu.py                 # the MLP of GLA-1.3B (batch 8 x 2048) and of GLA-340M (32 x 2048)
    python benchmarks/swiglu.py --shapes 16384x5632 --sweep

For each shape (tokens x the MLP's width, bf16) it times FLA's `swiglu_fwd` and `swiglu_fwdbwd` (with z, as the fused
MLP's backward calls it) and flame's (triton's do_bench, L2 flushed between runs), prints each one's time, its
bandwidth (the tensors read and written once / time) and flame/FLA, and whether both give the same bits. --sweep also
times every launch flame could use (elements per program, warps). GPU only; CI does not run it.
"""

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SHAPES = "16384x5632,65536x2816"  # GLA-1.3B's MLP at 8 x 2048 tokens, GLA-340M's at 32 x 2048


def fla_kernels():
    from fla.modules.activations import ops

    return tuple(getattr(f, "__flame_original__", f) for f in (ops.swiglu_fwd, ops.swiglu_fwdbwd))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=SHAPES, help="tokens x width, comma-separated")
    parser.add_argument("--sweep", action="store_true", help="time every launch configuration too")
    args = parser.parse_args(argv)

    import triton
    from triton.testing import do_bench

    from flame.kernels import swiglu

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    fla_fwd, fla_fwdbwd = fla_kernels()
    for shape in args.shapes.split(","):
        tokens, width = (int(n) for n in shape.split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        x, y, dz = (torch.randn(tokens, width, device="cuda", generator=g).bfloat16() for _ in range(3))
        nbytes = x.nbytes
        same_fwd = torch.equal(fla_fwd(x=x, y=y), swiglu.swiglu_fwd(x, y))
        same_bwd = all(
            torch.equal(a, b)
            for a, b in zip(fla_fwdbwd(x=x, y=y, g=dz, use_weight=True), swiglu.swiglu_fwdbwd(x, y, dz, True))
        )
        print(f"\n{tokens} x {width} bf16: the same bits as FLA's: forward {same_fwd}, backward {same_bwd}")
        rows = (
            ("forward", 3 * nbytes, lambda: fla_fwd(x=x, y=y), lambda launch: swiglu.swiglu_fwd(x, y, launch)),
            (
                "backward (dx, dy, z)",
                6 * nbytes,
                lambda: fla_fwdbwd(x=x, y=y, g=dz, use_weight=True),
                lambda launch: swiglu.swiglu_fwdbwd(x, y, dz, True, launch),
            ),
        )
        for name, moved, fla, flame in rows:
            t_fla = do_bench(fla)
            t_flame = do_bench(lambda flame=flame: flame(swiglu.LAUNCH))
            print(
                f"  {name}: FLA {t_fla * 1e3:.1f} us ({moved / t_fla / 1e9:.2f} TB/s), flame {t_flame * 1e3:.1f} us "
                f"({moved / t_flame / 1e9:.2f} TB/s): flame/FLA time {t_flame / t_fla:.3f}"
            )
            if args.sweep:
                for block, warps in itertools.product((1024, 2048, 4096, 8192), (4, 8, 16)):
                    launch = swiglu.Launch(block=block, warps=warps)
                    t = do_bench(lambda flame=flame, launch=launch: flame(launch))
                    print(f"    block {block:5d}, {warps:2d} warps: {t * 1e3:.1f} us ({moved / t / 1e9:.2f} TB/s)")


if __name__ == "__main__":
    main()
