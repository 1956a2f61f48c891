"""Training throughput on one GPU: a bare PyTorch loop, flame's engine and the Hugging Face Trainer (issue 8).

    PYTHONPATH=. python benchmarks/throughput.py                       # GLA-340M, GDN-340M at 8 x 2048, GLA-1.3B
    PYTHONPATH=. python benchmarks/throughput.py --models gla-340M --batch 16 --steps 30
    PYTHONPATH=. python benchmarks/throughput.py --device cpu --tiny   # smoke run of the plumbing, seconds
    PYTHONPATH=. python benchmarks/throughput.py --models gla-340M --repeat 3    # engines interleaved, median run
    PYTHONPATH=. python benchmarks/throughput.py --models gla-340M --engines bare,flame --steps 60 --paired 5
        # both engines' workers at once, taking turns of 5 updates: a host-bound step's drifts hit both alike, and
        # each round's ratio is printed (median, range)
    PYTHONPATH=. python benchmarks/throughput.py --models gla-340M --engines bare,flame --profile 3
        # where a step's time goes: GPU busy share, the top kernels and the host's ops by their own time (the
        # profiler's overhead included; not for :cuda-graphs engines, whose replays step no optimizer it can count)
    PYTHONPATH=. python benchmarks/throughput.py --models gla-340M --batch 32 --engines bare,flame,flame:share-casts
        # an engine with options beside the plain one (:share-casts, :bf16-residual, :checkpointing, :compile,
        # flame's :cuda-graphs):
        # the option's gain, side by side; flame:share-casts:bf16-residual is flame's fastest setting (add
        # :cuda-graphs at small batches)
    PYTHONPATH=. python benchmarks/throughput.py --models gla-340M \
        --set fuse_cross_entropy=false --set fuse_linear_cross_entropy=true    # FLA allows only one of the two

Every (model, engine) pair runs in its own subprocess, so peak memory is that engine's alone. Each runs the same
model (built by flame.models.build_model from the same config and seed, fp32 weights), batch, context and precision
(bf16 autocast on CUDA, fp32 on the CPU), fused AdamW, grad-norm clipping at 1.0:
  bare        the model, the optimizer, autocast, random tokens; no framework; reads its loss back every step
  bare-async  the same loop with every input on the GPU beforehand and no loss read back: nothing in a step
              waits for the GPU, so the host queues the next step while the GPU runs this one (not a default
              engine: it measures what the per-step read-back of bare costs)
  bare-graph  the bare loop's whole step (forward, backward, clipping, fused AdamW) captured once in a CUDA graph
              and replayed, so the host launches one graph per step instead of every kernel (GPU only, not a
              default engine: it measures what launching costs where the host bounds the step, small batches).
              Its first step is 3 eager steps on a side stream (FLA's tuning, the allocator's warm-up), the
              capture and one replay; so it trains 3 updates more than the others, which only the losses show
  flame       flame.engine.train on a prepared dataset of random tokens (a log record every 1 + --warmup steps and at
              the end, no checkpoint until the end); like hf, it reads losses back only for a log record. With
              autocast's own casts (--no-share-casts), no CUDA graphs (--no-cuda-graphs) and the projections one
              by one (--no-group-projections), the settings of the other engines;
              flame:share-casts:cuda-graphs:group-projections is `flame train` as it runs by default on one GPU
              flame:cuda-graphs is `flame train --cuda-graphs` (GPU only): its update 4 is captured (the last
              warm-up step), the timed steps are replays
  hf          transformers.Trainer on the same random tokens; keeps its loss on the GPU until a logging step
              (here none), so, like bare-async, it reads nothing back per step
On a GPU, flame runs FLA's kernels with flame.kernels' own in front of those it beats (the norm backward, GLA's
bf16 chunk states, SwiGLU's elementwise kernels, and its AdamW with the clip folded in, as `flame train` does); bare
and hf run FLA's as FLA ships them, and torch's fused AdamW
(what a loop or the Trainer gets). :fla-kernels and :flame-kernels swap that for one engine (flame:fla-kernels:
what flame's own kernels add, side by side).
Step 1 (Triton compilation and FLA autotuning on a fresh machine) is timed alone (first_s), then --warmup steps,
then --steps timed steps give tokens/s: every engine is timed by the wall clock over those steps, synchronised
with the GPU at the window's edges only. MFU is
shown on flame's FLOP count (flame.models.flops_per_token) and on 6N alone (N = all parameters). Peak memory is
torch.cuda.max_memory_allocated over the whole run (the CPU: peak RSS).
Prints a table and the ratios of each flame run, and of each engine run with options (flame:share-casts), to
each engine run without; --json writes the rows. Measured on an H200, a
single run of a few seconds swings by up to 20% with its place in the sequence (the first engine after a long idle
GPU is slow), so --repeat N runs every engine N times, the order reversed every other round, and reports the median
run (a real run, so for an even N the slower of the middle two) beside the spread of all N. Where the host bounds
the step (eager at batch 8) even that is not enough: the host's speed drifts within seconds, so --paired K runs the
engines' workers at once, taking turns of K updates (_Turns), and compares them round by round.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "gla-340M": "configs/gla_340M.json",
    "gdn-340M": "configs/gated_deltanet_340M.json",
    "gla-1.3B": "configs/gla_1B.json",
}
ENGINES = ("bare", "flame", "hf")  # the default
ALL_ENGINES = ENGINES + ("bare-async", "bare-graph")  # on request
GPU_ONLY = ("bare-graph",)
# An engine may carry options after colons (flame:share-casts, bare:compile:share-casts): the same engine with
# them, beside the plain one in the same run.
VARIANTS = (
    "compile", "share-casts", "bf16-residual", "checkpointing", "cuda-graphs", "fla-kernels", "flame-kernels",
    "group-projections", "fla-states", "keep-states",
)  # fmt: skip
# group-projections: bare, bare-async and flame (flame.projections; on by default in `flame train`)
# cuda-graphs: flame only. Kernels on a GPU: flame runs flame.kernels' own in front of FLA's where they are faster
# (the norm backward, GLA's states, SwiGLU), bare and hf run FLA's as FLA ships them; :fla-kernels /
# :flame-kernels swap that.
# With flame's kernels GLA's backward gets bf16 chunk states (FLAME_GLA_STATES, flame/kernels/gla_states.py):
# recomputed by default; :keep-states keeps the forward's, :fla-states runs FLA's fp32 recompute.


def _spec(engine: str) -> tuple[str, set[str]]:
    base, *options = engine.split(":")
    return base, set(options)


def _gla_states(options: set[str]) -> str | None:
    """FLAME_GLA_STATES for an engine's worker, or None to leave the default."""
    return "keep" if "keep-states" in options else "fla" if "fla-states" in options else None


