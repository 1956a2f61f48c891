"""What a path holds, as plain facts: a model config or model dir, a prepared dataset, a checkpoint, or a run dir.

    flame inspect configs/gla_340M.json --context 4096 --batch 8
    flame inspect exp/gla-340M-10B --plot loss.png

From Python: `inspect(path, InspectOptions(...))` returns ModelFacts, DatasetFacts, CheckpointFacts or RunFacts
(dataclasses of numbers, strings and lists); `as_dict(facts)` is what `--json` prints. Nothing here is re-derived:
parameters, FLOPs and memory come from flame.models, checkpoint and run layouts from flame.checkpoint,
flame.config and flame.logging, the dataset format from flame.data.
"""

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from flame import autotune, models
from flame import checkpoint as ckpt
from flame.config import CONFIG_FILE as RUN_CONFIG
from flame.config import SAVED_BEFORE, TrainConfig, field_docs
from flame.data import MANIFEST, TOKENIZER_DIR, TOKENS_COLUMN
from flame.errors import CheckpointError, ConfigError, DataError, ModelError
from flame.logging import METRICS, TENSORBOARD, WANDB_ID

KINDS_FIX = (
    "give a model config JSON, a model dir (config.json + *.safetensors), a prepared dataset (manifest.json), "
    "a checkpoint (RUN/checkpoints/step-N) or a run dir (config.json, metrics.jsonl, checkpoints/)"
)
_STEP_NAME = re.compile(r"^\.?step-(\d+)(\.tmp)?$")


@dataclass
class InspectOptions:
    """Options of `flame inspect`, one field each."""

    context: int | None = None
    """Sequence length for FLOPs/token and the memory estimate. Default: the run's --context, else 2048."""
    batch: int | None = None
    """Windows per device for the memory estimate. Default: the run's --batch, else 8."""
    update: int | None = None
    """Gradient accumulation steps for the memory estimate (> 1 keeps every gradient alive). Default: the run's
    --update, else 1."""
    precision: str | None = None
    """Precision for the memory estimate: bf16 (autocast over fp32 master weights) or fp32. Default: what the run or
    checkpoint trained in (fp32 on a CPU), else bf16."""
    zero_stage: int = 0
    """ZeRO / FSDP sharding stage for the memory estimate: 0 none, 1 optimizer, 2 + grads, 3 + weights."""
    world_size: int = 1
    """Devices the ZeRO stage shards over (and DDP's resident gradients when > 1)."""
    checkpointing: bool = False
    """Memory estimate with activation checkpointing (a run or checkpoint trained with it always is)."""
    share_casts: bool | None = None
    """Memory estimate with (--share-casts) or without (--no-share-casts) the block norms' shared bf16 casts; by
    default as the run or checkpoint was trained, and for a model as `flame train` trains it (with)."""
    bf16_residual: bool = False
    """Memory estimate with the residual stream in bf16 (a run or checkpoint trained with it always is)."""
    deepspeed: bool = False
    """Memory estimate as DeepSpeed trains under bf16: bf16 weights, its fp32 master copy sharded with the AdamW
    moments, a bf16 residual stream (with --zero-stage; what `flame train --dry-run` does under its launcher)."""
    fsdp: bool = False
    """Memory estimate as FSDP trains under bf16 (--zero-stage 3: full shard, 2: shard grad op): fp32 weight shards,
    the bf16 weights it gathers, gradients sharded as the backward makes them (what `flame train --dry-run` does
    under its launcher)."""
    sample: int = 0
    """Dataset: index of the train document to decode and show."""
    sample_chars: int = 400
    """Dataset: show at most this many characters of the decoded sample."""
    plot: str | None = None
    """Run dir: write the loss and learning-rate curves to this PNG file."""


def option_docs() -> dict[str, str]:
    """The docstring under each InspectOptions field (the CLI's --help text)."""
    return field_docs(InspectOptions)


