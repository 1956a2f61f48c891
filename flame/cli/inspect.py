"""`flame inspect PATH`: what a model config, model dir, prepared dataset, checkpoint or run dir holds.

    flame inspect configs/gla_340M.json --context 4096 --batch 16 --zero-stage 2 --world-size 8
    flame inspect data/HuggingFaceFW/fineweb-edu/sample-10BT/train
    flame inspect exp/gla-340M-10B/checkpoints/step-00020480
    flame inspect exp/gla-340M-10B --plot loss.png
    flame inspect exp/gla-340M-10B --json | jq .loss

The facts come from flame.inspect.inspect(); this module only draws them (tables, a histogram, a loss chart).
A checkpoint that fails its integrity check or a dataset that disagrees with its manifest exits 1 after the report.
"""

import json
import math
import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.panel import Panel
from rich.text import Text

from flame import ui
from flame.cli import changed_switches, flag
from flame.errors import CheckpointError, DataError
from flame.inspect import (
    CheckpointFacts,
    DatasetFacts,
    InspectOptions,
    ModelFacts,
    RunFacts,
    as_dict,
    option_docs,
)
from flame.inspect import inspect as inspect_path

DOCS = option_docs()
DEFAULTS = InspectOptions()
# Eighth blocks, empty to full: a chart cell shows a value to 1/8 of a row.
BLOCKS = " \u2581\u2582\u2583\u2584\u2585\u2586\u2587\u2588"
CHART_WIDTH, CHART_HEIGHT, BAR_WIDTH, TOP_TENSORS = 64, 10, 40, 8


def _opt(name: str, panel: str, *, negatable: bool = False, **kwargs):
    names = f"{flag(name)}/{flag(name, on=False)}" if negatable else flag(name)
    return typer.Option(names, help=DOCS[name], rich_help_panel=panel, **kwargs)


def inspect(
    path: Annotated[str, typer.Argument(help="Model config JSON, model dir, prepared dataset, checkpoint or run dir.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print the facts as JSON (for scripts).")] = False,
    context: Annotated[int | None, _opt("context", "Model estimates", show_default=False)] = DEFAULTS.context,
    batch: Annotated[int | None, _opt("batch", "Model estimates", show_default=False)] = DEFAULTS.batch,
    update: Annotated[int | None, _opt("update", "Model estimates", show_default=False)] = DEFAULTS.update,
    precision: Annotated[str | None, _opt("precision", "Model estimates", show_default=False)] = DEFAULTS.precision,
    zero_stage: Annotated[int, _opt("zero_stage", "Model estimates")] = DEFAULTS.zero_stage,
    world_size: Annotated[int, _opt("world_size", "Model estimates")] = DEFAULTS.world_size,
    checkpointing: Annotated[bool, _opt("checkpointing", "Model estimates")] = DEFAULTS.checkpointing,
    share_casts: Annotated[
        bool | None, _opt("share_casts", "Model estimates", negatable=True, show_default=False)
    ] = DEFAULTS.share_casts,
    bf16_residual: Annotated[bool, _opt("bf16_residual", "Model estimates")] = DEFAULTS.bf16_residual,
    deepspeed: Annotated[bool, _opt("deepspeed", "Model estimates")] = DEFAULTS.deepspeed,
    fsdp: Annotated[bool, _opt("fsdp", "Model estimates")] = DEFAULTS.fsdp,
    sample: Annotated[int, _opt("sample", "Dataset")] = DEFAULTS.sample,
    sample_chars: Annotated[int, _opt("sample_chars", "Dataset")] = DEFAULTS.sample_chars,
    plot: Annotated[str | None, _opt("plot", "Run", metavar="FILE.png", show_default=False)] = DEFAULTS.plot,
):
    """Show what PATH is: a model config / model dir, a prepared dataset, a checkpoint or a run dir.

    Example: flame inspect exp/gla-340M-10B --plot loss.png
    """
    options = InspectOptions(
        context=context,
        batch=batch,
        update=update,
        precision=precision,
        zero_stage=zero_stage,
        world_size=world_size,
        checkpointing=checkpointing,
        share_casts=share_casts,
        bf16_residual=bf16_residual,
        deepspeed=deepspeed,
        fsdp=fsdp,
        sample=sample,
        sample_chars=sample_chars,
        plot=plot,
    )
    with ui.progress(ui.RateColumn(unit="tensors")) as bar:
        task = None

        def on_progress(done: int, total: int) -> None:
            nonlocal task
            if task is None:
                task = bar.add_task("reading weights", total=total)
            bar.update(task, completed=done)

        facts = inspect_path(path, options, on_progress=on_progress)

    if json_output:
        typer.echo(json.dumps(as_dict(facts), indent=2))
    elif isinstance(facts, ModelFacts):
        render_model(facts)
    elif isinstance(facts, DatasetFacts):
        render_dataset(facts)
    elif isinstance(facts, CheckpointFacts):
        render_checkpoint(facts)
    else:
        render_run(facts)

    if isinstance(facts, CheckpointFacts) and not facts.ok:
        failed = [f"{c.name}: {c.detail}" for c in facts.checks if not c.ok]
        raise CheckpointError(
            f"checkpoint {facts.path} failed its integrity check ({'; '.join(failed)})",
            "resume from an older checkpoint of the run (flame inspect RUN lists them)",
        )
    if isinstance(facts, DatasetFacts) and facts.problems:
        fix = "prepare it again with flame data prepare"
        raise DataError(f"dataset {facts.path}: {'; '.join(facts.problems)}", fix)


