"""Gradient clipping and AdamW's update over a model's weights on the GPU: torch's against flame.kernels.adamw.

    python benchmarks/adamw.py                        # GLA-1.3B's weights (configs/gla_1B.json)
    python benchmarks/adamw.py --config configs/gla_340M.json --sweep

For a model's parameters (fp32 on the GPU, as flame trains them: two groups, weight decay on the matrices) with
random gradients, it times, with CUDA events (median of --repeat after 3 warm-up rounds), as a CUDA graph replays
them (learning rate on the device, `capturable`, `found_inf` given):
  torch step          torch's fused AdamW step alone
  flame step          flame's AdamW step alone (one launch per parameter group)
  torch clip + step   torch.nn.utils.clip_grad_norm_, then torch's step (what flame ran before)
  flame clip + step   flame's clip_ (the norm only), then its step, which multiplies each gradient as it reads it
Bandwidth counts the step's bytes once: weight, gradient and both moments read, weight and moments written (28 bytes
a parameter). Then it checks how far apart the two optimizers' weights and moments are after 5 clipped updates from
the same weights and gradients. --sweep
times every launch flame could use (elements per program, warps). GPU only; CI does not run it.
"""

import argparse
import itertools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def shapes(config_path: str) -> list[torch.Size]:
    from flame import models

    model = models._meta_model(models.load_config(config_path))
    return [p.shape for p in model.parameters()]


def timed(fn, repeat: int) -> float:
    """Median milliseconds of `fn` over `repeat` runs after 3."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/gla_1B.json")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="time every launch configuration too")
    args = parser.parse_args(argv)

    from flame.kernels import adamw

    device = torch.device("cuda")
    sizes = shapes(args.config)
    n = sum(s.numel() for s in sizes)
    print(f"{args.config}: {len(sizes)} tensors, {n / 1e6:.1f}M parameters, {torch.cuda.get_device_name()}")
    torch.manual_seed(0)
    weights = [torch.randn(s, device=device) * 0.02 for s in sizes]
    grads = [torch.randn(s, device=device) * 1e-3 for s in sizes]

    def optimizer(kind):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        opt = kind(groups, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
        lr = torch.tensor(3e-4, device=device)
        for group in opt.param_groups:
            group["lr"], group["capturable"] = lr, True
        opt.found_inf = torch.zeros((), device=device)
        return opt, params

    torch_opt, torch_params = optimizer(torch.optim.AdamW)
    flame_opt, flame_params = optimizer(adamw.AdamW)

    def graphed(fn):
        """`fn` captured in a CUDA graph (after two eager runs on the capturing stream): its replay."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay

    def torch_clip_step():
        torch.nn.utils.clip_grad_norm_(torch_params, 1e-3)
        torch_opt.step()

    def flame_clip_step():
        flame_opt.clip_(flame_params, 1e-3)
        flame_opt.step()

    rows = [
        ("torch step", graphed(torch_opt.step)),
        ("flame step", graphed(flame_opt.step)),
        ("torch clip + step", graphed(torch_clip_step)),
        ("flame clip + step", graphed(flame_clip_step)),
    ]
    results = {}
    for name, fn in rows:
        ms = timed(fn, args.repeat)
        results[name] = ms
        print(f"{name:<20} {ms:8.3f} ms  {28 * n / ms / 1e9:6.2f} TB/s")
    print(f"flame/torch time: step {results['flame step'] / results['torch step']:.3f}, "
          f"clip + step {results['flame clip + step'] / results['torch clip + step']:.3f}")  # fmt: skip
    # The same 5 clipped updates from the same weights and gradients, eagerly, with fresh optimizers.
    del rows, torch_opt, torch_params, flame_opt, flame_params
    torch.cuda.empty_cache()
    torch_opt, torch_params = optimizer(torch.optim.AdamW)
    flame_opt, flame_params = optimizer(adamw.AdamW)
    for _ in range(5):
        for p, q, g in zip(torch_params, flame_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        torch_clip_step()
        flame_clip_step()
    torch.cuda.synchronize()
    worst = {"weight": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
    same = True
    for a, b in zip(flame_params, torch_params):
        pairs = {"weight": (a, b)}
        pairs.update({k: (flame_opt.state[a][k], torch_opt.state[b][k]) for k in ("exp_avg", "exp_avg_sq")})
        for k, (x, y) in pairs.items():
            worst[k] = max(worst[k], ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item())
            same &= torch.equal(x, y)
    print("after 5 clipped updates from the same weights and gradients: bit for bit "
          f"{same}; largest relative difference " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))  # fmt: skip
    if args.sweep:
        params = [p for g in flame_opt.param_groups for p in g["params"]]
        state = [flame_opt.state[p] for p in params]
        lists = [params, [p.grad for p in params], [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state]]
        lr = flame_opt.param_groups[0]["lr"]
        for block, warps in itertools.product((1024, 2048, 4096, 8192), (4, 8, 16)):
            launch = adamw.Launch(block=block, warps=warps)
            tables = adamw._Tables(launch)
            steps = [s["step"].clone() for s in state]

            def step(launch=launch, tables=tables, steps=steps):
                adamw.adamw_step_(*lists, steps, lr=lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                                  tables=tables, launch=launch)  # fmt: skip

            ms = timed(step, args.repeat)
            print(f"  {block:>5} elements a program, {warps:>2} warps: {ms:8.3f} ms  {28 * n / ms / 1e9:6.2f} TB/s")


if __name__ == "__main__":
    main()