def validate(options: InspectOptions) -> None:
    problems = []
    for name in ("context", "batch", "update", "world_size", "sample_chars"):
        value = getattr(options, name)
        if value is not None and value < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if options.deepspeed and options.fsdp:
        problems.append("--deepspeed and --fsdp: a run is sharded by one of them, choose one")
    if options.precision not in (None, "bf16", "fp32"):
        problems.append(f"--precision must be bf16 or fp32, got {options.precision}")
    if options.zero_stage not in (0, 1, 2, 3):
        problems.append(f"--zero-stage must be 0, 1, 2 or 3, got {options.zero_stage}")
    elif options.fsdp and options.zero_stage == 1:  # FSDP's strategies match stages 3, 2 and 0 (engine.FSDP_STAGES)
        problems.append("--fsdp has no --zero-stage 1: FULL_SHARD is 3, SHARD_GRAD_OP 2, NO_SHARD 0")
    if options.sample < 0:
        problems.append(f"--sample must be >= 0, got {options.sample}")
    if options.plot is not None and not options.plot.lower().endswith(".png"):
        problems.append(f"--plot writes a PNG image; give a FILE.png, got {options.plot}")
    elif options.plot is not None and os.path.isdir(options.plot):
        problems.append(f"--plot {options.plot} is a folder; give a FILE.png to write")
    if problems:
        raise ConfigError("; ".join(problems))


# ---------------------------------------------------------------------------------------------------------------
# Facts


@dataclass
class ModelFacts:
    kind: ClassVar[str] = "model"
    path: str
    model_type: str
    architecture: str  # the model class, e.g. GLAForCausalLM
    fla: bool  # an FLA model (vs a transformers one)
    layers: int | None
    hidden: int | None
    heads: int | None
    vocab_size: int | None
    tied_embeddings: bool
    has_weights: bool  # a model dir with *.safetensors (else: a config, new weights on training)
    params: dict  # total, embedding, non_embedding (flame.models.count_params)
    context: int
    flops_per_token: float  # training FLOPs (forward + backward), flame.models.flops_per_token: what MFU uses
    flops: dict  # matmul, mixer, n_matmul, mixers, unknown_mixers (flame.models.flops_breakdown)
    memory: dict  # the estimate's settings and GiB per device: weights, grads, optimizer, activations, total


@dataclass
class DatasetFacts:
    kind: ClassVar[str] = "dataset"
    path: str
    source: dict  # manifest "source"
    tokenizer: dict  # manifest "tokenizer"
    context_length: int | None
    created: str | None
    documents: int  # all splits, counted in the data
    tokens: int
    splits: dict  # {split: {"documents", "tokens"}} counted in the data (tokens include each document's EOS)
    manifest_splits: dict  # what manifest.json says
    lengths: dict  # train document lengths: min, mean, median, p99, max
    histogram: dict  # train document lengths: "edges" (len(counts) + 1, powers of two) and "counts"
    sample: dict  # split, index, tokens, text (decoded, cut at sample_chars), truncated
    problems: list[str]  # disagreements with the manifest, missing tokenizer


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class TensorStats:
    name: str
    shape: list[int]
    dtype: str
    norm: float
    max_abs: float
    nan: int
    inf: int


@dataclass
class CheckpointFacts:
    kind: ClassVar[str] = "checkpoint"
    path: str
    step: int | None
    tokens: int | None  # tokens seen when it was saved
    loss: float | None  # the loss logged at (or last before) the save, from the run's metrics.jsonl
    loss_step: int | None  # the metrics.jsonl step that loss is from
    state: dict  # trainer.json without the run config and data position: skipped, batch, update, world, elapsed
    config: dict  # the run configuration it was trained with (trainer.json "config")
    model: ModelFacts | None
    stats: dict  # over all weights: tensors, params, norm (global L2), max_abs, nan, inf
    tensors: list[TensorStats]
    checks: list[Check]
    ok: bool  # every integrity check passed


@dataclass
class RunFacts:
    kind: ClassVar[str] = "run"
    path: str
    config: dict  # RUN/config.json
    step: int  # latest logged step (0 before the first record)
    steps: int | None  # the run's total updates (None when --epochs decides and the data is not at hand)
    tokens: int
    loss: float | None  # latest logged loss
    lr: float | None
    grad_norm: float | None
    tokens_per_s: float | None
    mfu: float | None
    memory_gib: float | None
    elapsed_s: float | None  # training time so far (metrics "time")
    eta_s: float | None  # 0 when finished
    finished: bool
    updated_s_ago: float | None  # since metrics.jsonl was last written
    checkpoints: list[dict]  # complete ones: step, path, bytes; oldest first
    incomplete: list[str]  # .step-N.tmp folders a crash left behind (never resumed from)
    curve: dict  # "step", "loss", "lr", "val_loss": one entry per metrics.jsonl record
    model: ModelFacts | None
    plot: str | None = None  # where --plot wrote the PNG
    val_loss: float | None = None  # latest validation loss (`flame train --eval`)
    val_loss_step: int | None = None
    # the latest first step (a resumed run times its own): seconds, and on a GPU what its autotuning cost
    first_step: dict | None = None
    # the latest CUDA graph capture (a resumed run captures anew): the update, and capture_s or failure
    cuda_graph: dict | None = None
    tuning_results: int = 0  # FLA autotune results kept in RUN/tuning/ for a resume elsewhere (flame.autotune)
    # where else the records went: "wandb" (its run id, from RUN/wandb-id), "tensorboard" (RUN/tensorboard/)
    logged_to: dict = dataclasses.field(default_factory=dict)


