"""`flame train --cuda-graphs`: the whole update captured once in a CUDA graph and replayed every step after.

Where the host bounds the step (small batches of a small model), the GPU waits while Python launches the update's
thousands of kernels one by one; a replay launches them all at once. On an H200, GLA-340M at batch 8 x 2048: flame
trained 104.3K tokens/s eagerly and 151.0K with this, where the HF Trainer took 103.1K (benchmarks/RESULTS.md).

What a capture needs, and how the engine provides it:
- fixed shapes and no host synchronisation inside the update: every micro-batch lands in a static input buffer
  (no --varlen), the loss and gradient norm stay on the device (flame.engine.Updates), and the optimizer is the
  fused AdamW, which skips a non-finite update itself (`found_inf`) and, with `capturable=True`, keeps its step
  count on the device;
- a learning rate the graph reads from the device: a 0-d tensor in every param group, set before each replay;
- the warm-up before the capture: the first WARMUP updates (DDP_WARMUP under DDP) run eagerly on the stream that
  then captures (FLA's kernels tune and compile, the optimizer creates its state, the allocator warms up) and are
  real updates of the run;
- the gradients None at the capture, so that the graph's backward writes them afresh each replay;
- under DDP, accelerate's DDP as it is, prepared on that same stream: DDP keeps the gradient accumulators it makes
  when it is built, and the backward's must be on the capturing stream (built on the default stream, the capture
  failed on 2 H200s). Its all-reduce, started from hooks inside the backward, is captured with it and overlaps it as
  eagerly (NCCL's collectives can be captured, on every process or on none: the processes agree after the capture);
  `close` lets the graph go before the process group does. On 2 H200s, GLA-340M at batch 8 per GPU: 266.0K
  tokens/s against DDP's eager 158.3K, the same losses.
The capture records and does not run, so the updates are those of the eager loop: the same losses (on an H200 bit
for bit). `refusals` and `unsupported` say which runs cannot be captured, `wanted` which are: by default every run
that can be, falling back to the eager loop where a model's update cannot be captured.
"""

import time
from contextlib import contextmanager

import torch

from flame.errors import TrainingError, first_line

#: Eager updates before the capture.
WARMUP = 3
#: Under DDP: its logger times the first 10 synced iterations with CUDA events that it waits for on the host, which
#: a capture cannot hold (torch's docs on CUDA graphs: at least 11 eager DDP iterations before the capture).
DDP_WARMUP = 11
#: The fix for a run that asked for --cuda-graphs and cannot have them.
FIX = "drop --cuda-graphs (flame resume: --no-cuda-graphs)"


def _clashing(cfg) -> list[str]:
    """The run's options that rule out a capture (they change shapes or compile)."""
    return [f"--{name}" for name in ("varlen", "compile", "checkpointing") if getattr(cfg, name)]


def clash(cfg) -> str | None:
    """Why the run's options rule out a capture, or None."""
    names = _clashing(cfg)
    return f"--cuda-graphs cannot be combined with {' or '.join(names)}" if names else None


def refusals(cfg, setup: str) -> list[str]:
    """Why a run that asks for --cuda-graphs cannot have them, as far as its options and launcher setup
    (engine.launcher_sharding's words) tell before the Accelerator exists (`unsupported` checks the device and
    optimizer after), each with its fix; none when the run does not ask (by default such a run trains eagerly)."""
    if not cfg.cuda_graphs:
        return []
    problems = [f"{why}: drop one of them"] if (why := clash(cfg)) else []
    if setup not in SETUPS:
        problems.append(f"{_not_under(setup)}: {FIX}")
    return problems


#: The launcher setups whose update can be captured: the whole update of one process, or of each DDP process, its
#: all-reduce included (FSDP and DeepSpeed gather and shard from hooks that the capture cannot hold).
SETUPS = ("one process", "DDP")


def _not_under(setup: str) -> str:
    return f"--cuda-graphs runs on one process or under DDP, this run is {setup}"


def _off(cfg, setup: str, machines: int) -> str | None:
    """Why the run trains eagerly, as far as its options and launcher setup tell (where no GPU may be), or None.
    Across machines a captured DDP update's all-reduce crosses the network: not measured, so not a default."""
    if cfg.cuda_graphs is False:
        return "(--no-cuda-graphs)"
    if names := _clashing(cfg):
        return f"with {' and '.join(names)}"
    if setup not in SETUPS:
        return f"under {setup}"
    if cfg.cuda_graphs is None and machines > 1:
        return f"on {machines} machines (--cuda-graphs asks for them)"
    return None


def described(cfg, setup: str, machines: int = 1) -> str:
    """Whether and when the run captures its update, in a few words, for --dry-run."""
    why = _off(cfg, setup, machines)
    return f"off {why}" if why else f"on a CUDA GPU: captured at update {warmup(setup) + 1}"


def wanted(cfg, device: torch.device, setup: str, fused_optimizer, machines: int = 1) -> bool:
    """Whether the run captures its update: --cuda-graphs (where `unsupported` says no, the engine refuses the run
    first), or by default wherever it can (`_off`, `unsupported`)."""
    if cfg.cuda_graphs is None:
        return _off(cfg, setup, machines) is None and unsupported(device, fused_optimizer) is None
    return cfg.cuda_graphs