def _kernels(base: str, options: set[str]) -> str:
    """The flame.kernels mode an engine runs on a GPU: `auto` (flame's own GPU kernels in front of FLA's) or
    `triton` (FLA's own only, as FLA ships them)."""
    if "fla-kernels" in options or (base != "flame" and "flame-kernels" not in options):
        return "triton"
    return "auto"


TINY = {  # a GLA small enough for a CPU smoke run through flame's portable kernels
    "model_type": "gla", "attn_mode": "chunk", "hidden_size": 64, "num_heads": 2, "num_hidden_layers": 2,
    "expand_k": 0.5, "expand_v": 1, "hidden_ratio": 4, "vocab_size": 256, "max_position_embeddings": 1024,
    "fuse_cross_entropy": False, "fuse_norm": False, "fuse_swiglu": False, "tie_word_embeddings": True,
    "use_gk": True, "use_gv": False, "use_output_gate": True, "use_short_conv": False,
    "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
SEED = 0


# ---------------------------------------------------------------- one engine, in a subprocess


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device) -> float:
    from flame.metrics import peak_memory_gib

    return peak_memory_gib(device)


def _random_ids(vocab: int, n: int, context: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, context), generator=g)


def _profile(step, first: int, args, device) -> dict:
    """Run args.profile more steps under torch.profiler: what share of the wall time the GPU was busy, the kernels
    that took most of it, and the host's ops by their own time (per step); on the CPU the ops only."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        # the clock inside the block: leaving it processes every event recorded, which is no step's time
        start = time.perf_counter()
        for i in range(first, first + args.profile):
            step(i)
        _sync(device)
        wall_us = (time.perf_counter() - start) * 1e6
    return _profile_summary(prof, wall_us, args.profile, cuda)


def _profile_summary(prof, wall_us: float, steps: int, cuda: bool) -> dict:
    """Per step: the wall time, the GPU's busy share and its top kernels (CUDA), and the host ops that took the most
    of their own time (what the Python side launches and waits on: where one loop's host costs more than another's)."""
    from torch.autograd import DeviceType

    spent: dict[str, float] = {}
    if cuda:
        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                spent[e.name] = spent.get(e.name, 0.0) + e.time_range.elapsed_us()
    host = {e.key: e.self_cpu_time_total for e in prof.key_averages() if e.self_cpu_time_total > 0}
    if not cuda:
        spent = host
    busy, host_total = sum(spent.values()), sum(host.values())
    top = sorted(spent.items(), key=lambda kv: -kv[1])[:25]
    host_top = sorted(host.items(), key=lambda kv: -kv[1])[:12] if cuda else []  # on the CPU: "top" itself
    return {
        "steps": steps,
        "wall_ms_per_step": wall_us / 1e3 / steps,
        "gpu_busy": busy / wall_us if cuda else None,
        "top": [[name, us / 1e3 / steps, us / busy] for name, us in top] if busy else [],
        "host_ms_per_step": host_total / 1e3 / steps,
        "host_top": [[name, us / 1e3 / steps, us / host_total] for name, us in host_top] if host_total else [],
    }


def _an_update(optimizer) -> bool:
    """For the global optimizer-step hooks below: whether this step is an engine's update (its AdamW, torch's or
    flame's), not the step of a wrapper around it (accelerate's), if one ever reaches a hook."""
    import torch

    return isinstance(optimizer, torch.optim.AdamW)


class _StepProfiler:
    """flame's engine runs its own loop, so its steps are counted by a global optimizer-step hook: the timed window
    runs from the end of update 1 + warmup to the end of update `total` (each edge synchronised, as the records
    are), then `args.profile` more updates under torch.profiler. Eager updates only: a captured CUDA graph steps the
    optimizer inside its replay, where no hook runs."""

    def __init__(self, args, device, total: int):
        self.args, self.device, self.total, self.count = args, device, total, 0
        self.marks: dict[int, float] = {}  # at each edge, the GPU caught up
        self.prof, self.profiled_from, self.summary = None, None, None

    def __call__(self, optimizer, *_):
        from torch.profiler import ProfilerActivity, profile

        if not _an_update(optimizer):
            return
        self.count += 1
        edges = (1 + self.args.warmup, self.total, self.total + self.args.profile)
        if self.count not in edges:
            return
        _sync(self.device)
        self.marks[self.count] = time.perf_counter()
        cuda = self.device.type == "cuda"
        if self.count == self.total:
            self.prof = profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda)
            self.prof.__enter__()
            # the profile's clock starts once the profiler has: its start-up is neither a timed nor a profiled step
            self.profiled_from = time.perf_counter()
        elif self.count == edges[2]:
            self.prof.__exit__(None, None, None)
            wall_us = (self.marks[self.count] - self.profiled_from) * 1e6
            self.summary = _profile_summary(self.prof, wall_us, self.args.profile, cuda)

    def tokens_per_s(self) -> float:
        a, b = self.marks[1 + self.args.warmup], self.marks[self.total]
        return self.args.steps * self.args.batch * self.args.context / (b - a)


def _apply_options(model, config, args) -> None:
    """--compile: every engine compiles the decoder blocks the way `flame train --compile` does; --share-casts:
    every engine shares the block norms' bf16 casts the way `flame train --share-casts` does; --bf16-residual: every
    engine keeps the residual stream in bf16 the way `flame train --bf16-residual` does; --checkpointing: every
    engine checkpoints each decoder layer's activations the way `flame train --checkpointing` does."""
    from flame import models

    if args.checkpointing and not models.checkpointing(model):
        sys.exit(f"--checkpointing: model type {config.model_type} does not support activation checkpointing")
    if args.share_casts:
        models.share_norm_casts(model)
    if args.bf16_residual:
        models.bf16_residual(model)
    if args.compile:
        from flame.engine import compile_blocks, compile_settings

        compile_settings().__enter__()  # as flame's engine has them for a run; a worker process: for good
        compile_blocks(model)