Facts = ModelFacts | DatasetFacts | CheckpointFacts | RunFacts


def inspect(path: str | os.PathLike, options: InspectOptions | None = None, on_progress=None) -> Facts:
    """Find out what `path` is and gather its facts (and write options.plot for a run dir).

    on_progress(done, total): called per weight tensor read while checking a checkpoint.
    """
    options = options or InspectOptions()
    validate(options)
    kind, target = detect(path)
    if options.plot and kind != "run":
        raise ConfigError(f"--plot draws a run's curves but {path} is a {kind}", "give a run dir (RUN/) with --plot")
    if kind == "model":
        return inspect_model(target, options)
    if kind == "dataset":
        return inspect_dataset(target, options)
    if kind == "checkpoint":
        return inspect_checkpoint(target, options, on_progress)
    facts = inspect_run(target, options)
    if options.plot:
        plot_run(facts, options.plot)
        facts.plot = str(options.plot)
    return facts


def detect(path: str | os.PathLike) -> tuple[str, Path]:
    """(kind, the path to inspect): "model", "dataset", "checkpoint" or "run"; ConfigError if none."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{path} does not exist", KINDS_FIX)
    if p.is_file():
        if p.name == MANIFEST:
            return "dataset", p.parent
        if p.name == METRICS:
            return "run", p.parent
        raw = _json_object(p) if p.suffix == ".json" else {}
        if raw.get("model_type"):
            return "model", p
        if p.name == RUN_CONFIG and "model" in raw and "cache" in raw:
            return "run", p.parent
        raise ConfigError(f"{path} is not a model config JSON (no model_type) nor a file flame writes", KINDS_FIX)
    if (p / MANIFEST).is_file() or (p / "dataset_dict.json").is_file():
        return "dataset", p
    if (p / "state").is_dir() or ((p / "model").is_dir() and _STEP_NAME.match(p.name)):
        return "checkpoint", p
    if (p / METRICS).is_file() or (p / ckpt.CHECKPOINTS).is_dir():
        return "run", p
    if p.name == ckpt.CHECKPOINTS and (p.parent / RUN_CONFIG).is_file():
        return "run", p.parent
    if (p / "config.json").is_file():
        raw = _json_object(p / "config.json")
        if raw.get("model_type"):
            return "model", p
        if "model" in raw and "cache" in raw:  # a run's config.json before its first record
            return "run", p
    raise ConfigError(f"{path} is none of the things flame inspect reads", KINDS_FIX)


def _json_object(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e})", KINDS_FIX) from None
    return raw if isinstance(raw, dict) else {}


def as_dict(facts: Facts) -> dict:
    """The facts as plain JSON types, with "kind" first; NaN / inf become None (strict JSON has neither)."""

    def clean(value):
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return {"kind": facts.kind, **clean(dataclasses.asdict(facts))}


# ---------------------------------------------------------------------------------------------------------------
# Model config / model dir


def _config_value(config, *names):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


@contextlib.contextmanager
def _quiet_fla():
    """FLA warns per layer, on construction, about kernels it will fall back from (48 lines for a Mamba2): true for
    training, noise for a model that is only measured on the meta device."""
    logger = logging.getLogger("fla")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def inspect_model(path: str | os.PathLike, options: InspectOptions, *, run: dict | None = None) -> ModelFacts:
    """Shapes, parameters, FLOPs/token and the memory estimate, all from flame.models on a meta-device model.
    run: the training options of the run the model belongs to (context, batch, update, precision as trained,
    checkpointing, share_casts, bf16_residual)."""
    with _quiet_fla():
        model, config = models.build_model(path, meta=True)
    if Path(path).is_dir() and any(Path(path).glob("*.safetensors")):
        # Headers against sizes only (checkpoint.damaged, as for a checkpoint's state): a missing shard, a git-lfs
        # pointer, a truncated file. PyTorch .bin files are not opened (a legacy one would be read whole).
        files, problems = _weight_files(Path(path))
        problems += [f"{f.name} is {why}" for f in files if (why := ckpt.damaged(f))]
        if problems:
            raise ModelError(
                f"the weights of {path} are unusable: {'; '.join(problems)}",
                "download or save them again (in a git clone: `git lfs pull`)",
            )
    return _model_facts(model, config, Path(path), options, run or {})


def _has_weights(p: Path) -> bool:
    return p.is_dir() and (any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin")))


def _model_facts(model, config, p: Path, options: InspectOptions, run: dict) -> ModelFacts:
    context = options.context or run.get("context") or 2048
    batch = options.batch or run.get("batch") or 8
    update = options.update or run.get("update") or 1
    # a run's config says "auto" (bf16 on a GPU, fp32 on a CPU); its checkpoints say what it resolved to
    precision = options.precision or (run.get("precision") if run.get("precision") in ("bf16", "fp32") else "bf16")
    checkpointing = options.checkpointing or bool(run.get("checkpointing"))
    share_casts = options.share_casts
    if share_casts is None:  # a run saved before the option existed trained without
        share_casts = run.get("share_casts", SAVED_BEFORE["share_casts"]) if run else TrainConfig.share_casts
    bf16_residual = options.bf16_residual or bool(run.get("bf16_residual"))
    flops = models.flops_breakdown(model, context)
    memory = models.estimate_memory(
        model,
        batch,
        context,
        precision=precision,
        zero_stage=options.zero_stage,
        world_size=options.world_size,
        accumulation=update,
        activation_checkpointing=checkpointing,
        shared_casts=share_casts,
        bf16_residual=bf16_residual,
        deepspeed=options.deepspeed,
        fsdp=options.fsdp,
        varlen=bool(run.get("varlen")),
    )
    settings = {
        "batch": batch,
        "context": context,
        "update": update,
        "precision": precision,
        "zero_stage": options.zero_stage,
        "world_size": options.world_size,
        "checkpointing": checkpointing,
        "share_casts": share_casts,
        "bf16_residual": bf16_residual,
        "deepspeed": options.deepspeed,
        "fsdp": options.fsdp,
    }
    return ModelFacts(
        path=str(p),
        model_type=config.model_type,
        architecture=type(model).__name__,
        fla=type(model).__module__.startswith("fla."),
        layers=_config_value(config, "num_hidden_layers", "n_layer", "num_layers"),
        hidden=_config_value(config, "hidden_size", "d_model", "n_embd"),
        heads=_config_value(config, "num_heads", "num_attention_heads", "n_head"),
        vocab_size=_config_value(config, "vocab_size"),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        has_weights=_has_weights(p),
        params=models.count_params(model),
        context=context,
        flops_per_token=flops["total"],
        flops={k: v for k, v in flops.items() if k != "total"},
        memory=settings | {f"{k}_gib": v for k, v in memory.items()},
    )


# ---------------------------------------------------------------------------------------------------------------
# Prepared dataset


def log2_histogram(lengths: np.ndarray) -> dict:
    """Counts of lengths in power-of-two bins [2^k, 2^(k+1)), from the bin of the shortest to that of the longest:
    document lengths span orders of magnitude, so equal-width bins would put nearly all in the first."""
    if len(lengths) == 0:
        return {"edges": [], "counts": []}
    lengths = np.asarray(lengths, dtype=np.int64)
    lo = int(np.floor(np.log2(max(1, lengths.min()))))
    hi = int(np.floor(np.log2(max(1, lengths.max())))) + 1
    edges = [2**k for k in range(lo, hi + 1)]
    counts, _ = np.histogram(np.maximum(lengths, 1), bins=edges)
    # np.histogram closes the last bin on the right; the top edge 2^hi is above every length, so nothing moves
    return {"edges": edges, "counts": [int(c) for c in counts]}


def inspect_dataset(path: str | os.PathLike, options: InspectOptions) -> DatasetFacts:
    """Counts from the data itself (checked against manifest.json), the length histogram and one decoded sample."""
    import datasets
    import pyarrow.compute as pc

    root = Path(path)
    manifest = _json_object(root / MANIFEST) if (root / MANIFEST).is_file() else {}
    try:
        loaded = datasets.load_from_disk(str(root))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{root} is not a readable prepared dataset ({e})", "prepare it again with flame data prepare")
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({"train": loaded})
    problems = [] if manifest else [f"no {MANIFEST}: the dataset is incomplete or not from flame data prepare"]
    splits, lengths_of = {}, {}
    for name, ds in loaded.items():
        if TOKENS_COLUMN not in ds.column_names:
            fix = "prepare it with flame data prepare"
            raise DataError(f"{root} split {name} has no '{TOKENS_COLUMN}' column", fix)
        lengths = pc.list_value_length(ds.data.column(TOKENS_COLUMN)).to_numpy(zero_copy_only=False).astype(np.int64)
        lengths_of[name] = lengths
        splits[name] = {"documents": len(lengths), "tokens": int(lengths.sum())}
    manifest_splits = manifest.get("splits") or {}
    for name in sorted(set(splits) | set(manifest_splits)):
        if manifest and splits.get(name) != manifest_splits.get(name):
            said = manifest_splits.get(name)
            problems.append(f"split {name}: the data has {splits.get(name)}, {MANIFEST} says {said}")

    first = "train" if "train" in splits else next(iter(splits))
    train = lengths_of[first]
    stats = (
        {
            "min": int(train.min()),
            "mean": float(train.mean()),
            "median": float(np.median(train)),
            "p99": float(np.percentile(train, 99)),
            "max": int(train.max()),
        }
        if len(train)
        else {}
    )
    sample = {"split": first, "index": options.sample, "tokens": None, "text": None, "truncated": False}
    if options.sample >= len(train):
        raise ConfigError(f"--sample {options.sample} is past the last {first} document", f"give 0..{len(train) - 1}")
    if len(train):
        ids = loaded[first][options.sample][TOKENS_COLUMN]
        sample["tokens"] = len(ids)
        if (root / TOKENIZER_DIR).is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(root / TOKENIZER_DIR))
            # decode no more tokens than can fill sample_chars (a token is at least one character)
            text = tokenizer.decode(ids[: options.sample_chars + 1])
            sample["truncated"] = len(text) > options.sample_chars or len(ids) > options.sample_chars + 1
            sample["text"] = text[: options.sample_chars]
        else:
            problems.append(f"no {TOKENIZER_DIR}/: the sample cannot be decoded")
    return DatasetFacts(
        path=str(root),
        source=manifest.get("source") or {},
        tokenizer=manifest.get("tokenizer") or {},
        context_length=manifest.get("context_length"),
        created=manifest.get("created"),
        documents=sum(s["documents"] for s in splits.values()),
        tokens=sum(s["tokens"] for s in splits.values()),
        splits=splits,
        manifest_splits=manifest_splits,
        lengths=stats,
        histogram=log2_histogram(train),
        sample=sample,
        problems=problems,
    )


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint


def _expected_tensors(model) -> list[tuple[set[str], tuple]]:
    """Per weight of the model: every name it may be saved under (tied weights have several; save_pretrained keeps
    one) and its shape. Persistent buffers count too: they are in the state dict."""
    groups: dict[int, tuple[set[str], tuple]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), (set(), tuple(p.shape)))[0].add(name)
    persistent = set(model.state_dict(keep_vars=True))
    for name, b in model.named_buffers(remove_duplicate=False):
        if name in persistent:
            groups.setdefault(id(b), (set(), tuple(b.shape)))[0].add(name)
    return list(groups.values())


def _weight_files(model_dir: Path) -> tuple[list[Path], list[str]]:
    """The safetensors files of a model dir, and the problems finding them (an index naming a missing shard)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            return [], [f"{index.name} is unreadable ({e})"]
        missing = [n for n in names if not (model_dir / n).is_file()]
        return [model_dir / n for n in names if n not in missing], [f"shard {n} is missing" for n in missing]
    files = sorted(model_dir.glob("*.safetensors"))
    return files, [] if files else [f"no *.safetensors in {model_dir}"]


