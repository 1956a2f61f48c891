"""flame on several GPUs of one machine: one process against each shipped accelerate setup (DDP, FSDP, ZeRO-2, ZeRO-3).

    PYTHONPATH=. python benchmarks/distributed.py                       # GLA-340M, 8 x 2048 per GPU, 2 GPUs, all setups
    PYTHONPATH=. python benchmarks/distributed.py --processes 4 --setups one,ddp,fsdp --batch 16
    PYTHONPATH=. python benchmarks/distributed.py --setups one,ddp,ddp:eager           # DDP with and without graphs
    PYTHONPATH=. python benchmarks/distributed.py --setups ddp --train-options="--bf16-residual"  # any train option
    PYTHONPATH=. python benchmarks/distributed.py --device cpu --tiny --setups one,ddp   # plumbing smoke run (gloo)

Each setup is `accelerate launch --config_file configs/accelerate/SETUP.yaml --num_processes N -m flame train`, the
row `one` plain `flame train` on one device, all on the same prepared dataset of random tokens with the same model,
batch per process, context and seed, each with flame's defaults (so CUDA graphs for `one` and DDP on GPUs, eager
for FSDP and DeepSpeed); a setup written SETUP:eager runs with --no-cuda-graphs ("graph" says whether a run
replayed). Each run logs at step 1 + --warmup and at its last step; tokens/s is the tokens between the two over the
time between them (the engine logs after waiting for the GPU), so step 1 (compilation, autotuning) and the warm-up
stay out. Per process, that is against the one-process row ("scaling"); MFU on flame's FLOP count; peak memory is
rank 0's. On the CPU only `one` and DDP run (2 gloo processes via accelerate's --multi_gpu launcher); FSDP and
DeepSpeed need GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETUPS = ("one", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")
GPU_ONLY = ("fsdp", "deepspeed_zero2", "deepspeed_zero3")
TINY = {  # a GLA small enough for a CPU smoke run
    "model_type": "gla", "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "num_heads": 2,
    "expand_k": 0.5, "expand_v": 1, "attn_mode": "chunk", "use_short_conv": False, "fuse_norm": False,
    "fuse_swiglu": False, "fuse_cross_entropy": False, "tie_word_embeddings": True,
}  # fmt: skip
SEED = 0


def _data(folder: Path, config_path: str, args) -> Path:
    """Random-token documents, enough for every process's steps with a margin."""
    import datasets

    from flame.models import load_config
    from tests.prepared import random_prepared

    datasets.disable_progress_bars()
    windows = (1 + args.warmup + args.steps) * args.batch * args.processes
    return random_prepared(folder, load_config(config_path).vocab_size, windows, args.context, SEED)


def _parse(setup: str) -> tuple[str, bool]:
    """(the setup, eager or not) of a --setups entry: SETUP or SETUP:eager."""
    return setup.removesuffix(":eager"), setup.endswith(":eager")


def _command(setup: str, args, port: int) -> list[str]:
    if setup == "one":
        return [sys.executable, "-m", "flame", "train"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(args.processes),
              "--main_process_port", str(port)]  # fmt: skip
    if args.device == "cpu":  # accelerate's --cpu starts one process without MPI; --multi_gpu starts N on gloo
        launch += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        launch += ["--config_file", str(REPO / "configs" / "accelerate" / f"{setup}.yaml")]
    return [*launch, "-m", "flame", "train"]