def _graphed(update, optimizer, data, device, read_back: bool):
    """bare-graph's step: the bare loop's update (`update(ids, cache_enabled)`) captured in one CUDA graph on its
    first call and replayed after. What a capture needs: the steps before it run on a side stream (FLA's autotuning
    benchmarks and compiles then, the allocator warms up), inputs copied into one static buffer, AdamW with
    capturable=True (its step count on the GPU), autocast without its cache of weight casts, and the gradients None
    at capture so that the graph allocates and writes them each replay."""
    import torch

    ids = torch.empty(data.shape[1:], dtype=data.dtype, device=device)
    graph, loss = None, None

    def body():
        return update(ids, cache_enabled=False)

    def step(i):
        nonlocal graph, loss
        ids.copy_(data[i])
        if graph is None:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    optimizer.zero_grad(set_to_none=True)
                    body()
            torch.cuda.current_stream(device).wait_stream(side)
            optimizer.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loss = body()
        graph.replay()
        if read_back:
            float(loss)  # as bare reads its loss back each step

    return step


def run_bare(config_path: str, args, device, *, read_back: bool = True, graph: bool = False) -> dict:
    """The bare loop; read_back=False is bare-async: inputs moved to the device before the clock starts, no loss
    read back (the loss is still computed, and the step is the same); graph=True is bare-graph (_graphed)."""
    import torch

    from flame.models import build_model

    model, config = build_model(config_path, seed=SEED, dtype=torch.float32, device=device)
    _apply_options(model, config, args)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True, capturable=graph)
    total = 1 + args.warmup + args.steps
    rows = total + args.profile
    data = _random_ids(config.vocab_size, rows * args.batch, args.context, SEED).view(rows, args.batch, -1)
    if not read_back:
        data = data.to(device)

    def update(ids, cache_enabled: bool = True):
        """Forward, backward, clipping and the AdamW step; the loss (the gradients are left for the caller)."""
        with torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=cache_enabled
        ):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.detach()

    if args.group_projections:  # found by a forward without gradients, before update 1, as flame's engine does
        from flame import projections
        from flame.models import blocks

        def forward():
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                ids = data[0].to(device)
                model(input_ids=ids, labels=ids, use_cache=False)

        groups = projections.find_groups(blocks(model), forward)
        print(f"grouped projections: {projections.install(groups)}", flush=True)

    def step(i):
        loss = update(data[i].to(device))
        optimizer.zero_grad(set_to_none=True)
        if read_back:
            float(loss)  # as flame reads its loss back each step

    if graph:
        step = _graphed(update, optimizer, data, device, read_back)
    # Timed as flame's engine is: the wall clock over the window, synchronised at its edges only (a sync around
    # every step would idle the GPU while the next step is launched and charge that to the bare loop).
    _sync(device)
    start = time.perf_counter()
    step(0)
    _sync(device)
    first_s = time.perf_counter() - start
    for i in range(1, 1 + args.warmup):
        step(i)
    _sync(device)
    start = time.perf_counter()
    for i in range(1 + args.warmup, total):
        step(i)
    _sync(device)
    row = {"first_s": first_s, "tokens_per_s": args.steps * args.batch * args.context / (time.perf_counter() - start)}
    if args.profile:
        row["profile"] = _profile(step, total, args, device)
    return row