def tensor_stats(model_dir: Path, on_progress=None) -> tuple[list[TensorStats], list[str]]:
    """Norm, max |x|, NaN and inf count of every saved tensor, read one at a time; and the files that failed."""
    import torch
    from safetensors import SafetensorError, safe_open

    files, problems = _weight_files(model_dir)
    handles = []
    for f in files:
        try:
            handles.append(safe_open(str(f), framework="pt"))
        except (SafetensorError, OSError) as e:  # a truncated or corrupted file fails here: header vs length
            problems.append(f"{f.name}: {e}")
    total = sum(len(h.keys()) for h in handles)
    out, done = [], 0
    for h in handles:
        for name in h.keys():
            try:
                t = h.get_tensor(name)
            except (SafetensorError, OSError, RuntimeError) as e:
                problems.append(f"{name}: {e}")
                continue
            x = t.detach().float()
            finite = torch.isfinite(x)
            out.append(
                TensorStats(
                    name=name,
                    shape=list(t.shape),
                    dtype=str(t.dtype).removeprefix("torch."),
                    norm=float(x.norm()),
                    max_abs=float(x[finite].abs().max()) if finite.any() else float("nan"),
                    nan=int(torch.isnan(x).sum()),
                    inf=int(torch.isinf(x).sum()),
                )
            )
            done += 1
            if on_progress:
                on_progress(done, total)
    return out, problems