# ---------------------------------------------------------------------------------------------------------------
# Pictures in the terminal (pure functions of their inputs, so tests pin them)


def histogram_lines(edges: list[int], counts: list[int], width: int = BAR_WIDTH) -> list[str]:
    """One bar per bin, '[lo, hi)  count  ####', scaled so the largest bin is `width` blocks."""
    top = max(counts, default=0)
    label_width = max((len(f"{lo}-{hi - 1}") for lo, hi in zip(edges, edges[1:], strict=False)), default=0)
    count_width = max((len(str(c)) for c in counts), default=0)
    lines = []
    for lo, hi, count in zip(edges, edges[1:], counts, strict=False):
        eighths = round(8 * width * count / top) if top else 0
        bar = BLOCKS[8] * (eighths // 8) + (BLOCKS[eighths % 8] if eighths % 8 else "")
        if count and not bar:
            bar = BLOCKS[1]  # a bin that holds any document shows
        lines.append(f"{f'{lo}-{hi - 1}':>{label_width}}  {count:>{count_width}}  {bar}")
    return lines


def chart_lines(xs: list[float], ys: list[float | None], width: int = CHART_WIDTH, height: int = CHART_HEIGHT):
    """A filled line chart of ys against xs: each of `width` columns is the mean of the points that fall in it,
    its height in eighths of a row between the lowest and highest column. None / NaN points are left out."""
    points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and math.isfinite(y)]
    if not points:
        return []
    x0, x1 = points[0][0], points[-1][0]
    if len(points) <= width:  # one column per point
        width, columns = len(points), [[y] for _, y in points]
    else:  # columns are equal spans of x: logging intervals may change when a run is resumed
        columns = [[] for _ in range(width)]
        for x, y in points:
            columns[min(width - 1, int((x - x0) / (x1 - x0) * width))].append(y)
    means = [sum(c) / len(c) if c else None for c in columns]
    known = [m for m in means if m is not None]
    lo, hi = min(known), max(known)
    levels = height * 8
    # a flat curve draws at half height; otherwise the lowest column is one eighth, the highest full
    scaled = [
        None if m is None else (levels // 2 if hi == lo else 1 + round((m - lo) / (hi - lo) * (levels - 1)))
        for m in means
    ]
    label = max(len(f"{hi:.4g}"), len(f"{lo:.4g}"))
    rows = []
    for r in range(height):
        floor = (height - 1 - r) * 8
        cells = "".join(" " if s is None else BLOCKS[max(0, min(8, s - floor))] for s in scaled)
        tick = f"{hi:.4g}" if r == 0 else f"{lo:.4g}" if r == height - 1 else ""
        rows.append(f"{tick:>{label}} |{cells}")
    left, right = f"step {x0:g}", f"{x1:g}"
    rows.append(" " * (label + 2) + left + right.rjust(max(len(right) + 1, width - len(left))))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Renderers


def _facts_table(title: str, rows: list[tuple[str, str]]):
    table = ui.table(title=title, show_header=False, title_justify="left", title_style="bold")
    table.add_column(style="cyan", no_wrap=True)
    table.add_column(overflow="fold")  # paths whole, to copy
    for key, value in rows:
        table.add_row(key, value)
    return table


def _relative(path: str, root: str) -> str:
    return str(Path(path).relative_to(root)) if Path(path).is_relative_to(root) else path


def _count(n: int | None) -> str:
    """1.23M (1,234,567); below 1,000 the number once ("100", not "100 (100)")."""
    return "-" if n is None else f"{n:,}" if abs(n) < 1000 else f"{ui.human(n)} ({n:,})"


def _num(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _model_rows(f: ModelFacts) -> list[tuple[str, str]]:
    p = f.params
    return [
        ("model_type", f"{f.model_type} ({f.architecture}, {'FLA' if f.fla else 'transformers'})"),
        ("layers x hidden", f"{f.layers} x {f.hidden}"),
        ("heads", str(f.heads)),
        ("vocab", f"{f.vocab_size}" + (" (tied embeddings)" if f.tied_embeddings else "")),
        ("parameters", _count(p["total"])),
        ("  embedding", _count(p["embedding"])),
        ("  non-embedding", _count(p["non_embedding"])),
    ]


def render_model(f: ModelFacts) -> None:
    kind = "model dir (weights)" if f.has_weights else "model config"
    rows = [("path", f"{f.path}  [{kind}]"), *_model_rows(f)]
    fl = f.flops
    mixers = ", ".join(f"{n} x {k}" for k, n in fl["mixers"].items()) or "none counted"
    rows += [
        (f"FLOPs/token @ {f.context}", f"{ui.human(f.flops_per_token)} (training: forward + backward, as MFU counts)"),
        ("  matmul (6 N)", f"{ui.human(fl['matmul'])} (N = {ui.human(fl['n_matmul'])} matmul weights)"),
        ("  token mixers", f"{ui.human(fl['mixer'])} ({mixers})"),
    ]
    if fl["unknown_mixers"]:
        rows.append(("  not counted", ", ".join(fl["unknown_mixers"]) + " (FLOPs are a lower bound)"))
    ui.console.print(_facts_table(f"{f.model_type} model", rows))
    ui.console.print(_memory_table(f.memory))


def _memory_table(m: dict):
    """The memory estimate's parts, titled with the settings it assumes (a checkpoint's: those of its run)."""
    title = (
        f"estimated peak training memory per device: batch {m['batch']} x context {m['context']}, {m['precision']}, "
        f"ZeRO stage {m['zero_stage']} over {m['world_size']} device(s), update {m['update']}"
    )
    title += "".join(f", {f}" for f in changed_switches(m, ("checkpointing", "share_casts", "bf16_residual")))
    title += ", as DeepSpeed trains" if m.get("deepspeed") else ", as FSDP trains" if m.get("fsdp") else ""
    table = ui.table(title=title, title_justify="left", title_style="bold")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    for part in ("weights", "grads", "optimizer", "activations"):
        table.add_row(part, f"{m[f'{part}_gib']:.2f}")
    table.add_row("total (peak)", f"{m['total_gib']:.2f}", style="bold")
    return table


def render_dataset(f: DatasetFacts) -> None:
    s, t = f.source, f.tokenizer
    where = s.get("dataset", "?") + (f" ({s['name']})" if s.get("name") else "")
    rows = [
        ("path", f.path),
        ("source", f"{s.get('kind', '?')} {where}, split {s.get('split')}, column {s.get('column')}" if s else "-"),
        (
            "tokenizer",
            f"{t.get('name_or_path')} (vocab {t.get('vocab_size')}, EOS {t.get('eos_token_id')})" if t else "-",
        ),
        ("documents", _count(f.documents)),
        ("tokens", f"{_count(f.tokens)} (each document with its EOS)"),
        ("context_length", str(f.context_length)),
        ("created", f.created or "-"),
    ]
    ui.console.print(_facts_table("prepared dataset", rows))

    splits = ui.table(title="splits", title_justify="left", title_style="bold")
    for col in ("split", "documents", "tokens", "tokens/doc", "manifest"):
        splits.add_column(col, justify="left" if col in ("split", "manifest") else "right")
    for name, v in f.splits.items():
        agrees = f.manifest_splits.get(name) == v
        mark = Text("agrees", "green") if agrees else Text(f"says {f.manifest_splits.get(name)}", "red")
        per_doc = f"{v['tokens'] / v['documents']:.1f}" if v["documents"] else "-"
        splits.add_row(name, f"{v['documents']:,}", f"{v['tokens']:,}", per_doc, mark)
    ui.console.print(splits)

    if f.lengths:
        L = f.lengths
        title = (
            f"{f.sample['split']} document lengths (tokens): min {L['min']}, median {L['median']:.0f}, "
            f"mean {L['mean']:.1f}, p99 {L['p99']:.0f}, max {L['max']}"
        )
        ui.console.print(Text(title, style="bold"))
        ui.console.print("\n".join(histogram_lines(f.histogram["edges"], f.histogram["counts"])))
    sm = f.sample
    if sm["text"] is not None:
        more = " ..." if sm["truncated"] else ""
        title = f"sample: {sm['split']}[{sm['index']}], {sm['tokens']} tokens"
        ui.console.print(Panel(Text(sm["text"] + more), title=title, title_align="left"), soft_wrap=False)
    # f.problems: the error line after the tables names them, once


def render_checkpoint(f: CheckpointFacts) -> None:
    st = f.state
    loss = _num(f.loss) + (f" (logged at step {f.loss_step})" if f.loss_step is not None and f.loss is not None else "")
    rows = [
        ("path", f.path),
        ("step", "-" if f.step is None else f"{f.step:,}"),
        ("tokens seen", _count(f.tokens)),
        ("loss at save", loss),
        (
            "trained on",
            f"batch {st.get('batch')} x update {st.get('update')} x {st.get('world')} process(es)"
            + (f" ({st['setup']})" if st.get("setup") else "")
            + ", "
            f"{_duration(st.get('elapsed'))}"
            if st
            else "-",
        ),
        ("skipped updates", str(st.get("skipped", "-"))),
    ]
    c = f.config
    if c:
        rows += [
            (
                "run",
                f"{c.get('type')}: lr {c.get('lr')} {c.get('scheduler')}, warmup {c.get('warmup')}, "
                f"steps {c.get('steps') or 'by epochs'}, context {c.get('context')}",
            ),
            ("data", str(c.get("cache"))),
        ]
    if f.model:
        rows += _model_rows(f.model)
    ui.console.print(_facts_table("checkpoint", rows))
    if f.model:
        ui.console.print(_memory_table(f.model.memory))

    stats = f.stats
    ui.console.print(
        Text.assemble(
            ("weights", "bold"),
            f": {stats['tensors']} tensors, {_count(stats['params'])} values, "
            f"global L2 norm {_num(stats['norm'])}, max |x| {_num(stats['max_abs'])}, "
            f"NaN {stats['nan']}, inf {stats['inf']}",
        )
    )
    shown = sorted(f.tensors, key=lambda t: -t.norm if math.isfinite(t.norm) else -math.inf)[:TOP_TENSORS]
    shown += [t for t in f.tensors if (t.nan or t.inf) and t not in shown]
    if shown:
        table = ui.table(title=f"largest norms (of {len(f.tensors)}) and any tensor with NaN/inf", title_justify="left")
        for col in ("tensor", "shape", "dtype", "norm", "max |x|", "NaN", "inf"):
            left = col in ("tensor", "shape", "dtype")
            table.add_column(col, justify="left" if left else "right", overflow="fold" if left else "ellipsis")
        for t in shown:
            style = "red" if t.nan or t.inf else None
            table.add_row(
                t.name,
                "x".join(map(str, t.shape)),
                t.dtype,
                _num(t.norm),
                _num(t.max_abs),
                str(t.nan),
                str(t.inf),
                style=style,
            )
        ui.console.print(table)

    checks = ui.table(title="integrity", title_justify="left", title_style="bold")
    checks.add_column("check")
    checks.add_column("result")
    checks.add_column("detail")
    for check in f.checks:
        checks.add_row(check.name, Text("ok", "green") if check.ok else Text("FAILED", "bold red"), check.detail)
    ui.console.print(checks)


def _first_step(first: dict) -> str:
    """'418.6 s (autotuned 18 kernel/shape pairs, 400 configs, 366 s compiling; not in tokens/s)'."""
    tuned = ""
    if first.get("kernels_tuned"):
        tuned = (
            f"autotuned {first['kernels_tuned']} kernel/shape pairs, {first.get('configs_benchmarked', '?')} configs"
        )
        tuned += f", {first['compile_s']:.0f} s compiling; " if first.get("compile_s") is not None else "; "
    return f"{first['seconds']:.1f} s ({tuned}not in tokens/s)"


def _cuda_graph(graph: dict) -> str:
    if "failure" in graph:
        return f"update {graph.get('update')} could not be captured ({graph['failure']}): trained eagerly"
    return f"update {graph.get('update')} captured in {graph.get('capture_s', 0):.1f} s, replayed since"


def _sinks(logged_to: dict) -> list[str]:
    sinks = ["metrics.jsonl"]
    if "wandb" in logged_to:
        sinks.append(f"wandb (run id {logged_to['wandb']})")
    if "tensorboard" in logged_to:
        sinks.append(f"TensorBoard (tensorboard --logdir {shlex.quote(logged_to['tensorboard'])})")
    return sinks


def render_run(f: RunFacts) -> None:
    c = f.config
    pct = f" ({100 * f.step / f.steps:.1f}%)" if f.steps else ""
    progress = f"step {f.step:,} of {f.steps:,}{pct}" if f.steps else f"step {f.step:,} (total unknown)"
    status = "finished" if f.finished else f"ETA {_duration(f.eta_s)}"
    if f.updated_s_ago is not None and not f.finished:
        status += f" (last logged {_duration(f.updated_s_ago)} ago)"
    mfu = "-" if f.mfu is None else f"{100 * f.mfu:.1f}%"
    rows = [
        ("path", f.path),
        ("run", f"{c.get('type', '-')}: model {c.get('model', '-')}, data {c.get('cache', '-')}"),
        ("progress", f"{progress}, {status}"),
        ("tokens", _count(f.tokens)),
        ("loss", _num(f.loss)),
        *([("validation loss", f"{_num(f.val_loss)} (step {f.val_loss_step})")] if f.val_loss is not None else []),
        ("lr", _num(f.lr, ".3e")),
        ("grad norm", _num(f.grad_norm, ".3f")),
        ("throughput", f"{ui.human(f.tokens_per_s)} tokens/s, MFU {mfu}" if f.tokens_per_s is not None else "-"),
        ("memory", f"{_num(f.memory_gib, '.2f')} GiB peak"),
        ("time", _duration(f.elapsed_s)),
        *([("first step", _first_step(f.first_step))] if f.first_step else []),
        *([("CUDA graph", _cuda_graph(f.cuda_graph))] if f.cuda_graph else []),
        *(
            [("kernel tuning", f"{f.tuning_results} FLA autotune results in tuning/ (a resume elsewhere reuses them)")]
            if f.tuning_results
            else []
        ),
        ("logged to", ", ".join(_sinks(f.logged_to))),
    ]
    if f.model:
        rows.append(
            (
                "model",
                f"{f.model.model_type}, {f.model.layers} x {f.model.hidden}, "
                f"{ui.human(f.model.params['total'])} parameters",
            )
        )
    ui.console.print(_facts_table("run", rows))

    table = ui.table(title="checkpoints", title_justify="left", title_style="bold")
    table.add_column("step", justify="right")
    table.add_column("size", justify="right")
    table.add_column("path (in the run dir)", overflow="fold")
    for cp in f.checkpoints:
        table.add_row(f"{cp['step']:,}", f"{cp['bytes'] / 2**20:.1f} MiB", _relative(cp["path"], f.path))
    for path in f.incomplete:
        table.add_row("-", "-", Text(f"{_relative(path, f.path)} (incomplete, ignored by resume)", "yellow"))
    if f.checkpoints or f.incomplete:
        ui.console.print(table)
    else:
        ui.console.print("no checkpoints yet")

    lines = chart_lines(f.curve["step"], f.curve["loss"])
    if lines:
        ui.console.print(Text("loss", style="bold"))
        ui.console.print("\n".join(lines))
    if f.plot:
        ui.console.print(f"wrote loss and learning-rate curves to {f.plot}")
