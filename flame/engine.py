"""The training loop, on accelerate: one process, DDP, FSDP or DeepSpeed with the same code.

    flame train --model configs/gla_340M.json --cache data/HuggingFaceFW/fineweb-edu/sample-10BT/train
    accelerate launch --num_processes 8 -m flame train ...            # DDP
    accelerate launch --config_file configs/accelerate/fsdp.yaml -m flame train ...

From Python: `train(TrainConfig(...))` does what the command does; `plan(cfg)` is --dry-run.

The loss is weighted by tokens: every micro-batch's summed token loss is divided by the token count of the whole
update (all micro-batches of all processes), so batch=2, update=4 gives the gradient of batch=8, update=1, and
N processes with update U the gradient of one process with update N x U.
"""

import dataclasses
import functools
import gc
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import ExitStack, closing, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flame import autotune, graphs, models, ui
from flame import checkpoint as ckpt
from flame import config as run_config
from flame.config import TrainConfig
from flame.data import loader as data_loader
from flame.errors import (
    CheckpointError,
    ConfigError,
    ModelError,
    OutputExistsError,
    TrainingError,
    check_writable_dir,
    disk_full,
)
from flame.firststep import FirstStep, triton_cache_dir
from flame.logging import METRICS, WANDB_ID, RunLogger, tensorboard_installed
from flame.metrics import Throughput, eta, mfu, peak_flops, peak_memory_gib, reset_peak_memory
from flame.optim import build_optimizer, fill_state, schedule


@dataclass
class Plan:
    """Everything resolved before training: what --dry-run prints and what train() runs."""

    cfg: TrainConfig
    model_type: str
    is_fla: bool
    params: dict
    flops_per_token: float
    memory_gib: dict
    memory_at: Callable[..., dict] = field(repr=False)  # memory_gib at another batch (estimate_memory's keywords)
    dataset_tokens: int
    windows_per_epoch: int
    tokens_per_update: int  # all processes
    steps: int
    epochs: float  # passes over the (first) dataset that `steps` means
    world: int
    vocab_size: int | None
    zero_stage: int = 0  # how the launcher shards weights, gradients and AdamW over the world (launcher_sharding)
    sharding: str = ""  # the launcher's setup in words, for --dry-run
    machines: int = 1  # the machines the launcher's processes run on (launcher_machines)
    sources: list = field(default_factory=list, repr=False)
    validation: object = field(default=None, repr=False)  # the validation split's Source when --eval
    eval_windows: int = 0  # windows per evaluation, all processes together
    precision: str = "bf16"  # what --precision came to here (auto: bf16 on a GPU, fp32 on the CPU), as estimated


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    loss: float | None
    first_loss: float | None
    checkpoint: Path | None
    stopped: str  # "done", "signal"
    skipped: int


@dataclass
class Updates:
    """Each update's loss and gradient norm, and what became of it (applied, or skipped as not finite).

    On a GPU, reading a loss back makes the host wait for the GPU, which then idles while the host launches the
    next step's first kernels. So with a fused AdamW the engine leaves the values on the device: the optimizer skips
    a non-finite update itself (`found_inf`, computed on the device), and `settle()` reads every pending value back
    in one transfer at a log step, a checkpoint and the end, and accounts for each update in order. Otherwise
    (DeepSpeed's optimizer, say) the values arrive as floats each step, with the update already applied or not.
    """

    max_bad: int
    skipped: int = 0
    bad_in_a_row: int = 0
    loss: float | None = None  # the last update's
    grad_norm: float | None = None
    first_loss: float | None = None  # the first finite one of this process's run
    window: list = field(default_factory=list)  # finite losses since the last log record
    halted_at: int | None = None  # the update at which max_bad non-finite ones in a row were reached
    pending: list = field(default_factory=list)

    @staticmethod
    def applies(loss: float, grad_norm: float | None) -> bool:
        """An update is applied when its loss and gradient norm are finite (a missing norm counts as finite)."""
        return math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))

    def add(self, step: int, loss, grad_norm, applied: bool | None = None) -> None:
        """Update `step`'s loss and norm (tensors on the device, or floats); `applied` when already known."""
        self.pending.append((step, loss, grad_norm, applied))

    def settle(self, warn) -> None:
        """Read the pending values back (one wait for the device, none when all are floats) and count them."""
        if not self.pending:
            return
        tensors = [v for _, loss, norm, _ in self.pending for v in (loss, norm) if isinstance(v, torch.Tensor)]
        host = iter(torch.stack([_local(t).float().reshape(()) for t in tensors]).tolist() if tensors else [])

        def value(v):
            return next(host) if isinstance(v, torch.Tensor) else (None if v is None else float(v))

        for step, loss, norm, applied in self.pending:
            loss, norm = value(loss), value(norm)
            if applied is None:  # decided on the device by the same rule
                applied = self.applies(loss, norm)
            if applied:
                self.bad_in_a_row = 0
            else:
                self.skipped += 1
                self.bad_in_a_row += 1
                warn(f"step {step}: loss {loss}, grad norm {norm}: update skipped ({self.skipped} so far)")
                if self.bad_in_a_row >= self.max_bad and self.halted_at is None:
                    self.halted_at = step
            if math.isfinite(loss):
                self.window.append(loss)
                self.first_loss = loss if self.first_loss is None else self.first_loss
            self.loss, self.grad_norm = loss, norm
        self.pending = []


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's grad norm) as the full tensor, anything else as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; onto a GPU through pinned memory, so that the copy makes nobody wait."""
    cuda = device.type == "cuda"
    return (t.pin_memory() if cuda else t).to(device, non_blocking=cuda)


