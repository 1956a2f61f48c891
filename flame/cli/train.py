"""`flame train`: parse the options into a TrainConfig, call flame.engine, render the result.

    flame train --model configs/gla_340M.json --cache data/HuggingFaceFW/fineweb-edu/sample-10BT/train \\
        --type gla --lr 3e-4 --steps 20480 --batch 8 --update 1 --warmup 1024 --context 2048 --path exp/gla-340M-10B
    accelerate launch --num_processes 8 -m flame train ...      # DDP; configs/accelerate/ for FSDP and ZeRO

Every option is the seed's `train.sh key=value` with the same name (README "Training" has the table).
"""

import dataclasses
import json
import shlex
from typing import Annotated

import typer

from flame import ui
from flame.cli import changed_switches, flag
from flame.config import TrainConfig, field_docs

DOCS = field_docs()
DEFAULTS = TrainConfig()
#: On/off options that change how a step is computed (not what is trained), listed by --dry-run when not the default.
SWITCHES = ("compile", "checkpointing", "share_casts", "bf16_residual", "group_projections", "cuda_graphs")


def _opt(name: str, *, negatable: bool = False, **kwargs):
    names = f"{flag(name)}/{flag(name, on=False)}" if negatable else flag(name)
    return typer.Option(names, help=DOCS[name], **kwargs)


def train(
    model: Annotated[str, _opt("model", rich_help_panel="Model and data")] = DEFAULTS.model,
    cache: Annotated[str, _opt("cache", rich_help_panel="Model and data")] = DEFAULTS.cache,
    data: Annotated[str, _opt("data", rich_help_panel="Model and data")] = DEFAULTS.data,
    name: Annotated[str, _opt("name", rich_help_panel="Model and data")] = DEFAULTS.name,
    type: Annotated[str, _opt("type", rich_help_panel="Model and data")] = DEFAULTS.type,
    path: Annotated[str, _opt("path", rich_help_panel="Model and data")] = DEFAULTS.path,
    checkpoint: Annotated[str, _opt("checkpoint", rich_help_panel="Model and data")] = DEFAULTS.checkpoint,
    context: Annotated[int, _opt("context", rich_help_panel="Batch")] = DEFAULTS.context,
    batch: Annotated[int, _opt("batch", rich_help_panel="Batch")] = DEFAULTS.batch,
    update: Annotated[int, _opt("update", rich_help_panel="Batch")] = DEFAULTS.update,
    varlen: Annotated[bool, _opt("varlen", rich_help_panel="Batch")] = DEFAULTS.varlen,
    steps: Annotated[int, _opt("steps", rich_help_panel="Batch")] = DEFAULTS.steps,
    epochs: Annotated[float, _opt("epochs", rich_help_panel="Batch")] = DEFAULTS.epochs,
    lr: Annotated[float, _opt("lr", rich_help_panel="Optimizer")] = DEFAULTS.lr,
    scheduler: Annotated[str, _opt("scheduler", rich_help_panel="Optimizer")] = DEFAULTS.scheduler,
    warmup: Annotated[int, _opt("warmup", rich_help_panel="Optimizer")] = DEFAULTS.warmup,
    min_lr: Annotated[float, _opt("min_lr", rich_help_panel="Optimizer")] = DEFAULTS.min_lr,
    decay_ratio: Annotated[float, _opt("decay_ratio", rich_help_panel="Optimizer")] = DEFAULTS.decay_ratio,
    decay: Annotated[float, _opt("decay", rich_help_panel="Optimizer")] = DEFAULTS.decay,
    beta1: Annotated[float, _opt("beta1", rich_help_panel="Optimizer")] = DEFAULTS.beta1,
    beta2: Annotated[float, _opt("beta2", rich_help_panel="Optimizer")] = DEFAULTS.beta2,
    eps: Annotated[float, _opt("eps", rich_help_panel="Optimizer")] = DEFAULTS.eps,
    norm: Annotated[float, _opt("norm", rich_help_panel="Optimizer")] = DEFAULTS.norm,
    precision: Annotated[str, _opt("precision", rich_help_panel="Optimizer")] = DEFAULTS.precision,
    compile: Annotated[bool, _opt("compile", rich_help_panel="Speed and memory")] = DEFAULTS.compile,
    checkpointing: Annotated[bool, _opt("checkpointing", rich_help_panel="Speed and memory")] = DEFAULTS.checkpointing,
    share_casts: Annotated[
        bool, _opt("share_casts", negatable=True, rich_help_panel="Speed and memory")
    ] = DEFAULTS.share_casts,
    bf16_residual: Annotated[bool, _opt("bf16_residual", rich_help_panel="Speed and memory")] = DEFAULTS.bf16_residual,
    group_projections: Annotated[
        bool | None, _opt("group_projections", negatable=True, rich_help_panel="Speed and memory", show_default=False)
    ] = DEFAULTS.group_projections,
    cuda_graphs: Annotated[
        bool | None, _opt("cuda_graphs", negatable=True, rich_help_panel="Speed and memory", show_default=False)
    ] = DEFAULTS.cuda_graphs,
    eval: Annotated[int, _opt("eval", rich_help_panel="Checkpoints and logging")] = DEFAULTS.eval,
    eval_windows: Annotated[
        int, _opt("eval_windows", rich_help_panel="Checkpoints and logging")
    ] = DEFAULTS.eval_windows,
    save: Annotated[int, _opt("save", rich_help_panel="Checkpoints and logging")] = DEFAULTS.save,
    limit: Annotated[int, _opt("limit", rich_help_panel="Checkpoints and logging")] = DEFAULTS.limit,
    logging: Annotated[int, _opt("logging", rich_help_panel="Checkpoints and logging")] = DEFAULTS.logging,
    project: Annotated[str, _opt("project", rich_help_panel="Checkpoints and logging")] = DEFAULTS.project,
    tensorboard: Annotated[bool, _opt("tensorboard", rich_help_panel="Checkpoints and logging")] = DEFAULTS.tensorboard,
    seed: Annotated[int, _opt("seed", rich_help_panel="Checkpoints and logging")] = DEFAULTS.seed,
    max_bad_steps: Annotated[
        int, _opt("max_bad_steps", rich_help_panel="Checkpoints and logging")
    ] = DEFAULTS.max_bad_steps,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="With --checkpoint: continue it on other data than it was trained on (from its data position).",
            rich_help_panel="Checkpoints and logging",
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Resolve everything, print parameters, FLOPs/token, memory estimate, dataset tokens and epochs; "
            "do not train.",
        ),
    ] = False,
):
    """Train a model from a prepared dataset (from scratch from a config JSON, or on from a model dir).

    Example: flame train --model configs/gla_340M.json --cache data/HuggingFaceFW/fineweb-edu/sample-10BT/train
    --steps 20480 --batch 8 --context 2048 --path exp/gla-340M-10B
    """
    from flame import engine

    values = {k: v for k, v in locals().items() if k in DOCS}
    cfg = TrainConfig(**values)
    if dry_run:
        planned = engine.plan(cfg, world=_world())
        engine.check_run_dir(planned.cfg)  # what the real run would refuse, a dry run refuses too
        _render_plan(planned)
        return
    result = engine.train(cfg, force=force)
    if ui.is_main_process():
        _render_result(result)