def _shape_check(model, tensors: list[TensorStats]) -> list[str]:
    saved = {t.name: tuple(t.shape) for t in tensors}
    problems, used = [], set()
    for names, shape in _expected_tensors(model):
        present = sorted(n for n in names if n in saved)
        if not present:
            problems.append(f"missing {sorted(names)[0]} {list(shape)}")
        for n in present:
            used.add(n)
            if saved[n] != shape:
                problems.append(f"{n} is {list(saved[n])}, the config says {list(shape)}")
    problems += [f"unexpected {n} {list(saved[n])}" for n in sorted(set(saved) - used)]
    return problems


def _summary(problems: list[str], ok: str, limit: int = 4) -> str:
    if not problems:
        return ok
    more = f" (+{len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def _metrics(run_dir: Path) -> tuple[list[dict], int]:
    """metrics.jsonl records, and how many lines could not be parsed (a line cut by a crash mid-write)."""
    path = run_dir / METRICS
    if not path.is_file():
        return [], 0
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            bad += 1
    return records, bad


def _as_trained(state: dict) -> dict:
    """The run configuration in a checkpoint's trainer state, with the precision it trained in where the state says
    (checkpoints written since the twenty-seventh session; the configuration may say "auto") and the update it
    last trained with."""
    run = dict(state.get("config") or {})
    if state.get("precision") in ("bf16", "fp32"):
        run["precision"] = state["precision"]
    if isinstance(state.get("update"), int):
        run["update"] = state["update"]
    return run