def unsupported(device: torch.device, fused_optimizer) -> str | None:
    """Why this run's device or optimizer rules out --cuda-graphs (a CUDA device, flame's fused AdamW), or None; the
    launcher setup was decided before the Accelerator existed (`refusals`, `_off`)."""
    if device.type != "cuda":
        return f"--cuda-graphs needs a CUDA GPU, this run is on {device.type}"
    if fused_optimizer is None:
        return "--cuda-graphs needs flame's fused AdamW (not DeepSpeed's optimizer or a grad scaler)"
    return None


def warmup(setup: str) -> int:
    """The eager updates before the capture under `setup` (one of SETUPS)."""
    return DDP_WARMUP if setup == "DDP" else WARMUP


@contextmanager
def on_stream(stream):
    """Run the body on CUDA `stream`, the current stream waiting for it after (as torch's docs have it for a
    capture's warm-up); with None, as it is (off CUDA)."""
    if stream is None:
        yield
        return
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        yield
    current.wait_stream(stream)


class GraphedUpdate:
    """Runs `update(inputs)` (forward, backward, clipping and the optimizer step of one update, returning the
    loss and gradient norm on the device) eagerly `warmup` times, then captures it once and replays it, all on
    CUDA `stream`, the one the engine prepared the model on (`on_stream`; DDP's capture needs that).

    `inputs` are static device buffers shaped like the first call's micro-batches; each call copies its batches
    into them. The loss and norm of a replay are copied out of the graph's own outputs, which the next replay
    overwrites.

    A capture that fails (the model reads a value back to the host during its update, say) is an error, or with
    `fallback` the end of capturing: that update and all after it run eagerly, and `failure` says why. Python state
    that the captured code changes is put back first: `keep()`, called before the capture, returns a function that
    restores it. Under several processes `agree(failed)` tells whether any of them failed: NCCL requires a
    collective to be captured on every process or on none, so one process's failure sends all of them back to the
    eager loop (or, without `fallback`, makes it an error on all of them)."""

    def __init__(
        self,
        update,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        stream: torch.cuda.Stream | None,
        warmup: int = WARMUP,
        fallback=False,
        keep=None,
        agree=None,
    ):
        self.update, self.optimizer, self.device, self.stream = update, optimizer, device, stream
        self.warmup, self.fallback, self.keep, self.agree = warmup, fallback, keep, agree
        self.failure: str | None = None
        self.inputs: list[dict] | None = None
        self.shapes: list[dict] | None = None  # the inputs', fixed at the first call
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        self.eager_left = warmup
        self.replay, self.outputs = None, None
        self.capture_s: float | None = None

    def _setup(self, batches: list[dict]) -> None:
        self.inputs = [{k: torch.empty_like(v, device=self.device) for k, v in b.items()} for b in batches]
        self.shapes = _shapes(batches)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr  # read on the device at every step, captured or not
            group["capturable"] = True  # the step count on the device (a checkpoint may say otherwise)

    def __call__(self, batches: list[dict], lr: float):
        """One update on `batches` (on the host) at learning rate `lr`: (loss, grad norm), both on the device."""
        if self.inputs is None:
            self._setup(batches)
        if _shapes(batches) != self.shapes:  # the loader's batches never change shape without --varlen
            raise ValueError(f"--cuda-graphs: batches of {_shapes(batches)}, the buffers are {self.shapes}")
        self.lr.fill_(lr)
        for static, batch in zip(self.inputs, batches):
            for k, v in batch.items():
                static[k].copy_(v.pin_memory() if self.device.type == "cuda" else v, non_blocking=True)
        if self.eager_left or self.failure:
            self.eager_left = max(self.eager_left - 1, 0)
            with on_stream(self.stream):
                return self.update(self.inputs)
        if self.replay is None:
            self.optimizer.zero_grad(set_to_none=True)
            start = time.perf_counter()
            put_back = self.keep() if self.keep else None
            why = None
            try:
                self.replay, self.outputs = self._record(lambda: self.update(self.inputs))
            except RuntimeError as e:  # CUDA's capture errors included (torch.AcceleratorError)
                if not self.fallback and self.agree is None:
                    raise _not_captured(first_line(e)) from e
                why = first_line(e)  # not the exception itself: it would hold the capture's tensors
            if self.agree is not None and self.agree(why is not None) and why is None:
                why = "on another process"
                self.replay = self.outputs = None
            if why is not None and not self.fallback:
                raise _not_captured(why)
            self.failure = why
            if self.failure:  # out of the except block, so that the exception no longer holds the capture's tensors
                self.optimizer.zero_grad(set_to_none=True)  # whatever the capture left in .grad
                if put_back:
                    put_back()
                with on_stream(self.stream):
                    return self.update(self.inputs)
            self.capture_s = time.perf_counter() - start
        self.replay()
        return tuple(None if t is None else t.clone() for t in self.outputs)

    def close(self) -> None:
        """Let the graph go. One that holds NCCL's collectives (a DDP update's) must be gone before the process
        group is destroyed: on 2 H200s, with the graph alive, accelerate's end_training waited forever."""
        self.replay = self.outputs = None

    def _record(self, body):
        """Capture `body` in a CUDA graph: (replay, body's outputs, which each replay writes)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            outputs = body()
        return graph.replay, outputs


def _not_captured(why: str) -> TrainingError:
    return TrainingError(
        f"--cuda-graphs: the update could not be captured in a CUDA graph ({why}); the model may read a value back "
        "to the host during its update",
        FIX,
    )


def _shapes(batches: list[dict]) -> list[dict]:
    return [{k: tuple(v.shape) for k, v in b.items()} for b in batches]
