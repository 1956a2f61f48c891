"""CPU throughput of a tiny GLA's training step through flame.kernels: chunked form vs per-token recurrence.

    PYTHONPATH=. python benchmarks/kernels_cpu.py [--layers 2 --hidden 128 --seq 512 --batch 1 --steps 3]

Prints tokens/s of forward+backward for each form: the best of --steps timed steps after one warm-up (the best,
not the median, because a shared CPU's other jobs only ever slow a step down), and the load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

import flame.kernels


def step_time(model, ids) -> float:
    start = time.perf_counter()
    model(ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    flame.kernels.install(mode="auto")
    from fla.models import GLAConfig, GLAForCausalLM

    torch.manual_seed(0)
    config = GLAConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_heads=args.heads, vocab_size=1024)
    model = GLAForCausalLM(config).train()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    tokens = args.batch * args.seq
    print(f"GLA {args.layers} layers, hidden {args.hidden}, heads {args.heads}, T={args.seq}, batch {args.batch}")
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    forms = (("chunked (C=16, default)", 16), ("chunked (C=32)", 32), ("chunked (C=64)", 64), ("per-token", None))
    for label, chunk in forms:
        flame.kernels.install(chunk_size=chunk)
        step_time(model, ids)  # warm-up
        seconds = min(step_time(model, ids) for _ in range(args.steps))
        print(f"{label:24s} {tokens / seconds:10.0f} tokens/s   ({seconds * 1000:.0f} ms/step)")
    flame.kernels.install(chunk_size=16)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