def run_setup(setup: str, config_path: str, data: Path, work: Path, args, port: int) -> dict:
    """Train with `setup` and read its tokens/s, memory and MFU from the run's metrics.jsonl."""
    run = work / setup.replace(":", "-")
    name, eager = _parse(setup)
    total = 1 + args.warmup + args.steps
    options = ["--model", config_path, "--cache", str(data), "--path", str(run), "--batch", str(args.batch),
               "--context", str(args.context), "--steps", str(total), "--logging", str(1 + args.warmup),
               "--save", str(10**9), "--limit", "1", "--lr", "3e-4", "--warmup", "0", "--seed", str(SEED)]  # fmt: skip
    options += ["--no-cuda-graphs"] if eager else []
    options += shlex.split(args.train_options)
    env = os.environ | {"PYTHONPATH": str(REPO), "NCCL_NVLS_ENABLE": "0", "FLAME_QUIET": "1", "WANDB_MODE": "offline"}
    if name == "one" and args.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    done = subprocess.run(_command(name, args, port) + options, env=env, capture_output=True, text=True)
    (work / f"{run.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        return {"setup": setup, "error": " | ".join(tail)}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    a, b = next(r for r in records if r["step"] == 1 + args.warmup), records[-1]
    processes = 1 if name == "one" else args.processes
    tokens_per_s = (b["tokens"] - a["tokens"]) / (b["time"] - a["time"])
    return {
        "setup": setup,
        "processes": processes,
        "first_s": records[0].get("first_step_s"),
        "cuda_graph": next((r["cuda_graph"] for r in records if "cuda_graph" in r), None),
        "tokens_per_s": tokens_per_s,
        "per_process": tokens_per_s / processes,
        # the log's MFU is over its own window of steps: scaled to this one's tokens/s
        "mfu": b["mfu"] * tokens_per_s / b["tokens_per_s"] if b.get("mfu") and b["tokens_per_s"] else None,
        "memory_gib": b["memory_gib"],
        "losses": [r["loss"] for r in records],
    }


def table(rows: list[dict]) -> str:
    base = next((r["per_process"] for r in rows if r["setup"] == "one" and "error" not in r), None)
    lines = [
        f"{'setup':<16} {'procs':>5} {'graph':>6} {'tokens/s':>10} {'per proc':>10} {'scaling':>8} {'MFU':>6} "
        f"{'peak GiB':>9}"
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['setup']:<16} failed: {r['error']}")
            continue
        scaling = f"{r['per_process'] / base:.2f}" if base else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        memory = f"{r['memory_gib']:.2f}" if r["memory_gib"] is not None else "-"
        graph = "-" if not r["cuda_graph"] else "failed" if "failure" in r["cuda_graph"] else "yes"
        lines.append(
            f"{r['setup']:<16} {r['processes']:>5} {graph:>6} {r['tokens_per_s']:>10,.0f} {r['per_process']:>10,.0f} "
            f"{scaling:>8} {mfu:>6} {memory:>9}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="configs/gla_340M.json", help="model config JSON")
    parser.add_argument(
        "--setups", default=",".join(SETUPS), help=f"comma list of {', '.join(SETUPS)}, each also as SETUP:eager"
    )
    parser.add_argument("--processes", type=int, default=2, help="processes (GPUs) per launched setup")
    parser.add_argument("--batch", type=int, default=8, help="windows per process")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20, help="timed steps, after the first and the warm-up")
    parser.add_argument("--warmup", type=int, default=12, help="untimed steps after the first (DDP captures at 12)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="a tiny GLA instead of --model (CPU smoke run)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--train-options", default="", help="more `flame train` options for every setup, one string")
    args = parser.parse_args(argv)

    setups = [s for s in args.setups.split(",") if s]
    unknown = [s for s in setups if _parse(s)[0] not in SETUPS]
    if unknown:
        parser.error(f"unknown setup(s) {', '.join(unknown)}; choose from {', '.join(SETUPS)}")
    if args.device == "cpu" and (gpu := [s for s in setups if _parse(s)[0] in GPU_ONLY]):
        parser.error(f"{', '.join(gpu)} need GPUs (accelerate's FSDP and DeepSpeed): on the CPU run one,ddp")
    if args.processes < 2 or min(args.batch, args.context, args.steps) < 1 or args.warmup < 0:
        parser.error("--processes must be at least 2, --batch, --context and --steps at least 1, --warmup 0 or more")
    if args.device == "cuda":
        import torch

        if (gpus := torch.cuda.device_count()) < args.processes:
            parser.error(f"--processes {args.processes} needs as many GPUs; this machine has {gpus}")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config_path = str(Path(args.model).resolve())
        if args.tiny:
            config_path = str(work / "tiny_gla.json")
            Path(config_path).write_text(json.dumps(TINY))
        data = _data(work / "data", config_path, args)
        rows = []
        for i, setup in enumerate(setups):
            rows.append(run_setup(setup, config_path, data, work, args, port=29650 + i))
            print(f"{setup}: {'failed' if 'error' in rows[-1] else 'done'}", file=sys.stderr, flush=True)
    print(
        f"{Path(config_path).name if not args.tiny else 'tiny GLA'}, {args.batch} x {args.context} per process, "
        f"{args.processes} processes, {args.device}, {args.steps} timed steps after {1 + args.warmup}"
        + (f", with {args.train_options}" if args.train_options else "")
    )
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