def _world() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def _render_plan(p) -> None:
    gib = p.memory_gib
    table = ui.table(title=f"flame train --dry-run: {p.cfg.type}", show_header=False)
    rows = [
        ("model", f"{p.cfg.model} ({p.model_type}{', FLA' if p.is_fla else ''})"),
        ("parameters", f"{ui.human(p.params['total'])} total"),
        ("  embedding", ui.human(p.params["embedding"])),
        ("  non-embedding", ui.human(p.params["non_embedding"])),
        ("FLOPs per token", f"{ui.human(p.flops_per_token)} (training, at context {p.cfg.context})"),
        (
            "peak memory (est.)",
            f"{gib['total']:.2f} GiB per device (weights {gib['weights']:.2f}, grads {gib['grads']:.2f}, "
            f"optimizer {gib['optimizer']:.2f}, activations {gib['activations']:.2f}; {p.sharding}"
            + (f", sharded as ZeRO stage {p.zero_stage}" if p.zero_stage else "")
            + f"; {p.precision})",
        ),
        ("dataset", f"{ui.human(p.dataset_tokens)} tokens, {p.windows_per_epoch} windows of {p.cfg.context}"),
        (
            "batch",
            f"{p.cfg.batch} x {p.cfg.update} update x {p.world} processes = {ui.human(p.tokens_per_update)} "
            "tokens per update",
        ),
        ("steps", f"{p.steps} updates = {p.epochs:.3g} epochs, {ui.human(p.steps * p.tokens_per_update)} tokens"),
    ]
    if p.validation is not None:
        held_out = f"{p.eval_windows} windows of {p.cfg.context} held out"
        rows.append(("validation", f"every {p.cfg.eval} updates: {held_out}"))
    from flame import graphs

    rows.append(("CUDA graphs", graphs.described(p.cfg, p.sharding, p.machines)))
    options = changed_switches(dataclasses.asdict(p.cfg), SWITCHES)
    if options:
        rows.append(("options", ", ".join(options)))
    rows.append(("run dir", p.cfg.path))
    for k, v in rows:
        table.add_row(k, v)
    ui.console.print(table)


def _render_result(r) -> None:
    if r.checkpoint is None and r.stopped == "done":
        ui.console.print(f"already at step {r.step}: nothing to train (raise --steps to train further)")
        return
    how = {"done": "finished", "signal": "stopped on request"}[r.stopped]
    loss = "-" if r.loss is None else f"{r.loss:.4f}"
    first = "-" if r.first_loss is None else f"{r.first_loss:.4f}"
    # The updates' own losses, where the logged lines average each --logging window: said, so they are not compared.
    ui.console.print(
        f"{how} at step {r.step}: loss {first} (first update) -> {loss} (last update), {ui.human(r.tokens)} tokens",
        highlight=False,
    )
    if r.skipped:
        ui.console.print(f"{r.skipped} updates skipped (NaN/inf loss or gradient)")
    if r.checkpoint:
        ui.console.print(f"checkpoint: {r.checkpoint}")
        run, checkpoint = shlex.quote(str(r.run_dir)), shlex.quote(str(r.checkpoint))  # to paste into a shell
        ui.console.print(f"  continue:  flame resume {run} --steps MORE")
        ui.console.print(f"  inspect:   flame inspect {run}  /  flame inspect {checkpoint}")
        # flame.kernels first (it imports fla, which registers the model types): on a CPU FLA's Triton kernels cannot
        # run, and a model loaded without it fails at its first forward; on a GPU it puts flame's kernels in front.
        model = shlex.quote(
            "import flame.kernels; flame.kernels.install(); from transformers import AutoModelForCausalLM; "
            f"model = AutoModelForCausalLM.from_pretrained({json.dumps(str(r.checkpoint / 'model'))})"
        )
        ui.console.print(f"  load:      python -c {model}")