def skips_on_device(optimizer) -> torch.optim.Optimizer | None:
    """The torch optimizer to hand `found_inf` to, when it is a fused Adam/AdamW run without a grad scaler."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    if getattr(optimizer, "scaler", None) is not None or not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
        return None
    return inner if inner.defaults.get("fused") else None


def hold_run_dir(run_dir: Path, accelerator, cleanup: ExitStack) -> None:
    """One launch trains a run dir at a time: the main process takes RUN/.lock (checkpoint.RunLock) before anything
    of the run is read or written, and every process learns whether it got it. A run dir made only for the lock is
    removed again if the run stops before writing anything into it (see _tidy)."""
    check_writable_dir(run_dir, "--path")
    holder = None  # who holds the lock, when another process does
    if accelerator.is_main_process:
        lock = ckpt.RunLock(run_dir)
        made_dir, made_lock = not run_dir.exists(), not lock.path.exists()
        holder = lock.acquire()
        cleanup.callback(_tidy, run_dir, made_dir, made_lock and lock.held)
        cleanup.callback(lock.release)  # first: the stack unwinds last in, first out
        if lock.unsupported:
            ui.warn(f"{lock.unsupported}: a second launch on this run dir would not be stopped")
    taken = holder is not None
    if accelerator.num_processes > 1:
        flag = torch.tensor(float(taken), device=accelerator.device)
        taken = bool(accelerator.reduce(flag, reduction="sum") > 0)
    if taken:
        raise being_trained(run_dir, holder or "another launch")


def being_trained(run_dir, holder: str) -> OutputExistsError:
    """The error for a run dir whose lock another process holds (`holder`: "pid N on HOST")."""
    return OutputExistsError(
        f"run dir {run_dir} is being trained by {holder}",
        "wait for it to end or stop it; a run dir is trained by one launch at a time",
    )


def _tidy(run_dir: Path, made_dir: bool, made_lock: bool) -> None:
    """A run that stopped before it logged anything leaves no lock file (in a folder that is no run dir, a model dir
    given as --path, say), and a run dir this launch made is removed whole when nothing was trained into it (no log
    record, no checkpoint: wandb refused to start, say). What it held (config.json, an empty metrics.jsonl, a wandb
    id) was only the start of a run, which a rerun starts afresh."""
    metrics = run_dir / METRICS
    logged = metrics.is_file() and metrics.stat().st_size > 0
    if made_lock and not logged:
        (run_dir / ckpt.RunLock.NAME).unlink(missing_ok=True)
    if made_dir and run_dir.is_dir() and not logged and not (run_dir / ckpt.CHECKPOINTS).exists():
        shutil.rmtree(run_dir, ignore_errors=True)


def check_run_dir(cfg: TrainConfig, *, rewind: bool = False) -> None:
    """--path must be new, or a run of flame's that this one continues: never another run's checkpoints, a model dir
    or a file, which training there would overwrite or rotate away."""
    run_dir = Path(cfg.path)
    check_writable_dir(run_dir, "--path")
    if (run_dir / ckpt.CHECKPOINTS).exists() and not (run_dir / ckpt.CHECKPOINTS).is_dir():
        raise OutputExistsError(
            f"--path {run_dir} holds a file named {ckpt.CHECKPOINTS}, where the run's checkpoints go",
            "give another --path, or move that file",
        )
    if (run_dir / run_config.CONFIG_FILE).is_file():
        try:
            run_config.load(run_dir)
        except ConfigError as e:
            model = "model_type" in (run_dir / run_config.CONFIG_FILE).read_text()  # a model dir's, most often
            raise OutputExistsError(
                f"--path {run_dir} is a model dir, not a run dir"
                if model
                else f"--path {run_dir} has a {run_config.CONFIG_FILE} that flame train did not write ({e.message})",
                "give another --path (a model dir is read with --model, never trained into)",
            ) from e
    latest = ckpt.latest(run_dir)
    if latest is None:
        logged = run_dir / METRICS
        if logged.is_file() and (n := sum(1 for line in logged.read_text().splitlines() if line.strip())):
            ui.warn(
                f"--path {run_dir} holds a run that saved no checkpoint ({n} records in {METRICS}): it starts over, "
                f"and its {METRICS} is replaced"
            )
        return
    if not cfg.checkpoint:
        raise OutputExistsError(
            f"run dir {run_dir} already has checkpoints",
            f"continue it with --checkpoint {latest}, or give another --path",
        )
    if Path(cfg.checkpoint).resolve().parent != (run_dir / ckpt.CHECKPOINTS).resolve():
        raise OutputExistsError(
            f"run dir {run_dir} has checkpoints of its own, and --checkpoint {cfg.checkpoint} is not one of them",
            f"give a new --path to continue {cfg.checkpoint} there, or continue this run with --checkpoint {latest}",
        )
    if Path(cfg.checkpoint).resolve() != Path(latest).resolve() and not rewind:
        # Training on from an older checkpoint here would rotate the newer ones away, or leave them to be resumed
        # later: two histories in one run dir, one metrics.jsonl.
        raise OutputExistsError(
            f"--checkpoint {cfg.checkpoint} is not the newest checkpoint of run dir {run_dir} ({Path(latest).name})",
            f"give a new --path to branch off from {Path(cfg.checkpoint).name} there, or go back to it in this run "
            f"with `flame resume {run_dir} --checkpoint {Path(cfg.checkpoint).name}` (the newer checkpoints are "
            f"moved to {ckpt.SET_ASIDE}/)",
        )


#: FSDP1's sharding strategies (accelerate passes a name or its number) as the ZeRO stage they match in memory.
FSDP_STAGES = {"FULL_SHARD": 3, "SHARD_GRAD_OP": 2, "NO_SHARD": 0, "HYBRID_SHARD": 3, "_HYBRID_SHARD_ZERO2": 2}


def launcher_sharding(world: int) -> tuple[str, int]:
    """(the setup in words, the ZeRO stage it matches) of the processes `accelerate launch` started, read from the
    environment it gives them, so that --dry-run (which builds no Accelerator) and training estimate the same
    memory: DeepSpeed's zero_stage; FSDP's sharding strategy (FSDP2: resharding after the forward or not)."""
    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") or 2)  # accelerate's default stage
        return f"DeepSpeed ZeRO-{stage}", stage
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        if env.get("FSDP_VERSION") == "2":
            full = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true"
            return ("FSDP2, full shard" if full else "FSDP2, shard grad op"), 3 if full else 2
        strategy = env.get("FSDP_SHARDING_STRATEGY") or "FULL_SHARD"
        if strategy.isdigit():  # accelerate's numbering: 1 FULL_SHARD, 2 SHARD_GRAD_OP, ...
            strategy = list(FSDP_STAGES)[int(strategy) - 1] if 1 <= int(strategy) <= len(FSDP_STAGES) else strategy
        return f"FSDP, {strategy.lower().strip('_').replace('_', ' ')}", FSDP_STAGES.get(strategy.upper(), 3)
    return ("DDP" if world > 1 else "one process"), 0


def launcher_machines(world: int) -> int:
    """How many machines the launcher's `world` processes run on, from the processes per machine torchrun gives
    them (LOCAL_WORLD_SIZE; one machine when it is not set)."""
    return max(1, world // max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or world)))


def checkpoint_format(setup: str) -> str:
    """The checkpoint format a launcher setup (launcher_sharding's words) writes and reads with accelerate's
    save_state/load_state: one process and DDP the same plain files, FSDP and FSDP2 their own sharded folders,
    DeepSpeed its own per ZeRO stage."""
    if setup in ("one process", "DDP"):
        return "plain"
    return "FSDP2" if setup.startswith("FSDP2") else "FSDP" if setup.startswith("FSDP") else setup


def _saved_setup(checkpoint: str) -> str | None:
    """The launcher setup a checkpoint was saved under (None: not recorded, or no readable trainer state, which
    loading it reports)."""
    try:
        return ckpt.read_trainer_state(checkpoint).get("setup")
    except CheckpointError:
        return None


def plan(cfg: TrainConfig, world: int = 1) -> Plan:
    """Resolve and check the run without training: model on the meta device, data lengths, schedule length.
    The memory estimate is per device, sharded as the launcher's setup shards it (launcher_sharding)."""
    config = models.load_config(cfg.model)
    cfg = run_config.resolve(cfg, model_type=config.model_type)
    sources = data_loader.open_sources(run_config.parse_cache(cfg.cache))
    model, config = models.build_model(cfg.model, meta=True)
    is_fla = type(model).__module__.startswith("fla.")

    problems = []
    vocab = data_loader.vocab_size(sources[0])
    for s in sources:
        v = data_loader.vocab_size(s)
        if v is not None and v > config.vocab_size:
            problems.append(
                f"the tokenizer of {s.path} has {v} tokens but the model's vocab_size is {config.vocab_size}: "
                "set vocab_size in the model config to at least the tokenizer size, or prepare the data with the "
                "model's tokenizer"
            )
    # Only a learned position table limits the length; GLA and its kin have none, RoPE computes positions on the fly
    # (max_position_embeddings is then the length trained for, not a limit).
    longest = models.max_context(config)
    if longest is not None and cfg.context > longest:
        problems.append(
            f"--context {cfg.context} is longer than the model's position table ({longest} positions): "
            "lower --context, or give the model a larger table in its config (n_positions for GPT-2)"
        )
    sharding, zero_stage = launcher_sharding(world)
    machines = launcher_machines(world)
    saved = _saved_setup(cfg.checkpoint) if cfg.checkpoint else None
    if saved and checkpoint_format(saved) != checkpoint_format(sharding):
        problems.append(
            f"{cfg.checkpoint} was saved by {saved}, in a format that {sharding} cannot read: continue it with the "
            f"setup it was trained with ({saved}), or start a new run from its weights with --model "
            f"{Path(cfg.checkpoint) / 'model'} (AdamW's moments start again)"
        )
    if cfg.eval < 0 or cfg.eval_windows < 1:
        problems.append("--eval must be 0 (never) or more and --eval-windows at least 1")
    problems += graphs.refusals(cfg, sharding)
    if cfg.tensorboard and not tensorboard_installed():
        problems.append("--tensorboard needs the tensorboard package, which is not installed: pip install tensorboard")
    if cfg.varlen and not is_fla:
        problems.append(f"--varlen needs an FLA model (cu_seqlens), {config.model_type} has none: drop --varlen")
    problems += [
        f"--context {cfg.context} is longer than all of {s.path} ({s.tokens} tokens): lower --context or prepare "
        "more text"
        for s in sources
        if s.tokens < cfg.context
    ]
    if problems:
        raise ConfigError("; ".join(problems))

    validation, eval_windows = None, 0
    if cfg.eval:
        validation = data_loader.open_validation(sources[0].path)
        eval_windows = data_loader.Validation.count(
            validation, context=cfg.context, windows=cfg.eval_windows, world=world
        )

    per_epoch = data_loader.windows_per_epoch(sources, cfg.context)
    windows_per_update = cfg.batch * cfg.update * world
    steps = cfg.steps or max(1, math.ceil(cfg.epochs * per_epoch / windows_per_update))
    precision = "fp32" if _resolve_precision(cfg.precision, torch.cuda.is_available()) == "no" else "bf16"
    memory_at = functools.partial(
        models.estimate_memory,
        config,
        context=cfg.context,
        precision=precision,
        world_size=world,
        zero_stage=zero_stage,
        accumulation=cfg.update,
        activation_checkpointing=cfg.checkpointing,
        shared_casts=cfg.share_casts,
        bf16_residual=cfg.bf16_residual,
        deepspeed=sharding.startswith("DeepSpeed"),  # its bf16 weights and fp32 master copy, not autocast's
        fsdp=sharding.startswith("FSDP"),  # its gathered bf16 weights and gradients reduce-scattered into shards
        varlen=cfg.varlen,
    )
    return Plan(
        cfg=cfg,
        model_type=config.model_type,
        is_fla=is_fla,
        params=models.count_params(model),
        flops_per_token=models.flops_per_token(config, cfg.context),
        memory_gib=memory_at(cfg.batch),
        dataset_tokens=sum(s.tokens for s in sources),
        windows_per_epoch=per_epoch,
        tokens_per_update=windows_per_update * cfg.context,
        steps=steps,
        epochs=steps * windows_per_update / per_epoch,
        world=world,
        vocab_size=vocab,
        zero_stage=zero_stage,
        sharding=sharding,
        machines=machines,
        sources=sources,
        validation=validation,
        eval_windows=eval_windows,
        memory_at=memory_at,
        precision=precision,
    )


def memory_capacity_gib(device: torch.device, local_processes: int = 1) -> tuple[float, str]:
    """(GiB one process may use, that amount in words): the GPU's memory, or on the CPU the memory the machine has
    available, shared by its processes."""
    if device.type == "cuda":
        gib = torch.cuda.get_device_properties(device).total_memory / 2**30
        return gib, f"this GPU's {gib:.1f} GiB"
    import psutil  # accelerate's dependency

    gib = psutil.virtual_memory().available / 2**30 / max(1, local_processes)
    shared = f", shared by its {local_processes} processes" if local_processes > 1 else ""
    return gib, f"the {gib:.1f} GiB available on this machine{shared}"


def memory_warning(p: Plan, capacity_gib: float, where: str, *, gpu: bool) -> str | None:
    """What to say before training when the estimated peak (flame.models.estimate_memory) is more than the memory
    there is; None when it fits. On a GPU, where the estimate came within a few percent of the measured peaks on
    H200s (high rather than low), it names the largest --batch that fits by the same estimate, and the warning
    comes before the first step's minutes of compiling instead of an out-of-memory error after them. On the CPU
    flame's portable kernels hold more than the estimate (GLA-340M at batch 2 x 2048: estimated 11.0 GiB, killed
    at 24 GiB on a 24 GiB machine, 2026-11-30): the warning is then sure but late, and names no batch."""
    need = p.memory_gib["total"]
    if need <= capacity_gib:
        return None
    if not gpu:
        advice = "lower --batch or --context (flame's CPU kernels hold more than this estimate)"
    else:
        # with --update raised to keep the tokens per update, every gradient stays alive between micro-batches:
        # estimated so, the batch named fits with or without it
        def at(batch: int) -> float:
            return p.memory_at(batch, accumulation=max(2, p.cfg.update))["total"]

        lo, hi = 0, p.cfg.batch  # the estimate grows with the batch: the largest that fits, by bisection
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if at(mid) <= capacity_gib else (lo, mid)
        if lo:
            advice = (
                f"--batch {lo} fits by the estimate ({at(lo):.1f} GiB; raise --update to keep the tokens per "
                "update), or --checkpointing"
            )
        else:
            advice = "not even --batch 1 fits by the estimate: --checkpointing, a shorter --context, or shard the model"
    return (
        f"the estimated peak memory, {need:.1f} GiB per process, is more than {where}: this run will likely run "
        f"out of memory; {advice} (`flame train ... --dry-run` shows the estimate)"
    )


def _resolve_precision(precision: str, cuda: bool) -> str:
    """accelerate's mixed_precision: bf16 autocast over fp32 master weights on GPU by default (FLA's kernels want
    half-precision inputs and plain fp32 breaks them, fla-org/flame#29); fp32 on CPU, where bf16 is slow."""
    if precision == "auto":
        return "bf16" if cuda else "no"
    return {"bf16": "bf16", "fp32": "no"}[precision]


class StopFlag:
    """SIGTERM / Ctrl-C ask the loop to stop after the current update; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    @contextmanager
    def installed(self):
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


class StopVote:
    """Processes agree to stop at the same update (a signal may reach one of them only) without the host waiting for
    the GPU every update: update k's requests are summed over the processes by an all-reduce queued behind update
    k's work, and the sum is read after update k+1 has been queued, by when it is long done. So several processes
    stop one update after the request; reading the sum at once would idle the GPU, as reading a loss does."""

    def __init__(self, device: torch.device, reduce):
        self.device, self.reduce, self.cast = device, reduce, None

    def __call__(self, requested: bool) -> bool:
        """Cast this update's vote; returns whether the previous update's votes agreed to stop."""
        agreed = False
        if self.cast is not None:
            total, done = self.cast
            if done is not None:
                done.synchronize()  # waits for the previous update's work, not this one's
            agreed = bool(total.item())
        total = self.reduce(to_device(torch.tensor([int(requested)], dtype=torch.int32), self.device), reduction="sum")
        done = None
        if self.device.type == "cuda":
            total = total.to("cpu", non_blocking=True)  # into pinned memory, queued behind the all-reduce
            done = torch.cuda.Event()
            done.record()
        self.cast = (total, done)
        return agreed


def _fingerprint(sources) -> list[dict]:
    """What identifies the training data of a run: documents and tokens of each source, with its weight."""
    return [{"documents": len(s.lengths), "tokens": s.tokens, "weight": s.weight} for s in sources]


def _other_tokenizer(model: str, data_tokenizer: Path | None) -> bool:
    """True when a model dir and the dataset's tokenizer dir both hold a tokenizer.json and their vocabularies differ
    (continual pretraining on data tokenized for another model trains on ids that mean other tokens)."""
    if data_tokenizer is None:
        return False
    files = [Path(model) / "tokenizer.json", data_tokenizer / "tokenizer.json"]
    if not all(f.is_file() for f in files):
        return False
    try:
        vocabs = [_id_meanings(json.loads(f.read_text())) for f in files]
    except (ValueError, OSError, AttributeError, TypeError, IndexError):
        return False
    return vocabs[0] != vocabs[1]


def _id_meanings(tokenizer_json: dict):
    """What each id stands for (the vocabulary and the added tokens), not how the file spells the rest: saving a
    tokenizer again may rewrite its merges or options, never its ids."""
    vocab = (tokenizer_json.get("model") or {}).get("vocab")
    if isinstance(vocab, list):  # Unigram: [piece, score] pairs, the id is the position
        vocab = [entry[0] for entry in vocab]
    added = {t["id"]: t["content"] for t in tokenizer_json.get("added_tokens") or []}
    return vocab, added


def _describe(fingerprint: list[dict]) -> str:
    return ", ".join(f"{s['documents']:,} documents of {s['tokens']:,} tokens" for s in fingerprint)


def forward_loss(model, batch: dict, num_items: torch.Tensor) -> torch.Tensor:
    """Summed token loss of one micro-batch divided by num_items (the update's token count, all processes).

    Both FLA and transformers models take num_items_in_batch and then reduce with sum / num_items_in_batch.
    """
    return _forward(model, batch, num_items).loss.float()


def _forward(model, batch: dict, num_items: torch.Tensor):
    """The model's outputs for one micro-batch, labelled with its own tokens (the loss without a logits copy)."""
    extra = {"cu_seqlens": batch["cu_seqlens"]} if "cu_seqlens" in batch else {}
    return model(
        input_ids=batch["input_ids"],
        labels=batch["input_ids"],
        num_items_in_batch=num_items,
        use_cache=False,
        **extra,
    )


#: torch._dynamo settings while a --compile run traces. FLA's attention layers read their integer `layer_idx`
#: (fla/layers/utils.py, for the cache), and torch 2.11's dynamo specialises on it: one recompilation per layer up
#: to its recompile_limit of 8, then the later layers' attention runs eagerly. As a dynamic int it compiles twice
#: in all (checked on the CPU with torch 2.11: 8 recompilations and the limit hit for a 10-layer GLA without, 1
#: with; torch 2.13 does not specialise on it).
COMPILE_DYNAMO = {"allow_unspec_int_on_nn_module": True}


@contextmanager
def _triton_cache_pinned():
    """TRITON_CACHE_DIR set to Triton's cache for a --compile run, unless the user set it. When inductor loads its
    first Triton kernel it points an unset TRITON_CACHE_DIR at its own folder (/tmp/torchinductor_USER/triton/N,
    torch/_inductor/runtime/triton_heuristics.py), for the whole process: FLA's autotune results in Triton's cache
    then vanish from view mid-run, every kernel is tuned again and the results land in /tmp (on an H200 a GLA-340M
    --compile run re-tuned kernels the eager runs had cached, and left none in ~/.triton/cache)."""
    if os.environ.get("TRITON_CACHE_DIR"):
        yield
        return
    os.environ["TRITON_CACHE_DIR"] = str(triton_cache_dir())
    try:
        yield
    finally:
        os.environ.pop("TRITON_CACHE_DIR", None)


@contextmanager
def compile_settings():
    """What a --compile run traces and runs under: COMPILE_DYNAMO and Triton's cache pinned (_triton_cache_pinned),
    both restored after."""
    with torch._dynamo.config.patch(**COMPILE_DYNAMO), _triton_cache_pinned():
        yield


#: Where `accelerate launch` passes the config file's gradient_accumulation_steps to the processes.
LAUNCHER_ACCUMULATION = "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"


def accumulation_from_launcher(update: int) -> str | None:
    """Make `accelerate launch`'s gradient accumulation --update; returns what the launcher had set (None: nothing).

    The launcher hands a config's gradient_accumulation_steps (DeepSpeed configs have one: a number, or "auto" as in
    configs/accelerate/deepspeed_*.yaml) to the Accelerator through the environment, where it overrides the value
    flame passes, and "auto" is not a number the Accelerator can read. --update is the accumulation: the engine's
    loss weighting and data position count on it, so it replaces whatever the launcher said."""
    value = os.environ.get(LAUNCHER_ACCUMULATION)
    if value is not None:
        os.environ[LAUNCHER_ACCUMULATION] = str(update)
    return value


def fill_deepspeed_config(plugin, batch: int, norm: float) -> str | None:
    """What flame's options say in DeepSpeed's config, where the config leaves it to accelerate ("auto"):

    - train_micro_batch_size_per_gpu is --batch. accelerate fills it from the DataLoader passed to prepare(), and
      flame's loader packs its own windows and passes none, so accelerate would refuse the run; a config that sets
      another value is refused here.
    - gradient_clipping is --norm (0: none, for both). DeepSpeed clips inside its step, so flame's own clipping
      does not run; a config's number wins over --norm, and the returned warning says so when they differ.
    """
    key = "train_micro_batch_size_per_gpu"
    value = plugin.get_value(key)
    if value in (None, "auto"):
        plugin.deepspeed_config[key] = batch
    elif value != batch:
        raise ConfigError(
            f"the DeepSpeed config's {key} is {value} but --batch is {batch}", f"set {key} to auto (or to {batch})"
        )
    clipping = plugin.get_value("gradient_clipping")
    if clipping in (None, "auto"):
        plugin.deepspeed_config["gradient_clipping"] = norm
    elif float(clipping) != norm:
        return (
            f"DeepSpeed clips gradients at its config's gradient_clipping {clipping}, not at --norm {norm:g}: set "
            "gradient_clipping in the accelerate config (auto: --norm)"
        )
    return None


def compile_blocks(model) -> None:
    """Compile the decoder blocks block by block and in place (nn.Module.compile), as torchtitan does: one compiled
    graph serves every layer of the same shape, and state_dict names stay as they are, so checkpoints load with or
    without --compile. The blocks are the layers that hold a token mixer (models.blocks)."""
    found = models.blocks(model)
    if not found:
        raise ConfigError(
            f"--compile: no decoder layers (modules with an attn, self_attn or mixer) found in {type(model).__name__}",
            "drop --compile for this model",
        )
    for block in found:
        block.compile()


def train(cfg: TrainConfig, *, force: bool = False, rewind: bool = False) -> TrainResult:
    """Train as `cfg` says; returns where it stopped. Every process runs this (under `accelerate launch`).

    force: continue from a checkpoint (cfg.checkpoint) that was trained on other data than cfg.cache.
    rewind: cfg.checkpoint is an older checkpoint of the run in cfg.path: the newer ones are moved to
    RUN/set-aside/ before training goes on from it (`flame resume RUN --checkpoint step-N`).
    """
    try:
        with compile_settings() if cfg.compile else nullcontext(), ExitStack() as cleanup:
            return _train(cfg, force=force, rewind=rewind, cleanup=cleanup)
    except torch.OutOfMemoryError as error:
        raise out_of_memory(error) from error  # one line at the CLI; FLAME_DEBUG=1 shows torch's paragraph
    finally:
        # Under bf16 accelerate keeps the model's (un)wrapped forward as a bound method on the model itself, a
        # reference cycle, so the weights outlive the run until Python's collector happens to run (on an H200 a
        # 2-layer GLA-340M's next run in the same process started with 0.41 GiB of them allocated): a notebook, a
        # sweep or the tests would pay for it. Collect now and hand the cached blocks back.
        gc.unfreeze()
        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def freeze_survivors() -> None:
    """After the first step: collect once, then move every object still alive (the model, accelerate's wrappers,
    dynamo's and inductor's compiled code, FLA's kernels) out of the reach of Python's cycle collector, so that a
    full collection later scans only what the steps themselves create. Under --compile one full collection of all
    of them took 0.47 s in the middle of GLA-340M's steps on an H200 (batch 64, 3% of a 6-step window). train()
    unfreezes them when the run ends (gc.unfreeze), so a notebook or a sweep gets its collector back whole."""
    gc.collect()
    gc.freeze()


def out_of_memory(error: BaseException) -> TrainingError:
    """torch's out-of-memory error (a paragraph) as one line with what to change. The run dir keeps its checkpoints;
    a run with none yet starts again in the same --path."""
    sentences = [t.strip().rstrip(".") for t in " ".join(str(error).split()).split(". ")]
    facts = [t for t in sentences if t.startswith(("Tried to allocate", "GPU "))]
    where = "; ".join(facts) or sentences[0]
    return TrainingError(
        f"out of memory ({where})",
        "lower --batch (raise --update to keep the tokens per update) or --context, or add --checkpointing or "
        "--bf16-residual; `flame train ... --dry-run` estimates the peak (the run's checkpoints are kept)",
    )


def _train(cfg: TrainConfig, *, force: bool, rewind: bool = False, cleanup: ExitStack) -> TrainResult:
    cuda = torch.cuda.is_available()
    models.name_cpu_accelerator()
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    update = max(1, cfg.update)
    launcher_update = accumulation_from_launcher(update)
    accelerator = Accelerator(
        mixed_precision=_resolve_precision(cfg.precision, cuda), cpu=not cuda, gradient_accumulation_steps=update
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    if launcher_update not in (None, "auto", str(update)):
        ui.warn(
            f"the accelerate config's gradient_accumulation_steps {launcher_update} is not used: flame accumulates "
            f"--update {update} micro-batches per update (set it to auto to silence this)"
        )
    p = plan(cfg, world=world)
    cfg = p.cfg
    run_dir = Path(cfg.path)
    hold_run_dir(run_dir, accelerator, cleanup)
    check_run_dir(cfg, rewind=rewind)
    capacity = memory_capacity_gib(accelerator.device, world // max(1, p.machines))
    if warning := memory_warning(p, *capacity, gpu=accelerator.device.type == "cuda"):
        ui.warn(warning)

    # Model: a new one from --seed (the same on every process), or a model dir's weights as saved.
    model, config = models.build_model(cfg.model, seed=cfg.seed, dtype=torch.float32)
    if accelerator.device.type == "cuda":
        # Before minutes of autotuning, not after: FLA refuses some backward passes on Hopper with some Tritons.
        from flame.kernels.compat import hopper_triton_blocker, triton_shape_blocker

        blocker = hopper_triton_blocker(config.model_type) or triton_shape_blocker(config)
        if blocker:
            raise ModelError(*blocker)
    if cfg.checkpointing and not models.checkpointing(model):
        raise ConfigError(
            f"--checkpointing: model type {config.model_type} does not support activation checkpointing",
            "drop --checkpointing, or lower --batch / --context to fit memory",
        )
    if cfg.share_casts:  # on by default: a model with no such norm (RWKV, Mamba2) keeps autocast's casts, silently
        models.share_norm_casts(model)
    if cfg.bf16_residual and accelerator.mixed_precision != "bf16":
        ui.warn(
            "--bf16-residual: this run trains in fp32 (no bf16 autocast), so the residual stream stays fp32; "
            "it applies with --precision bf16 (the default on a GPU)"
        )
    elif cfg.bf16_residual and not models.bf16_residual(model):
        ui.warn(
            f"--bf16-residual: this {config.model_type} config keeps its residual stream in fp32 "
            "(residual_in_fp32: true), so it stays fp32; set residual_in_fp32 to false in the model config for bf16"
        )
    if cfg.compile:
        compile_blocks(model)
    # Grouped projections (on by default): found by a forward of the first batch, before update 1 of every run.
    ungroupable = "--compile" if cfg.compile else "DeepSpeed ZeRO-3" if p.zero_stage == 3 else None
    if cfg.group_projections and ungroupable:
        ui.warn(
            f"--group-projections: not with {ungroupable} (dynamo would trace the grouping's Python state; ZeRO-3 "
            "gathers each projection's weight on its own call), so the projections run one by one"
        )
    blocks = None if ungroupable or cfg.group_projections is False else models.blocks(model)
    set_seed(cfg.seed + rank)  # per-process RNG (dropout); data order does not use it
    optimizer = build_optimizer(model, cfg, accelerator.device.type, own_step=p.sharding in graphs.SETUPS)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if note := fill_deepspeed_config(accelerator.state.deepspeed_plugin, cfg.batch, cfg.norm):
            ui.warn(note)
    fused = skips_on_device(optimizer) if accelerator.scaler is None else None  # as prepare() will hand it back
    if cfg.cuda_graphs and (why := graphs.unsupported(accelerator.device, fused)):
        raise ConfigError(why, graphs.FIX)  # before anything is written to the run dir
    capturing = graphs.wanted(cfg, accelerator.device, p.sharding, fused, p.machines)  # by default, --cuda-graphs
    # A capture's stream, on which the model is prepared (DDP keeps gradient accumulators made when it is built, and
    # the captured backward's must be on the capturing stream), warmed up and captured.
    stream = torch.cuda.Stream(accelerator.device) if capturing and accelerator.device.type == "cuda" else None
    with graphs.on_stream(stream):
        model, optimizer = accelerator.prepare(model, optimizer)
    # accelerate's bf16 wraps the model's forward in autocast AND casts every output to float32: for a 32K vocabulary
    # at 8 x 2048 that is a 2 GiB float32 copy of the logits at the peak of the forward, which only the loss is
    # read from. Keep autocast (entered around each forward below), drop the copy: unwrap_model strips both wrappers.
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    lr_of = schedule(cfg, p.steps)
    loader = data_loader.PackedLoader(
        p.sources, context=cfg.context, batch=cfg.batch, seed=cfg.seed, rank=rank, world=world, varlen=cfg.varlen
    )

    validation = None
    if p.validation is not None:
        validation = data_loader.Validation(
            p.validation, context=cfg.context, windows=cfg.eval_windows, seed=cfg.seed, rank=rank, world=world
        )

    def to_accelerator(batch: dict) -> dict:
        return {k: to_device(v, accelerator.device) for k, v in batch.items()}

    def evaluate() -> float:
        """Mean token loss over the validation windows, all processes together (the training loss's measure)."""
        model.eval()
        total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
        one = torch.ones((), device=accelerator.device, dtype=torch.long)  # forward_loss then returns the sum
        with torch.no_grad():
            for b in validation.batches(cfg.batch, cfg.varlen):
                b = to_accelerator(b)
                with accelerator.autocast():
                    total[0] += forward_loss(model, b, one).double()
                total[1] += b["input_ids"].numel() - b["input_ids"].shape[0]
        model.train()
        total = accelerator.reduce(total, reduction="sum")
        return float(total[0] / total[1])

    step, tokens, skipped, bad_in_a_row, elapsed_before = 0, 0, 0, 0, 0.0
    if cfg.checkpoint:
        if accelerator.distributed_type == DistributedType.FSDP:
            fill_state(optimizer)  # or FSDP's load reads no optimizer state
        state = ckpt.load(accelerator, cfg.checkpoint)
        if state["batch"] * state["update"] * state["world"] != cfg.batch * update * world:
            # The data position counts global windows, so nothing is repeated or skipped; only the batch size changes.
            ui.warn(
                f"{cfg.checkpoint} was trained with {state['batch']} x {state['update']} x {state['world']} windows "
                f"per update, this run uses {cfg.batch} x {update} x {world}"
            )
        trained_context = (state.get("config") or {}).get("context", cfg.context)
        if trained_context != cfg.context:
            # window i is a pure function of (seed, i, context): another context is another shuffle of the data
            ui.warn(
                f"{cfg.checkpoint} was trained with --context {trained_context}, this run uses {cfg.context}: the "
                "data position counts windows, so the rest of this epoch is a new shuffle (documents may repeat or "
                "be skipped until the next epoch)"
            )
        if not force and state.get("sources") and state["sources"] != _fingerprint(p.sources):
            raise CheckpointError(
                f"{cfg.checkpoint} was trained on other data ({_describe(state['sources'])}; --cache has "
                f"{_describe(_fingerprint(p.sources))})",
                "give the --cache that run used (its data position means nothing on another dataset), "
                "or pass --force to continue on the new data from its start position",
            )
        step, tokens, skipped, bad_in_a_row = state["step"], state["tokens"], state["skipped"], state["bad_in_a_row"]
        elapsed_before = state.get("elapsed", 0.0)
        loader.load_state_dict(state["data"])
        saved_steps = state.get("total_steps") or (state.get("config") or {}).get("steps")  # older: --steps only
        if note := stretched_schedule(cfg, saved_steps, p.steps, step):
            ui.warn(note)

    if rewind and step >= p.steps:  # going back to a checkpoint only to stop there would set nothing aside
        raise ConfigError(
            f"--checkpoint {Path(cfg.checkpoint).name} is at step {step}, and --steps is {p.steps}: nothing to train",
            "raise --steps to go on from it",
        )
    if step >= p.steps:  # nothing to train: leave the run dir (config, metrics) as it is
        accelerator.end_training()
        return TrainResult(run_dir, step, tokens, None, None, None, "done", skipped)
    tokenizer_dir = data_loader.tokenizer_dir(p.sources[0])
    if _other_tokenizer(cfg.model, tokenizer_dir):
        ui.warn(
            f"{p.sources[0].path} was tokenized with another tokenizer than the model dir {cfg.model} holds: the "
            f"model reads its token ids as other tokens; prepare the data with --tokenizer {cfg.model} (unless a new "
            "vocabulary is what you want)"
        )
    if cfg.warmup >= p.steps:
        ui.warn(
            f"--warmup {cfg.warmup} is not below the run's {p.steps} steps: the learning rate never reaches --lr "
            f"{cfg.lr:g}; lower --warmup"
        )
    if accelerator.is_main_process:
        run_config.save(cfg, run_dir)
        if rewind and (moved := ckpt.set_aside_after(run_dir, step)):
            # The branch left keeps its records too (metrics.jsonl is cut at `step` below), and wandb, which drops a
            # step at or below its run's highest, goes on in a new wandb run.
            kept = moved[0].parent / f"metrics-until-{moved[-1].name}.jsonl"
            if (run_dir / METRICS).is_file():
                shutil.copyfile(run_dir / METRICS, kept)
            wandb = " and the wandb run goes on as a new one" if (run_dir / WANDB_ID).exists() else ""
            (run_dir / WANDB_ID).unlink(missing_ok=True)
            ui.warn(
                f"went back to step {step}: moved {', '.join(p.name for p in moved)} to {moved[0].parent}, with "
                f"the records logged until then ({kept.name}){wandb}"
            )
    extra_files = sorted(f for f in tokenizer_dir.iterdir() if f.is_file()) if tokenizer_dir else []
    log = RunLogger(cfg, run_dir, total_steps=p.steps, start_step=step, enabled=accelerator.is_main_process)
    device_name = torch.cuda.get_device_name(accelerator.device) if cuda else None
    peak = peak_flops(device_name, "bf16" if accelerator.mixed_precision == "bf16" else "fp32")
    meter = Throughput(n_devices=world)
    reset_peak_memory(accelerator.device if cuda else None)

    def settle() -> None:
        """Account for the pending updates (see Updates) and, the GPU's work being done now, clock them."""
        nonlocal metered
        updates.settle(log.warn)
        if step > metered:
            meter.update((step - metered) * p.tokens_per_update, steps=step - metered)
            metered = step

    def save() -> Path:
        settle()
        trainer_state = {
            "step": step,
            "tokens": tokens,
            "skipped": updates.skipped,
            "bad_in_a_row": updates.bad_in_a_row,
            "data": loader.state_dict(),
            "sources": _fingerprint(p.sources),
            "batch": cfg.batch,
            "update": update,
            "world": world,
            "setup": p.sharding,  # which launcher setups can read this checkpoint (checkpoint_format)
            "precision": p.precision,  # what --precision auto came to (the accelerator's, from the same rule)
            "elapsed": elapsed_before + time.time() - started,
            "wandb_id": log.wandb_id,
            "config": cfg.to_dict(),
            "total_steps": p.steps,  # the schedule's length, --steps or what --epochs came to
        }
        try:
            path = ckpt.save(accelerator, model, run_dir, step, trainer_state, extra_files)
        except Exception as e:  # safetensors' write fails as its own error kind, with the OS's words
            if full := disk_full(e, run_dir):
                raise TrainingError(
                    f"{full.message}, saving checkpoint step {step} (the checkpoints before it are whole)",
                    f"{full.fix}; then `flame resume {run_dir}`",
                ) from e
            raise
        if tuning is not None:  # kernels first tuned after step 1 (an evaluation's shapes, say)
            autotune.save(tuning.paths, run_dir)
        if accelerator.is_main_process:
            ckpt.rotate(run_dir, cfg.limit)
        meter.reset_clock()  # the save does not count as training time
        return path

    started, last_saved = time.time(), None
    updates = Updates(max_bad=cfg.max_bad_steps, skipped=skipped, bad_in_a_row=bad_in_a_row)
    on_device = skips_on_device(optimizer)
    metered = step  # the step the meter last heard of
    num_items, items_local = None, None
    several = accelerator.distributed_type != DistributedType.NO
    vote = StopVote(accelerator.device, accelerator.reduce) if several else None  # one process alone: its own flag
    stopped = "done"
    max_norm = cfg.norm if cfg.norm > 0 else float("inf")
    clips_in_step = hasattr(on_device, "clip_")  # flame's AdamW: one process or DDP (build_optimizer)

    def forward_backward(batches: list[dict]):
        """Forward and backward of the update's micro-batches (on the device), then clipping: (loss, grad norm)."""
        loss_sum = torch.zeros((), device=accelerator.device)
        for b in batches:
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = forward_loss(model, b, num_items)
                # accelerate divides by `update` and DDP averages over processes; undo both so the gradient is
                # that of the summed token loss over num_items.
                accelerator.backward(loss * update * world)
            loss_sum += loss.detach().float()
        loss_total = accelerator.reduce(loss_sum, reduction="sum")
        if clips_in_step:  # the same norm and coefficient as accelerate's clip here (torch's); the step applies it
            return loss_total, on_device.clip_(model.parameters(), max_norm)
        return loss_total, accelerator.clip_grad_norm_(model.parameters(), max_norm)

    def step_on_device(loss_total, norm) -> None:
        """The optimizer step, skipped by the fused kernel itself when the loss or norm is not finite."""
        finite = torch.isfinite(loss_total)
        if isinstance(norm, torch.Tensor):
            finite = finite & torch.isfinite(_local(norm))
        on_device.found_inf = (~finite).float()  # the fused kernel leaves everything as it is when 1
        optimizer.step()

    def whole_update(batches: list[dict]):
        loss_total, norm = forward_backward(batches)
        step_on_device(loss_total, norm)
        return loss_total, norm

    def any_process(failed: bool) -> bool:
        """Whether any process's capture failed (every process asks, once, after its own)."""
        flag = torch.tensor(float(failed), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum") > 0)

    def keep_micro_batch_count():
        """accelerate's micro-batch count, which decides when the gradients sync and the optimizer steps: a capture
        that fails has advanced it (the eager update after it must start where the capture did)."""
        count = accelerator.step

        def put_back():
            accelerator.step = count

        return put_back

    def group_projections(blocks: list, batch: dict) -> str:
        """Watch a forward of `batch` without gradients (nor a draw from the RNGs) for the linears of a block that
        read one tensor, and group them (flame.projections); a line saying what was grouped."""
        from flame import projections

        def forward():
            devices = [torch.cuda.current_device()] if accelerator.device.type == "cuda" else []
            with torch.no_grad(), torch.random.fork_rng(devices=devices), accelerator.autocast():
                _forward(model, batch, torch.ones((), device=accelerator.device))  # not a training forward

        sizes = projections.install(projections.find_groups(blocks, forward))
        found = f"{len(sizes)} groups of {'/'.join(map(str, sorted(set(sizes))))}" if sizes else "none"
        return f"--group-projections: projections that read one input, grouped: {found}"

    graphed = None
    if capturing:
        fallback = cfg.cuda_graphs is None  # not asked for: a model that cannot be captured trains eagerly
        graphed = graphs.GraphedUpdate(
            whole_update,
            on_device,
            accelerator.device,
            stream,
            graphs.warmup(p.sharding),
            fallback,
            keep_micro_batch_count,
            any_process if several else None,
        )
    model.train()
    # The first step compiles and autotunes FLA's kernels on a GPU: announced, timed and kept out of tokens/s
    # (Throughput counts a step from the end of the previous one, so step 1 never enters its window).
    first = FirstStep(accelerator.device.type, enabled=accelerator.is_main_process)
    # FLA's autotuning results travel with the run (flame.autotune): a resume on a fresh machine skips the
    # benchmarking of every kernel an earlier machine of the same kind tuned.
    tuning = autotune.Recorder() if cuda and accelerator.is_main_process else None
    if cuda:
        # the run's own, those of the run a --checkpoint comes from, and flame's own for this GPU's shapes; once per
        # machine, then everyone goes on
        lines = []
        if accelerator.is_local_main_process:
            lines = [
                autotune.restore_run(run_dir, cfg.checkpoint),
                autotune.restore_shipped(torch.cuda.get_device_name(accelerator.device)),
            ]
        accelerator.wait_for_everyone()
        for line in filter(None, lines):
            ui.print0(line)
    first_step_s, start_step = None, step
    graph_note = None  # the capture (or its failure), for the next log record
    with (
        StopFlag().installed() as stop,
        log,
        first,
        tuning or nullcontext(),
        closing(graphed) if graphed is not None else nullcontext(),
    ):
        while step < p.steps:
            if step == start_step:
                first.begin()
            lr = lr_of(step)
            batches = [loader.next_batch() for _ in range(update)]
            if blocks is not None:  # before update 1 (of a resumed run too): every update runs grouped
                found = group_projections(blocks, to_accelerator(batches[0]))
                if cfg.group_projections:  # asked for: say what it did (by default it works silently)
                    ui.print0(found)
                blocks = None
            # Labels are the inputs shifted by one inside the model: each row predicts all but its first token.
            local = sum(b["input_ids"].numel() - b["input_ids"].shape[0] for b in batches)
            if local != items_local:  # the shapes, so the count, are the same every step and on every process
                num_items = accelerator.reduce(torch.tensor(local, device=accelerator.device), reduction="sum")
                items_local = local
            if graphed is not None:
                loss_total, norm = graphed(batches, lr)
                if step == start_step + graphed.warmup and graphed.failure:  # this call tried to capture the update
                    ui.warn(
                        f"CUDA graph: update {step + 1} could not be captured ({graphed.failure}); training on "
                        "eagerly (--no-cuda-graphs skips the attempt)"
                    )
                    graph_note = {"update": step + 1, "failure": graphed.failure}
                elif step == start_step + graphed.warmup:
                    ui.print0(f"CUDA graph: update {step + 1} captured in {graphed.capture_s:.1f} s, replayed since")
                    graph_note = {"update": step + 1, "capture_s": round(graphed.capture_s, 3)}
                updates.add(step + 1, loss_total, norm)
            else:
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batches = [to_accelerator(b) for b in batches]
                if on_device is not None:  # nothing here waits for the GPU (Updates)
                    loss_total, norm = whole_update(batches)
                    updates.add(step + 1, loss_total, norm)
                else:
                    loss_total, norm = forward_backward(batches)
                    grad_norm, loss_value = (float(norm) if norm is not None else None), float(loss_total)
                    applied = Updates.applies(loss_value, grad_norm)
                    if applied:
                        optimizer.step()
                    updates.add(step + 1, loss_value, grad_norm, applied)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += p.tokens_per_update
            evaluating = validation is not None and (step % cfg.eval == 0 or step == p.steps)
            logging = step % cfg.logging == 0 or step == p.steps or step == 1 or evaluating
            if on_device is None or logging or step == start_step + 1:
                settle()
            if step == start_step + 1:
                first_step_s = first.end()
                if tuning is not None:
                    autotune.save(tuning.paths, run_dir)
                freeze_survivors()
                meter.reset_clock()

            if logging:
                tps = meter.tokens_per_s
                val = {"val_loss": evaluate()} if evaluating else {}
                once = {"first_step_s": first_step_s} if first_step_s is not None else {}  # fields of one record
                if once and first.tuning is not None and first.tuning.tuned:
                    once["first_step_tuning"] = first.tuning.record()
                first_step_s = None  # in the first record after it only
                if graph_note:
                    once["cuda_graph"], graph_note = graph_note, None
                log.record(
                    {
                        "step": step,
                        "loss": sum(updates.window) / len(updates.window) if updates.window else None,
                        "lr": lr,
                        "grad_norm": updates.grad_norm,
                        "tokens": tokens,
                        "tokens_per_s": tps,
                        "tokens_per_s_per_device": tps / world,
                        "mfu": mfu(tps, p.flops_per_token, world, peak),
                        "memory_gib": peak_memory_gib(accelerator.device if cuda else None),
                        "time": elapsed_before + time.time() - started,
                        "eta_s": eta(step, p.steps, meter.seconds_per_step),
                        "epoch": loader.epoch(),
                        "skipped": updates.skipped,
                        **once,
                        **val,
                    }
                )
                if val:
                    meter.reset_clock()  # the evaluation does not count as training time
                updates.window = []

            if updates.halted_at is not None:
                path = save()
                raise TrainingError(
                    f"{cfg.max_bad_steps} updates in a row had a NaN/inf loss or gradient (the last at step "
                    f"{updates.halted_at}); stopped at step {step} and saved {path}",
                    "lower --lr, raise --warmup or --norm clipping, and continue with --checkpoint",
                )

            # A signal may reach one process only; every process must agree to stop at the same update.
            wants_stop = vote(stop.requested) if vote is not None else stop.requested
            if step % cfg.save == 0 or step == p.steps or wants_stop:
                last_saved = save()
            if wants_stop and step < p.steps:
                stopped = "signal"
                log.warn(f"stop requested: saved {last_saved} at step {step}")
                break

    accelerator.end_training()
    return TrainResult(
        run_dir=run_dir,
        step=step,
        tokens=tokens,
        loss=updates.loss,
        first_loss=updates.first_loss,
        checkpoint=last_saved,
        stopped=stopped,
        skipped=updates.skipped,
    )


#: Options `flame resume` may change: they say how long to train, how to report and keep checkpoints and whether the
#: update is replayed from a CUDA graph (the same updates either way), never what is trained (model, data, context,
#: batch, optimizer and seed stay as the run was started, so the continuation is exact).
RESUME_OVERRIDES = (
    "steps", "logging", "save", "limit", "project", "tensorboard", "max_bad_steps", "eval", "eval_windows",
    "cuda_graphs", "cache",
)  # fmt: skip
# --cache may change only as a new place for the same data: the checkpoint's data fingerprint (documents, tokens,
# weight of each source) is checked against it, and other data needs --force.


def stretched_schedule(cfg: TrainConfig, saved_steps: int | None, steps: int, step: int) -> str | None:
    """The warning for a resumed run whose step count changed: the schedule (a function of the step and the total)
    moves, so the learning rate jumps at the step it continues from. None when it stays within 1%."""
    from flame.optim import schedule

    if not saved_steps or saved_steps == steps or step >= steps:
        return None
    before, after = schedule(cfg, saved_steps)(step), schedule(cfg, steps)(step)  # update step + 1, either way
    if abs(after - before) <= 0.01 * max(abs(before), 1e-12):
        return None
    return (
        f"the {cfg.scheduler} schedule now spans {steps} updates instead of {saved_steps}: update {step + 1} runs at "
        f"learning rate {after:.3g} where it would have run at {before:.3g}"
    )


def resume(
    run_dir: str | os.PathLike,
    overrides: dict | None = None,
    *,
    force: bool = False,
    checkpoint: str | os.PathLike | None = None,
) -> TrainResult:
    """Continue a run from its newest complete checkpoint with the configuration it saved (RUN/config.json).

        flame resume exp/gla-340M-10B --steps 40960

    An interrupted save leaves only a `.step-N.tmp` folder, which is never picked: the run continues from the
    checkpoint before it, and the records logged after that checkpoint are dropped from metrics.jsonl.

    checkpoint: go back to this earlier checkpoint of the run (a step-N folder or its name), e.g. when the newest
    is damaged or diverged; the newer checkpoints are moved to RUN/set-aside/, never deleted.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unsafe = sorted(set(overrides) - set(RESUME_OVERRIDES))
    if unsafe:
        raise ConfigError(
            f"flame resume cannot change {', '.join(unsafe)}",
            f"only {', '.join(RESUME_OVERRIDES)} may change; start a new run with `flame train --checkpoint` instead",
        )
    run = Path(run_dir)
    if not (run / run_config.CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{run} is not a flame run (no {run_config.CONFIG_FILE})", "give the --path of a `flame train` run"
        )
    if ui.is_main_process():  # a run being trained: said before its checkpoints are looked at (they are changing)
        probe = ckpt.RunLock(run)
        holder = probe.acquire()
        probe.release()
        if holder is not None:
            raise being_trained(run, holder)
    latest = ckpt.latest(run)
    if latest is None:
        raise CheckpointError(
            f"{run} has no complete checkpoint (an interrupted save's .tmp folder is never used)",
            "start it again with `flame train`, and pass --save to checkpoint more often",
        )
    chosen = latest
    if checkpoint is not None:
        named = Path(checkpoint)
        chosen = named if named.is_dir() else run / ckpt.CHECKPOINTS / named.name
        if chosen.resolve() not in [c.resolve() for c in ckpt.complete(run)]:
            names = ", ".join(c.name for c in ckpt.complete(run)[-5:])
            raise CheckpointError(
                f"--checkpoint {checkpoint} is not a complete checkpoint of {run}", f"give one of: {names}"
            )
    cfg = dataclasses.replace(run_config.load(run), checkpoint=str(chosen), path=str(run), **overrides)
    return train(cfg, force=force, rewind=chosen != latest)