def inspect_checkpoint(path: str | os.PathLike, options: InspectOptions, on_progress=None) -> CheckpointFacts:
    """Trainer state, weight statistics and integrity checks of RUN/checkpoints/step-N (see flame.checkpoint)."""
    root = Path(path)
    checks: list[Check] = []
    state, trainer_ok = {}, False
    trainer = root / "state" / ckpt.TRAINER_STATE
    incomplete = root.name.endswith(".tmp")
    try:
        state = json.loads(trainer.read_text())
        trainer_ok = isinstance(state, dict) and isinstance(state.get("step"), int)
        detail = f"step {state.get('step')}" if trainer_ok else "no step in it"
    except FileNotFoundError:
        detail = "missing: the save did not finish" if incomplete else "missing"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        detail = f"unreadable ({e})"
    checks.append(Check(f"state/{ckpt.TRAINER_STATE}", trainer_ok, detail))
    state = state if trainer_ok else {}

    acc = root / "state" / "accelerate"
    acc_problems = []
    if not acc.is_dir() or not any(acc.iterdir()):
        acc_problems.append("missing or empty")
    else:
        # one RNG state per process: the resume restores every process's generator
        world = state.get("world", 1)
        rng = len(list(acc.glob("random_states_*.pkl")))
        if rng != world:
            acc_problems.append(f"{rng} random_states_*.pkl for {world} processes")
        # accelerate writes optimizer.bin (optimizer_0/ under FSDP); DeepSpeed its own *optim_states.pt files
        if not any(acc.glob("optimizer*")) and not any(acc.rglob("*optim_states.pt")):
            acc_problems.append("no optimizer state")
        acc_problems += ckpt.damaged_files(acc)
    acc_detail = _summary(acc_problems, "optimizer and RNG state present")
    checks.append(Check("state/accelerate", not acc_problems, acc_detail))

    model_dir = root / "model"
    model, model_facts = None, None
    try:
        run = _as_trained(state)
        with _quiet_fla():
            model, config = models.build_model(model_dir, meta=True)
        model_facts = _model_facts(model, config, model_dir, options, run)
        checks.append(Check("model/config.json", True, f"{model_facts.model_type}, {model_facts.architecture}"))
    except ModelError as e:
        checks.append(Check("model/config.json", False, str(e)))

    tensors, read_problems = tensor_stats(model_dir, on_progress) if model_dir.is_dir() else ([], ["no model/"])
    checks.append(Check("weights readable", not read_problems, _summary(read_problems, f"{len(tensors)} tensors read")))
    if model is not None and not read_problems:
        shape_problems = _shape_check(model, tensors)
        checks.append(Check("shapes match config", not shape_problems, _summary(shape_problems, "every weight")))
    else:
        checks.append(Check("shapes match config", False, "not checked: the config or the weights are unreadable"))
    nan, inf = sum(t.nan for t in tensors), sum(t.inf for t in tensors)
    bad = [f"{t.name} ({t.nan} NaN, {t.inf} inf)" for t in tensors if t.nan or t.inf]
    if read_problems and not bad:  # what could not be read was not checked either
        checks.append(Check("finite weights", False, "not checked: the weights are unreadable"))
    else:
        checks.append(Check("finite weights", not bad, _summary(bad, "no NaN or inf")))

    stats = {
        "tensors": len(tensors),
        "params": sum(math.prod(t.shape) for t in tensors),
        "norm": math.sqrt(sum(t.norm**2 for t in tensors)),
        "max_abs": max((t.max_abs for t in tensors if math.isfinite(t.max_abs)), default=float("nan")),
        "nan": nan,
        "inf": inf,
    }

    step = state.get("step")
    if step is None and (m := _STEP_NAME.match(root.name)):
        step = int(m.group(1))
    loss, loss_step = state.get("loss"), step if "loss" in state else None
    run_dir = root.parent.parent if root.parent.name == ckpt.CHECKPOINTS else None
    if loss is None and run_dir is not None and step is not None:
        # trainer.json holds no loss; the run's log has the loss averaged over the last logging window
        before = [r for r in _metrics(run_dir)[0] if r["step"] <= step and r.get("loss") is not None]
        if before:
            loss, loss_step = before[-1]["loss"], before[-1]["step"]
    return CheckpointFacts(
        path=str(root),
        step=step,
        tokens=state.get("tokens"),
        loss=loss,
        loss_step=loss_step,
        state={k: v for k, v in state.items() if k not in ("config", "data")},
        config=state.get("config") or {},
        model=model_facts,
        stats=stats,
        tensors=tensors,
        checks=checks,
        ok=all(c.ok for c in checks),
    )


