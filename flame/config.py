"""The run configuration of `flame train`: one dataclass, a docstring per field, validated as a whole.

    cfg = TrainConfig(model="configs/gla_340M.json", cache="data/HuggingFaceFW/fineweb-edu/sample-10BT/train")
    cfg = resolve(cfg)          # fills derived values (run dir, dataset path, run name), raises ConfigError listing all
    save(cfg, cfg.path)         # DIR/config.json, what `flame resume` reads back with load(DIR)

Field names are the seed's `train.sh key=value` names, so `lr=3e-4` becomes `--lr 3e-4` and `cfg.lr`.
The field docstrings are also the `--help` text of `flame train` (see `help_text`).
"""

import ast
import dataclasses
import inspect
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from flame.errors import ConfigError, read_json_object

CONFIG_FILE = "config.json"
#: Options added after runs were already being saved, with the value a run saved before them trained with: such a
#: run resumes as it was trained, whatever today's default is.
SAVED_BEFORE = {"share_casts": False, "group_projections": False}
SCHEDULERS = ("cosine", "wsd", "linear", "constant")
# The seed's train.sh spelled the cosine schedule as HF Trainer does.
SCHEDULER_ALIASES = {"cosine_with_min_lr": "cosine", "warmup_stable_decay": "wsd"}
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    # Model and data
    model: str = ""
    """Model config JSON (initialised from scratch with --seed) or model dir (its weights are loaded as they are)."""
    cache: str = ""
    """Prepared dataset dir (`flame data prepare` output). Several, mixed: 'DIR_A:0.7,DIR_B:0.3' (weights by window)."""
    data: str = ""
    """Dataset id (e.g. HuggingFaceFW/fineweb-edu); with --name, --cache defaults to data/{data}/{name}/train."""
    name: str = ""
    """Dataset subset (e.g. sample-10BT), used with --data for the default --cache."""
    type: str = ""
    """Run name (the seed's `type`): wandb run name and default run dir exp/{type}. Default: the model type."""
    path: str = ""
    """Run dir: config.json, metrics.jsonl, checkpoints/. Default exp/{type}."""
    checkpoint: str = ""
    """Checkpoint dir (RUN/checkpoints/step-N) to continue from: weights, optimizer, schedule, data position, RNG."""

    # Batch and length
    context: int = 2048
    """Tokens per training window; documents are packed into windows without padding."""
    batch: int = 8
    """Windows per device per micro-step."""
    update: int = 1
    """Gradient accumulation: micro-steps per optimizer update (global batch = batch x update x processes)."""
    varlen: bool = False
    """Pass document boundaries (cu_seqlens) so no document sees another; batch is flattened to one row (FLA only)."""
    steps: int = 0
    """Optimizer updates to train for. 0: as many as --epochs passes over the data take."""
    epochs: float = 1.0
    """Passes over the data when --steps is 0."""

    # Optimizer and schedule
    lr: float = 3e-4
    """Peak learning rate."""
    scheduler: str = "cosine"
    """LR schedule after warmup: cosine (to --min-lr x lr), wsd (warmup-stable-decay), linear, constant."""
    warmup: int = 1024
    """Linear warmup updates from 0 to --lr."""
    min_lr: float = 0.1
    """Final LR as a fraction of --lr (cosine, linear, wsd)."""
    decay_ratio: float = 0.1
    """wsd: fraction of --steps spent in the final decay."""
    decay: float = 0.01
    """AdamW weight decay (matrices only; norms, biases and 1-d parameters are not decayed)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    norm: float = 1.0
    """Gradient clipping max norm (0: no clipping, the norm is still logged)."""
    precision: str = "auto"
    """auto (bf16 autocast with fp32 master weights on GPU, fp32 on CPU), bf16, or fp32."""
    compile: bool = False
    """torch.compile each decoder block (inductor, in place: checkpoints keep their names); the first step then
    includes the compilation. FLA's kernels stay eager; on an H200 ~1% faster where the batch fills the GPU,
    slower where the host bounds the step (small batches)."""
    checkpointing: bool = False
    """Activation checkpointing: keep only each layer's input and recompute the rest in backward (less memory, ~1/3
    more compute); for a batch or model that does not fit otherwise. The losses are the same."""
    share_casts: bool = True
    """Under bf16 autocast, cast each block's normed input to bf16 once, shared by the projections that read it
    (q, k, v, gates), instead of once per projection: the forward is unchanged, the gradients are summed in bf16
    before the cast back. On an H200: GLA-340M at batch 32 7.5% faster and 16% less memory, GLA-1.3B at batch 16
    4.9% faster and 14% less (benchmarks/RESULTS.md). --no-share-casts for autocast's own casts. RWKV and Mamba2
    models have no such norm."""
    bf16_residual: bool = False
    """Under bf16 autocast, keep the residual stream (the sum the blocks add into) in bf16 instead of fp32, as
    training with bf16 weights does (torchtitan's FSDP mixed precision). The weights and the optimizer stay fp32;
    every residual add rounds to bf16, so the losses differ slightly. On an H200: GLA-340M at batch 32 5.4% faster
    (36.4% MFU) in 10% less memory, GLA-1.3B at batch 16 3.4% faster; 300 steps of GLA-340M ended at the same loss
    (benchmarks/RESULTS.md). A config with residual_in_fp32 (Mamba2's default) keeps its fp32 stream."""
    group_projections: bool | None = None
    """Run the projections each block calls on one input (GLA's q, k, v and gates; the MLP's gate and up) as one
    autograd node, so that the backward adds their input gradients inside the GEMMs instead of with an add kernel per
    projection. The groups are found by one forward of the first batch without gradients, before update 1. The
    weights stay separate parameters; the losses are the same to rounding. On an H200 with flame's other defaults:
    GLA-340M at batch 32 1.023x the tokens/s, GDN-340M at 32 1.017x, GLA-1.3B at 8 1.016x (benchmarks/RESULTS.md).
    Default: on wherever it applies (not with --compile or DeepSpeed ZeRO-3, which gathers each projection's weight
    on its own call); --group-projections says what it grouped, or warns where it cannot apply;
    --no-group-projections runs them one by one."""
    cuda_graphs: bool | None = None
    """Capture the whole update (forward, backward, clipping, AdamW) in a CUDA graph after 3 eager updates (11 under
    DDP) and replay it: the host launches one graph per step instead of every kernel, which pays where the host bounds
    the step (small batches). On an H200, GLA-340M: 1.45x the tokens/s at batch 8 (151.0K), 1.03x at 16, level at 32,
    ~0.2 GiB more memory; DDP on 2 H200s at batch 8: 1.68x; captured for GLA, DeltaNet, Mamba2, RWKV7 and Llama
    (benchmarks/RESULTS.md). The same updates. Default: on wherever the run allows it (CUDA GPUs, one process or DDP on
    one machine, not FSDP or DeepSpeed; fixed shapes: not with --varlen, --compile or --checkpointing), and a model that
    cannot be captured trains on eagerly after a warning; --cuda-graphs refuses a run that cannot have it,
    --no-cuda-graphs never captures."""

    # Validation
    eval: int = 0
    """Measure the loss on the validation split (the first --cache's, from `flame data prepare --val-docs`) every
    this many updates and at the end; 0: never. Logged as val_loss."""
    eval_windows: int = 64
    """--context windows per evaluation: the same ones each time (fewer if the split is smaller)."""

    # Checkpoints, logging, faults
    save: int = 2048
    """Save a checkpoint every this many updates (and always at the end)."""
    limit: int = 2
    """Keep the newest this many checkpoints (0: keep all)."""
    logging: int = 32
    """Log every this many updates (console, metrics.jsonl, wandb, TensorBoard)."""
    project: str = ""
    """wandb project; empty: no wandb. WANDB_MODE=offline logs locally."""
    tensorboard: bool = False
    """Also write every log record to RUN/tensorboard/ (`tensorboard --logdir RUN/tensorboard`); needs the
    tensorboard package (pip install tensorboard). A resumed run hides the records logged after its checkpoint
    there too."""
    seed: int = 42
    """Seed for model init, data order and every process's RNG."""
    max_bad_steps: int = 8
    """Stop (after saving) when this many updates in a row had a NaN/inf loss or gradient (each is skipped)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def field_docs(cls: type | None = None) -> dict[str, str]:
    """The docstring under each field of a dataclass (TrainConfig by default), whitespace folded: one text serves
    the engine's reader and the command's `--help`."""
    body = ast.parse(inspect.getsource(cls or TrainConfig)).body[0].body
    return {
        prev.target.id: " ".join(node.value.value.split())
        for prev, node in zip(body, body[1:], strict=False)
        if isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }


def parse_cache(cache: str) -> list[tuple[str, float]]:
    """'A:0.7,B:0.3' -> [('A', 0.7), ('B', 0.3)]; 'A' -> [('A', 1.0)]. A ':' followed by a non-number is a path."""
    sources = []
    for part in filter(None, (p.strip() for p in cache.split(","))):
        head, sep, tail = part.rpartition(":")
        try:
            weight = float(tail) if sep else None
        except ValueError:
            weight = None
        sources.append((head, weight) if weight is not None else (part, 1.0))
    return sources


def resolve(cfg: TrainConfig, model_type: str | None = None) -> TrainConfig:
    """Fill the derived fields and validate; every problem is reported at once, naming the option to change."""
    cfg = dataclasses.replace(cfg)
    cfg.scheduler = SCHEDULER_ALIASES.get(cfg.scheduler, cfg.scheduler)
    if not cfg.cache and cfg.data:
        cfg.cache = str(Path("data") / cfg.data / (cfg.name or "default") / "train")
    if not cfg.type:
        cfg.type = model_type or (Path(cfg.model).stem if cfg.model else "run")
    if not cfg.path:
        cfg.path = str(Path("exp") / cfg.type)
    validate(cfg)
    # absolute, so that `flame resume RUN` works from any directory (RUN/config.json keeps them as resolved here)
    cfg.model = os.path.abspath(cfg.model)
    sources = parse_cache(cfg.cache)
    cfg.cache = ",".join(
        os.path.abspath(path) + ("" if len(sources) == 1 and weight == 1.0 else f":{weight:g}")
        for path, weight in sources
    )
    if cfg.checkpoint:
        cfg.checkpoint = os.path.abspath(cfg.checkpoint)
    return cfg


def validate(cfg: TrainConfig) -> None:
    problems = [
        f"--{f.name.replace('_', '-')} must be a finite number, got {getattr(cfg, f.name)}"
        for f in dataclasses.fields(cfg)
        if isinstance(getattr(cfg, f.name), float) and not math.isfinite(getattr(cfg, f.name))
    ]
    if problems:  # the range checks below cannot judge nan
        raise ConfigError("; ".join(problems))
    if not cfg.model:
        problems.append("--model is required (a model config JSON or a model dir)")
    elif not Path(cfg.model).exists():
        problems.append(f"--model {cfg.model} does not exist")
    sources = parse_cache(cfg.cache)
    if not cfg.cache:
        problems.append("--cache is required (a prepared dataset dir from `flame data prepare`)")
    elif not sources:
        problems.append(f"--cache {cfg.cache!r} names no dataset (a prepared dataset dir, or DIR:WEIGHT,DIR:WEIGHT)")
    else:
        for path, weight in sources:
            if Path(path).is_file():
                problems.append(f"--cache {path} is a file; give the folder `flame data prepare` wrote")
            elif not Path(path).is_dir():
                base, _, weight_text = path.rpartition(":")
                if base and Path(base).is_dir():  # DIR:WEIGHT with a weight that is no number
                    problems.append(f"--cache {path}: the weight after the colon, {weight_text!r}, is not a number")
                else:
                    problems.append(
                        f"--cache {path} does not exist (prepare it with `flame data prepare`; if a run's data "
                        "moved, `flame resume RUN --cache NEW_PLACE`)"
                    )
            if not (math.isfinite(weight) and weight > 0):
                problems.append(f"--cache weight of {path} must be a number > 0, got {weight}")
    if cfg.checkpoint and Path(cfg.checkpoint).is_file():
        problems.append(f"--checkpoint {cfg.checkpoint} is a file; give a RUN/checkpoints/step-N folder")
    elif cfg.checkpoint and not Path(cfg.checkpoint).is_dir():
        problems.append(f"--checkpoint {cfg.checkpoint} does not exist")
    if cfg.context < 2:
        problems.append(f"--context must be >= 2 (a token and the next one to predict), got {cfg.context}")
    for name in ("batch", "update", "save", "logging", "max_bad_steps"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("steps", "warmup", "limit"):
        if getattr(cfg, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.steps == 0 and cfg.epochs <= 0:
        problems.append(f"--epochs must be > 0 when --steps is 0, got {cfg.epochs}")
    elif cfg.epochs < 0:
        problems.append(f"--epochs must be >= 0, got {cfg.epochs}")
    if cfg.lr <= 0:
        problems.append(f"--lr must be > 0, got {cfg.lr}")
    if cfg.scheduler not in SCHEDULERS:
        problems.append(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {cfg.scheduler}")
    if cfg.precision not in PRECISIONS:
        problems.append(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision}")
    if not 0 <= cfg.min_lr <= 1:
        problems.append(f"--min-lr is a fraction of --lr in [0, 1], got {cfg.min_lr}")
    if not 0 < cfg.decay_ratio <= 1:
        problems.append(f"--decay-ratio must be in (0, 1], got {cfg.decay_ratio}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            problems.append(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    for name in ("decay", "norm", "eps"):
        if getattr(cfg, name) < 0:
            problems.append(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if problems:
        raise ConfigError("; ".join(problems))


def save(cfg: TrainConfig, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config to RUN/config.json atomically (temp file, then rename)."""
    path = Path(run_dir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def load(run_dir: str | os.PathLike) -> TrainConfig:
    """Read RUN/config.json back; unknown keys are an error (a config from another flame version)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no {CONFIG_FILE}", "give a run dir written by `flame train`")
    fix = "restore it (every checkpoint's model/ holds the model config, not the run's), or train into a new run dir"
    values = read_json_object(path, ConfigError, fix, not_object="is not a flame run config (a JSON object of options)")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{path} has unknown keys {', '.join(unknown)}", "remove them")
    wrong = [
        f"{name} = {value!r} (want {_kind(fields[name].default)})"
        for name, value in values.items()
        if not _fits(value, fields[name].default)
    ]
    if wrong:
        raise ConfigError(f"{path} has values of the wrong type: {'; '.join(wrong)}", fix)
    return TrainConfig(**(SAVED_BEFORE | values))


def _kind(default) -> str:
    return "bool or null" if default is None else type(default).__name__


def _fits(value, default) -> bool:
    """Whether `value` may stand for an option whose default is `default` (None: on/off, or where it applies)."""
    if default is None:
        return value is None or isinstance(value, bool)
    kind = type(default)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)
