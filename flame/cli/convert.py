"""`flame convert`: start FLA models from other checkpoints.

    flame convert from-llama --model mistralai/Mistral-7B-v0.1 --config configs/gla_7B_mistral.json \\
        --output converted/gla-7B
"""

from pathlib import Path
from typing import Annotated

import typer

from flame import ui
from flame.config import field_docs
from flame.convert import ConvertOptions, ConvertReport, DType, VocabPolicy, convert_from_llama

app = typer.Typer(name="convert", help="Start FLA models from other checkpoints.", no_args_is_help=True)


_HELP = field_docs(ConvertOptions)


@app.command("from-llama")
def from_llama(
    model: Annotated[str, typer.Option("--model", help=_HELP["model"], show_default=False)],
    config: Annotated[Path, typer.Option("--config", help=_HELP["config"], show_default=False)],
    output: Annotated[Path, typer.Option("--output", help=_HELP["output"], show_default=False)],
    dtype: Annotated[DType | None, typer.Option("--dtype", help=_HELP["dtype"], show_default=False)] = None,
    vocab: Annotated[VocabPolicy, typer.Option("--vocab", help=_HELP["vocab"])] = VocabPolicy.source,
    allow_partial: Annotated[bool, typer.Option("--allow-partial", help=_HELP["allow_partial"])] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=_HELP["overwrite"])] = False,
    seed: Annotated[int, typer.Option("--seed", help=_HELP["seed"])] = 0,
):
    """Initialise an FLA model from a Llama, Mistral or Qwen2 checkpoint.

    Copies the embeddings, norms, q/k/v/o, MLP and LM head; FLA's own parameters (gates, convolutions, ...) keep
    their initialisation.

    [bold]Examples[/bold]

      flame convert from-llama --model mistralai/Mistral-7B-v0.1 --config configs/gla_7B_mistral.json
      --output converted/gla-7B

      flame convert from-llama --model ./llama-1b --config my_gdn.json --output converted/gdn --dtype bfloat16
    """
    opts = ConvertOptions(
        model=model,
        config=config,
        output=output,
        dtype=dtype,
        overwrite=overwrite,
        allow_partial=allow_partial,
        vocab=vocab,
        seed=seed,
    )
    render(convert_from_llama(opts))


def render(report: ConvertReport) -> None:
    if not ui.is_main_process():
        return
    table = ui.table(title=f"{report.source} ({report.source_architecture}) -> {report.target_type}, {report.dtype}")
    table.add_column("parameters")
    table.add_column("tensors", justify="right")
    table.add_column("count", justify="right")
    table.add_column("share", justify="right")
    for kind, (tensors, params) in report.counts.items():
        table.add_row(kind, str(tensors), ui.human(params), f"{100 * params / report.total_params:.2f}%")
    table.add_row("total", str(sum(t for t, _ in report.counts.values())), ui.human(report.total_params), "100.00%")
    ui.console.print(table)
    sections = (
        ("newly initialised", report.new),
        ("reshaped", report.reshaped),
        ("dropped from the source (--allow-partial)", report.dropped),
        ("config values taken from the source", [f"{k}: {old} -> {new}" for k, old, new in report.config_changes]),
    )
    for title, lines in sections:
        if lines:
            ui.console.print(f"{title}:")
            for line in lines:
                ui.console.print(f"  {line}")
    tokenizer = ", ".join(report.tokenizer_files) or "none found in the source"
    ui.console.print(f"tokenizer: {tokenizer}")
    ui.console.print(f"verified: {report.verified} written tensors equal their source (read back after saving)")
    ui.console.print(f"wrote {report.output}")