# ---------------------------------------------------------------------------------------------------------------
# Run dir


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _total_steps(config: dict, world: int) -> int | None:
    """The run's length: --steps, or what --epochs comes to over its data (the engine's own plan)."""
    if config.get("steps"):
        return int(config["steps"])
    from flame import engine
    from flame.config import TrainConfig
    from flame.errors import FlameError

    try:
        return engine.plan(TrainConfig(**config), world=world).steps
    except (FlameError, TypeError):  # data moved or deleted, or a config from another flame version
        return None


def inspect_run(path: str | os.PathLike, options: InspectOptions) -> RunFacts:
    """Progress, the latest metrics, checkpoints on disk and the curves of a `flame train` run dir."""
    root = Path(path)
    config = _json_object(root / RUN_CONFIG) if (root / RUN_CONFIG).is_file() else {}
    records, _ = _metrics(root)
    found = ckpt.complete(root)
    world = 1
    trained = config  # for the memory estimate: with the precision and update its newest checkpoint trained at
    if found:
        try:
            state = ckpt.read_trainer_state(found[-1])
            world = state.get("world", 1)
            trained = config | {k: v for k, v in _as_trained(state).items() if k in ("precision", "update")}
        except CheckpointError:
            pass
    last = records[-1] if records else {}
    losses = [r for r in records if r.get("loss") is not None]
    vals = [r for r in records if r.get("val_loss") is not None]
    firsts = [r for r in records if r.get("first_step_s") is not None]
    first_step = None
    if firsts:
        first_step = {"step": firsts[-1].get("step"), "seconds": firsts[-1]["first_step_s"]}
        tuning = firsts[-1].get("first_step_tuning") or {}
        first_step |= {k: tuning[k] for k in ("kernels_tuned", "configs_benchmarked", "compile_s") if k in tuning}
    step = last.get("step", 0)
    steps = _total_steps(config, world) if config else None
    finished = steps is not None and step >= steps
    metrics_file = root / METRICS
    model_facts = None
    model_source = (found[-1] / "model") if found else Path(config.get("model", "")) if config.get("model") else None
    if model_source is not None and model_source.exists():
        try:
            model_facts = inspect_model(model_source, options, run=trained)
        except ModelError:
            model_facts = None
    incomplete = sorted(str(p) for p in (root / ckpt.CHECKPOINTS).glob(".step-*.tmp")) if found or records else []
    return RunFacts(
        path=str(root),
        config=config,
        step=step,
        steps=steps,
        tokens=last.get("tokens", 0),
        loss=losses[-1]["loss"] if losses else None,
        lr=last.get("lr"),
        grad_norm=last.get("grad_norm"),
        tokens_per_s=last.get("tokens_per_s"),
        mfu=last.get("mfu"),
        memory_gib=last.get("memory_gib"),
        elapsed_s=last.get("time"),
        eta_s=0.0 if finished else last.get("eta_s"),
        finished=finished,
        updated_s_ago=time.time() - metrics_file.stat().st_mtime if metrics_file.is_file() else None,
        checkpoints=[
            {"step": int(_STEP_NAME.match(p.name).group(1)), "path": str(p), "bytes": _dir_bytes(p)} for p in found
        ],
        incomplete=incomplete,
        curve={
            "step": [r["step"] for r in records],
            "loss": [r.get("loss") for r in records],
            "lr": [r.get("lr") for r in records],
            "val_loss": [r.get("val_loss") for r in records],
        },
        model=model_facts,
        val_loss=vals[-1]["val_loss"] if vals else None,
        val_loss_step=vals[-1]["step"] if vals else None,
        first_step=first_step,
        cuda_graph=next((r["cuda_graph"] for r in reversed(records) if isinstance(r.get("cuda_graph"), dict)), None),
        tuning_results=sum(1 for _ in (root / autotune.DIR).rglob("*" + autotune.SUFFIX)),
        logged_to=_logged_to(root),
    )