def run_flame(config_path: str, args, device, work: Path, clock: _GcClock | None = None) -> dict:
    from flame import engine
    from flame.config import TrainConfig
    from flame.logging import RunLogger
    from flame.models import load_config
    from tests.prepared import random_prepared

    total = 1 + args.warmup + args.steps
    steps = total + args.profile
    random_prepared(work / "data", load_config(config_path).vocab_size, steps * args.batch, args.context, SEED)
    cfg = TrainConfig(
        model=config_path, cache=str(work / "data"), path=str(work / "run"), context=args.context,
        batch=args.batch, steps=steps, lr=3e-4, warmup=0, seed=SEED, logging=1 + args.warmup, save=10**9, limit=0,
        compile=args.compile, share_casts=args.share_casts, bf16_residual=args.bf16_residual,
        group_projections=args.group_projections,
        checkpointing=args.checkpointing, cuda_graphs=args.cuda_graphs,
    )  # fmt: skip
    record = RunLogger.record

    def record_then_stop(logger, rec: dict) -> None:  # the first step's record starts the clock, the last's stops it
        record(logger, rec)
        if clock is not None and rec.get("step") == 1:
            clock.waiting = False
        if clock is not None and rec.get("step") == steps:
            clock.stop()

    if clock is not None:
        clock.waiting = True  # until the record of step 1, after engine.freeze_survivors' collection (see _GcClock)

    handle = None
    if args.profile:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        profiler = _StepProfiler(args, device, total)
        handle = register_optimizer_step_post_hook(profiler)
    RunLogger.record = record_then_stop
    try:
        engine.train(cfg)
    finally:
        RunLogger.record = record
        if handle is not None:
            handle.remove()
    records = [json.loads(ln) for ln in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    # Records come at step 1, every 1 + warmup steps and the last: "time" (seconds since the loop started) is taken
    # when the GPU has caught up, so the steps between the record of step 1 + warmup and the last are the timed ones.
    timed = [r for r in records if r["step"] == 1 + args.warmup]
    if not timed or records[-1]["step"] != steps:  # a run stopped early (a `timeout` around the call SIGTERMs it)
        raise RuntimeError(
            f"flame's run logged steps {[r['step'] for r in records]}, expected {1 + args.warmup} and {steps} among "
            f"them; its records: {records}"
        )
    a, b = timed[0], records[-1]
    row = {
        "first_s": records[0]["first_step_s"],
        "tokens_per_s": (b["tokens"] - a["tokens"]) / (b["time"] - a["time"]),
        "first_step_tuning": records[0].get("first_step_tuning"),  # what step 1's autotuning cost, kernel by kernel
    }
    if args.profile:  # the window is the hook's (the records' last one would hold the profiled updates)
        row |= {"tokens_per_s": profiler.tokens_per_s(), "profile": profiler.summary}
    return row


def run_hf(config_path: str, args, device, work: Path) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from flame.models import build_model

    model, config = build_model(config_path, seed=SEED, dtype=torch.float32)
    _apply_options(model, config, args)
    total = 1 + args.warmup + args.steps
    ids = _random_ids(config.vocab_size, total * args.batch, args.context, SEED)
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    marks: dict[str, float] = {}

    class Timer(TrainerCallback):
        """The first step on its own, then the wall clock from the end of the warm-up to the end of the last step,
        synchronised at those edges only (as flame's engine and the bare loop are timed)."""

        def on_step_begin(self, args_, state, control, **kw):
            if state.global_step == 0:
                _sync(device)
                marks["begin"] = time.perf_counter()

        def on_step_end(self, args_, state, control, **kw):
            if state.global_step in (1, 1 + args.warmup, total):
                _sync(device)
                marks.setdefault(state.global_step, time.perf_counter())

    targs = TrainingArguments(
        output_dir=str(work / "hf"), per_device_train_batch_size=args.batch, max_steps=total, learning_rate=3e-4,
        weight_decay=0.1, max_grad_norm=1.0, lr_scheduler_type="constant", bf16=device.type == "cuda",
        use_cpu=device.type == "cpu", optim="adamw_torch_fused",
        save_strategy="no", report_to="none", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        seed=SEED, remove_unused_columns=False,
    )  # fmt: skip
    Trainer(model=model, args=targs, train_dataset=dataset, callbacks=[Timer()]).train()
    timed = marks[total] - marks[1 + args.warmup]
    return {"first_s": marks[1] - marks["begin"], "tokens_per_s": args.steps * args.batch * args.context / timed}


class _Turns:
    """--paired K: the engines' workers run at the same time and take turns, one engine on the host and the GPU at a
    time, K updates a turn, while the others wait (blocked on their stdin, the GPU idle). A host whose speed drifts
    (an H200 machine's swings by up to half between runs of a few seconds where the host bounds the step) then
    drifts under every engine alike, and the ratio of one engine's turn to the other's in the same round measures
    the engines, not the moment.

    The driver writes "go" on the worker's stdin; at each edge (the end of update 1 + warmup, then every K updates,
    counted by a global optimizer-step hook, so any engine whose updates step an optimizer can take turns) the GPU
    is synchronised, the turn's seconds are kept and the worker prints YIELD and waits for its next go. The worker's
    first turn is its set-up, step 1 and warm-up (so no engine is tuned or built while another is timed); its last
    runs on to its exit (the tail, flame's final checkpoint, while the others still wait)."""

    def __init__(self, device, first: int, turns: int, k: int):
        self.device, self.first, self.turns, self.k = device, first, turns, k
        self.updates, self.seconds, self.start = 0, [], 0.0

    def wait(self) -> None:
        print("YIELD", flush=True)
        if sys.stdin.readline().strip() != "go":  # the driver is gone
            sys.exit("--paired: the driver closed this worker's turn pipe")
        self.start = time.perf_counter()

    def on_step(self, optimizer, *_) -> None:
        if not _an_update(optimizer):
            return
        self.updates += 1
        timed = self.updates - self.first
        if timed < 0 or timed % self.k:
            return
        _sync(self.device)
        if timed:
            self.seconds.append(time.perf_counter() - self.start)
        if len(self.seconds) < self.turns:
            self.wait()

    def tokens_per_s(self, args) -> float:
        return len(self.seconds) * self.k * args.batch * args.context / sum(self.seconds)


class _GcClock:
    """Python's garbage collections from an engine's first update to its last (updates seen by a global
    optimizer-step hook; a CUDA graph's replays are not, so for flame the record of its last step also stops the
    clock, before train() collects whatever the run leaves): how many of each generation and the seconds they took.
    A process that imports more (flame's engine: accelerate, datasets) holds more objects for a full collection to
    walk, and host-bound steps pay for that.

    For flame the clock starts at the record of its first step instead, after the one full collection that the
    engine runs on purpose at the end of step 1 (engine.freeze_survivors, part of the first step's time and outside
    tokens/s); counted, it read as a 0.4 s collection among GLA-1.3B's steps."""

    def __init__(self, last: int):
        self.updates, self.last, self.start, self.stopped = 0, last, None, False
        self.waiting = False  # for a start signal (flame's first record) besides the first update
        self.counts, self.seconds = [0, 0, 0], [0.0, 0.0, 0.0]

    def stop(self) -> None:
        self.stopped = True

    def on_step(self, optimizer, *_) -> None:
        if _an_update(optimizer):
            self.updates += 1

    def on_gc(self, phase: str, info: dict) -> None:
        if self.stopped or self.waiting or not 1 <= self.updates < self.last:  # nor flame's at the end of its run
            return
        if phase == "start":
            self.start = time.perf_counter()
        elif self.start is not None:
            g = info["generation"]
            self.counts[g] += 1
            self.seconds[g] += time.perf_counter() - self.start
            self.start = None

    def row(self) -> dict:
        return {"updates": self.updates, "collections": self.counts, "seconds": self.seconds}


def worker(args) -> None:
    import gc

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from flame.metrics import mfu, peak_flops, reset_peak_memory
    from flame.models import build_model, count_params, flops_per_token

    device = torch.device(args.device)
    turns = None
    if args.paired:
        turns = _Turns(device, 1 + args.warmup, args.steps // args.paired, args.paired)
        register_optimizer_step_post_hook(turns.on_step)
        turns.wait()  # the first turn: set-up, step 1 and the warm-up
    if device.type == "cuda":  # on the CPU the portable torch code runs whatever the engine
        from flame.kernels import settings

        settings.mode = args.kernels
    reset_peak_memory(device)
    clock = _GcClock(last=1 + args.warmup + args.steps + args.profile)
    register_optimizer_step_post_hook(clock.on_step)
    gc.callbacks.append(clock.on_gc)
    with tempfile.TemporaryDirectory(prefix="flame-bench-") as tmp:
        work = Path(tmp)
        config_path = args.worker_config
        if args.engine in ("bare", "bare-async", "bare-graph"):
            row = run_bare(
                config_path, args, device, read_back=args.engine != "bare-async", graph=args.engine == "bare-graph"
            )
        elif args.engine == "flame":
            row = run_flame(config_path, args, device, work, clock)
        else:
            row = run_hf(config_path, args, device, work)
    if turns is not None:  # timed over its turns only (the engine's own window held the others' turns too)
        row |= {"tokens_per_s": turns.tokens_per_s(args), "turns_s": turns.seconds}
    meta, config = build_model(config_path, meta=True)
    n = count_params(meta)["total"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = peak_flops(name, "bf16")
    tps = row["tokens_per_s"]
    gc.callbacks.remove(clock.on_gc)
    row |= {
        "kernels": ("flame" if args.kernels == "auto" else "fla") if device.type == "cuda" else "torch",
        "gc": clock.row(),
        "params": n,
        "device": name or "cpu",
        "peak_gib": _peak_gib(device),
        "mfu": mfu(tps, flops_per_token(config, args.context), 1, peak),
        "mfu_6n": mfu(tps, 6.0 * n, 1, peak),
    }
    print("RESULT " + json.dumps(row), flush=True)


# ---------------------------------------------------------------- the driver


def _blocker(config_path: str) -> tuple[str, str] | None:
    from flame.kernels.compat import hopper_triton_blocker

    return hopper_triton_blocker(json.loads(Path(config_path).read_text())["model_type"])


def _spread(row: dict) -> str:
    runs = row.get("tokens_per_s_runs")
    return f"  runs {min(runs):.0f}..{max(runs):.0f}" if runs else ""


def _turn_ratios(by: dict, eng: str, other: str) -> str:
    """--paired: the ratio of eng's turn to other's in each round (the same updates, so their seconds inverted):
    the median and the range."""
    if "turns_s" not in by[eng] or "turns_s" not in by[other]:
        return ""
    ratios = sorted(b / a for a, b in zip(by[eng]["turns_s"], by[other]["turns_s"]))
    median = ratios[(len(ratios) - 1) // 2]
    return f"; turn by turn: median {median:.3f}, {ratios[0]:.3f}..{ratios[-1]:.3f} over {len(ratios)} rounds"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _worker_cmd(eng: str, config_path: str, args, env: dict) -> tuple[list[str], dict]:
    """The command line and environment of engine `eng`'s worker."""
    base, options = _spec(eng)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--engine", base, "--worker-config", config_path]
    cmd += ["--batch", str(args.batch), "--context", str(args.context), "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup), "--device", args.device]
    cmd += ["--compile"] * (args.compile or "compile" in options)
    cmd += ["--share-casts"] * (args.share_casts or "share-casts" in options)
    cmd += ["--bf16-residual"] * (args.bf16_residual or "bf16-residual" in options)
    cmd += ["--checkpointing"] * (args.checkpointing or "checkpointing" in options)
    cmd += ["--cuda-graphs"] * ("cuda-graphs" in options)
    cmd += ["--group-projections"] * ("group-projections" in options)
    cmd += ["--kernels", _kernels(base, options)]
    cmd += ["--profile", str(args.profile), "--paired", str(args.paired)]
    states = _gla_states(options)
    return cmd, env | {"FLAME_GLA_STATES": states} if states else env


def _row(model: str, eng: str, returncode: int, result: list[str]) -> dict:
    if returncode != 0 or not result:
        return {"model": model, "engine": eng, "error": f"exit {returncode}"}
    row = {"model": model, "engine": eng} | json.loads(result[-1][len("RESULT ") :])
    print("ROW " + json.dumps(row), file=sys.stderr, flush=True)  # kept if a later one is cut off
    return row


def _run_engine(model: str, eng: str, config_path: str, args, env: dict, round_: int) -> dict:
    """One engine in its own process; its row, or {"error": ...}."""
    cmd, env = _worker_cmd(eng, config_path, args, env)
    tag = f" round {round_ + 1}/{args.repeat}" if args.repeat > 1 else ""
    print(f"== {model} {eng} (batch {args.batch} x {args.context}){tag}", file=sys.stderr, flush=True)
    # The worker's output is echoed as it comes (flame's first-step tuning trace included), so a run cut off by a
    # time limit still shows how far it got.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, cwd=str(REPO))
    result = []
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result.append(line)
        else:
            print(f"   {line}", end="", file=sys.stderr, flush=True)
    proc.wait()
    return _row(model, eng, proc.returncode, result)


def _run_paired(model: str, engines: list[str], config_path: str, args, env: dict) -> list[dict]:
    """--paired: every engine's worker at once, taking turns (_Turns): each round gives every worker one turn, the
    order reversed every other round (so neither engine always follows the other). Round 0 is the workers' set-up,
    step 1 and warm-up, then one round per timed turn. Their rows, each with its turns' seconds."""
    events: queue.Queue = queue.Queue()  # (worker, line), a line None when the worker has exited
    procs = []
    for i, eng in enumerate(engines):
        cmd, worker_env = _worker_cmd(eng, config_path, args, env)
        proc = subprocess.Popen(
            cmd, env=worker_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(REPO)
        )
        procs.append(proc)

        def read(i=i, proc=proc):
            for line in proc.stdout:
                events.put((i, line))
            proc.wait()
            events.put((i, None))

        threading.Thread(target=read, daemon=True).start()
    waiting, exited, results = set(), set(), [[] for _ in engines]

    def pump() -> None:  # one line of any worker's
        i, line = events.get()
        if line is None:
            exited.add(i)
        elif line.strip() == "YIELD":
            waiting.add(i)
        elif line.startswith("RESULT "):
            results[i].append(line)
        else:
            print(f"   {line}", end="", file=sys.stderr, flush=True)

    while len(waiting | exited) < len(procs):  # every worker has imported what it needs, or failed
        pump()
    turns = args.steps // args.paired
    for r in range(1 + turns):
        for i in range(len(procs))[:: 1 if r % 2 == 0 else -1]:
            if i not in waiting:
                continue
            what = "set-up, step 1 and warm-up" if r == 0 else f"turn {r}/{turns}, {args.paired} updates"
            print(f"== {model} {engines[i]} (batch {args.batch} x {args.context}): {what}", file=sys.stderr, flush=True)
            waiting.discard(i)
            procs[i].stdin.write("go\n")
            procs[i].stdin.flush()
            while i not in waiting and i not in exited:  # it alone runs
                pump()
    for proc in procs:  # any left waiting (a worker whose engine stepped its optimizer less than expected)
        if proc.poll() is None:
            proc.stdin.close()
    while len(exited) < len(procs):
        pump()
    return [_row(model, eng, proc.returncode, result) for eng, proc, result in zip(engines, procs, results)]


def _median(runs: list[dict]) -> dict:
    """The run with the median tokens/s (the lower middle of an even count), with every run's tokens/s beside it;
    step 1 is reported from the first run (the one that met a cold cache), peak memory as the largest."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    if len(runs) == 1:
        return runs[0]
    by_speed = sorted(runs, key=lambda r: r["tokens_per_s"])
    row = dict(by_speed[(len(by_speed) - 1) // 2])
    row["tokens_per_s_runs"] = [r["tokens_per_s"] for r in runs]
    row["first_s"] = runs[0]["first_s"]
    row["peak_gib"] = max(r["peak_gib"] for r in runs)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help=f"comma list of {', '.join(ALL_ENGINES)}, each optionally with :{' or :'.join(VARIANTS)} "
        "(e.g. flame,flame:share-casts: the option's gain, side by side)",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20, help="timed steps, after the first and the warm-up")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="a tiny GLA instead of --models (CPU smoke run)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder block, in every engine")
    parser.add_argument(
        "--share-casts",
        action="store_true",
        help="one bf16 cast per block norm (flame.models.share_norm_casts), every engine",
    )
    parser.add_argument(
        "--bf16-residual",
        action="store_true",
        help="the residual stream in bf16 (flame.models.bf16_residual), every engine",
    )
    parser.add_argument(
        "--checkpointing",
        action="store_true",
        help="activation checkpointing of every decoder layer (flame.models.checkpointing), every engine",
    )
    parser.add_argument("--cuda-graphs", action="store_true", help=argparse.SUPPRESS)  # the flame:cuda-graphs worker
    parser.add_argument("--kernels", default="auto", help=argparse.SUPPRESS)  # the worker's flame.kernels mode
    parser.add_argument("--group-projections", action="store_true", help=argparse.SUPPRESS)  # :group-projections
    parser.add_argument(
        "--repeat", type=int, default=1, metavar="N",
        help="run every engine N times, the order reversed every other round; report the median run and the spread",
    )  # fmt: skip
    parser.add_argument(
        "--paired", type=int, default=0, metavar="K",
        help="run the engines' workers at once, taking turns of K updates (one engine at a time on the host and the "
        "GPU; --steps a multiple of K): where the host bounds the step, its drifts then hit every engine alike; "
        "prints each engine's turn-by-turn ratio to the others; every worker stays on the GPU, so their peaks must fit "
        "together (GLA-1.3B at batch 8: two engines on an H200, not three)",
    )  # fmt: skip
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N",
        help="after the timed steps, N more under torch.profiler (every engine but hf and the CUDA-graph ones): "
        "prints how busy the GPU was, the kernels that took the most time and the host's ops by their own time",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a model config field for every engine (JSON value), e.g. fuse_linear_cross_entropy=true",
    )  # fmt: skip
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.paired < 0:
        parser.error("--paired must be at least 1")
    unknown = [e for e in args.engines.split(",") if _spec(e)[0] not in ALL_ENGINES or _spec(e)[1] - set(VARIANTS)]
    if unknown:
        parser.error(
            f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ALL_ENGINES)}, each optionally with "
            f":{' or :'.join(VARIANTS)}"
        )
    grouped = [e for e in args.engines.split(",") if "group-projections" in _spec(e)[1]]
    if any(_spec(e)[0] not in ("bare", "bare-async", "flame") for e in grouped):
        parser.error(":group-projections is for bare, bare-async and flame (`flame train --group-projections`)")
    states = [e for e in args.engines.split(",") if {"fla-states", "keep-states"} & _spec(e)[1]]
    if any(_kernels(*_spec(e)) != "auto" or {"fla-states", "keep-states"} <= _spec(e)[1] for e in states):
        parser.error(":fla-states or :keep-states (one of them) is for flame's kernels: flame, or :flame-kernels")
    graphs = [e for e in args.engines.split(",") if "cuda-graphs" in _spec(e)[1]]
    if any(_spec(e)[0] != "flame" for e in graphs):
        parser.error(":cuda-graphs is flame's option (`flame train --cuda-graphs`); bare-graph is the bare loop's")
    if args.profile and graphs:
        parser.error("--profile counts optimizer steps, which a replayed CUDA graph does not make: drop :cuda-graphs")
    if args.paired:
        if args.repeat > 1 or args.profile:
            parser.error("--paired takes turns within one run: drop --repeat and --profile")
        if args.steps % args.paired:
            parser.error(f"--paired {args.paired}: --steps must be a multiple of it (turns of {args.paired} updates)")
        if graphs or any(_spec(e)[0] in GPU_ONLY for e in args.engines.split(",")):
            parser.error("--paired counts optimizer steps, which a replayed CUDA graph does not make: drop the graphs")
    gpu_only = [e for e in args.engines.split(",") if _spec(e)[0] in GPU_ONLY] + graphs
    if gpu_only and args.device != "cuda":
        parser.error(f"{', '.join(gpu_only)} captures CUDA graphs: it needs --device cuda")
    if args.engine:
        worker(args)
        return 0

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.setdefault("FLAME_QUIET", "1")
    env.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="flame-bench-cfg-") as tmp:
        if args.tiny:
            tiny = Path(tmp) / "tiny_gla.json"
            tiny.write_text(json.dumps(TINY))
            models = {"tiny-gla": str(tiny)}
        else:
            unknown = [m for m in args.models.split(",") if m not in MODELS]
            if unknown:
                parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
            models = {m: str(REPO / MODELS[m]) for m in args.models.split(",")}
        if args.set:
            overrides = {}
            for item in args.set:
                key, sep, value = item.partition("=")
                if not sep:
                    parser.error(f"--set {item!r}: expected KEY=VALUE")
                try:
                    overrides[key] = json.loads(value)
                except json.JSONDecodeError:
                    overrides[key] = value
            for model, config_path in list(models.items()):
                changed = Path(tmp) / f"{model}.json"
                changed.write_text(json.dumps(json.loads(Path(config_path).read_text()) | overrides))
                models[model] = str(changed)
            print(f"model config overrides: {overrides}", file=sys.stderr)
        for model, config_path in models.items():
            blocker = _blocker(config_path) if args.device == "cuda" else None
            if blocker:  # FLA would refuse the backward pass after minutes of autotuning: skip it now
                print(f"== {model}: skipped: {blocker[0]} ({blocker[1]})", file=sys.stderr, flush=True)
                rows += [{"model": model, "engine": eng, "error": blocker[0]} for eng in args.engines.split(",")]
                continue
            if args.paired:
                rows += _run_paired(model, args.engines.split(","), config_path, args, env)
                continue
            runs: dict[str, list[dict]] = {eng: [] for eng in args.engines.split(",")}
            for r in range(args.repeat):
                for eng in list(runs)[:: 1 if r % 2 == 0 else -1]:
                    runs[eng].append(_run_engine(model, eng, config_path, args, env, round_=r))
            rows += [_median(eng_runs) for eng_runs in runs.values()]

    print(f"\nbatch {args.batch} x context {args.context}, {args.steps} timed steps after 1 + {args.warmup}")
    width = max([10] + [len(r["engine"]) for r in rows])
    header = (
        f"{'model':<10} {'engine':<{width}} {'tokens/s':>10} {'MFU':>6} {'MFU 6N':>7} {'peak GiB':>9} {'first s':>8}"
    )
    print(header)
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<10} {r['engine']:<{width}} failed ({r['error']})")
            continue
        print(
            f"{r['model']:<10} {r['engine']:<{width}} {r['tokens_per_s']:>10.0f} {_pct(r['mfu']):>6} "
            f"{_pct(r['mfu_6n']):>7} {r['peak_gib']:>9.2f} {r['first_s']:>8.1f}{_spread(r)}"
        )
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["engine"]: r for r in rows if r["model"] == model and "error" not in r}
        # each flame (and each variant of any engine) against the engines run without options
        plain = [e for e in by if not _spec(e)[1]]
        for eng in by:
            for other in plain:
                if other != eng and (_spec(eng)[0] in ("flame", "bare-graph") or _spec(eng)[0] == other):
                    t = by[eng]["tokens_per_s"] / by[other]["tokens_per_s"]
                    m = by[eng]["peak_gib"] / by[other]["peak_gib"]
                    print(f"{model}: {eng}/{other} tokens/s {t:.3f}, peak memory {m:.3f}{_turn_ratios(by, eng, other)}")
    for r in rows:
        gc_row = r.get("gc")
        if gc_row and sum(gc_row["collections"]):
            counts = "/".join(str(c) for c in gc_row["collections"])
            print(
                f"{r['model']} {r['engine']}: Python's garbage collector between the first and last update: {counts} "
                f"collections (generation 0/1/2), {1e3 * sum(gc_row['seconds']):.1f} ms in all"
            )
    for r in rows:
        prof = r.get("profile")
        if prof:
            busy = "" if prof["gpu_busy"] is None else f", GPU busy {100 * prof['gpu_busy']:.0f}% of it"
            print(f"\n{r['model']} {r['engine']}: {prof['wall_ms_per_step']:.1f} ms per step{busy}; most time:")
            for name, ms, share in prof["top"]:
                print(f"  {ms:9.2f} ms {100 * share:5.1f}%  {name[:100]}")
            if prof.get("host_top"):
                print(f"  host ops: {prof['host_ms_per_step']:.1f} ms of their own time per step; most:")
                for name, ms, share in prof["host_top"]:
                    print(f"  {ms:9.2f} ms {100 * share:5.1f}%  {name[:100]}")
    if rows:
        print(f"device: {rows[0].get('device', '?')}, date: {time.strftime('%Y-%m-%d', time.gmtime())}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