def _logged_to(root: Path) -> dict:
    """The sinks besides metrics.jsonl that the run (or a resume of it) wrote to, as the run dir shows them."""
    sinks = {}
    if (root / WANDB_ID).is_file():
        sinks["wandb"] = (root / WANDB_ID).read_text().strip()
    if (root / TENSORBOARD).is_dir():
        sinks["tensorboard"] = str(root / TENSORBOARD)
    return sinks


def plot_run(facts: RunFacts, output: str | os.PathLike):
    """Write the loss and learning-rate curves against the step to a PNG (written aside, then renamed into place);
    returns the matplotlib Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not facts.curve["step"]:
        fix = "plot once the run has logged a step"
        raise CheckpointError(f"{facts.path} has no metrics yet, nothing to plot", fix)
    steps = facts.curve["step"]
    # a skipped (NaN) update logs loss null: leave a gap there rather than join its neighbours
    loss = [math.nan if v is None else v for v in facts.curve["loss"]]
    lr = [math.nan if v is None else v for v in facts.curve["lr"]]
    fig = Figure(figsize=(8, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # Agg: no display needed
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True)
    ax_loss.plot(steps, loss, color="tab:blue", label="loss")
    evals = [(s, v) for s, v in zip(steps, facts.curve.get("val_loss") or []) if v is not None]
    if evals:
        ax_loss.plot(*zip(*evals), "o-", color="tab:green", label="validation loss")
        ax_loss.legend()
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, lr, color="tab:orange", label="learning rate")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    name = facts.config.get("type") or Path(facts.path).name
    fig.suptitle(f"{name}: step {facts.step}" + (f" of {facts.steps}" if facts.steps else ""))
    output = Path(output)
    if output.parent and not output.parent.is_dir():
        raise ConfigError(f"--plot {output}: folder {output.parent} does not exist", "create it or give another path")
    tmp = output.with_name(f".{output.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, output)
    return fig
