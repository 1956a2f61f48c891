"""`flame data`: prepare a tokenized dataset, or train a tokenizer offline.

flame data prepare --dataset HuggingFaceFW/fineweb-edu --name sample-10BT --split train --context_length 2048
flame data tokenizer corpus/ --vocab-size 32000 --output tokenizers/bpe-32k
"""

import time
from typing import Annotated

import typer

from flame import ui
from flame.data.prepare import PrepareConfig, prepare
from flame.data.tokenizer import DEFAULT_TOKENIZER, TokenizerConfig, train_tokenizer
from flame.errors import ConfigError

app = typer.Typer(
    name="data",
    help="Prepare tokenized datasets and build tokenizers.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)

PLAIN_EVERY_S = 10.0


def _val_docs(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"--val-docs takes a count (1000) or a fraction (0.01), got {value!r}") from None
    return int(number) if number >= 1 and number.is_integer() else number


class _Display:
    """Renders prepare's progress: a rich bar on a terminal, a plain line every few seconds elsewhere."""

    def __init__(self):
        self.bar = ui.progress(ui.RateColumn("docs", "docs"), ui.RateColumn("tokens", "tokens"))
        self.task = None
        self.started = time.time()
        self.last_line = 0.0
        self.stage = None
        self.baseline = None  # (time, done) of the first update with work done: the ETA's rate starts there

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.task is not None:
            self.bar.stop()

    def __call__(self, state) -> None:
        # Bytes are shown in MB (KB below 10 MB, where MB would read 0/0) so the done/total column stays readable.
        scale = (1e6 if (state.total or 0) >= 10e6 else 1e3) if state.unit == "B" else 1
        done, total = state.done / scale, (state.total / scale if state.total else None)
        unit = {1e6: "MB", 1e3: "KB"}.get(scale, "docs")
        label = f"{state.stage} ({unit})"
        if self.task is None:
            # Started on the first update, after prepare has forked its workers: rich's refresh thread should not
            # exist at fork time (a forked child inherits locks, never the threads holding them).
            self.bar.start()
            self.task = self.bar.add_task(label, total=total, docs=0, tokens=0)
        self.bar.update(self.task, description=label, completed=done, total=total, docs=state.docs, tokens=state.tokens)
        if self.bar.disable:
            self._plain(state, done, total)

    def _plain(self, state, done, total) -> None:
        now = time.time()
        if now - self.last_line < PLAIN_EVERY_S and state.stage == self.stage:
            return
        self.last_line, self.stage = now, state.stage
        elapsed = max(now - self.started, 1e-9)
        line = f"{state.stage}: {ui.human(state.docs)} docs, {ui.human(state.tokens)} tokens"
        line += f", {ui.human(state.docs / elapsed)} docs/s, {ui.human(state.tokens / elapsed)} tokens/s"
        if self.baseline is None and done:
            self.baseline = (now, done)
        if total and done:
            line += f", {100 * done / total:.0f}%"
            # The rate since the first work done: the start (the tokenizer's load, the workers' start) is no rate
            t0, done0 = self.baseline
            if done > done0:
                eta = max(0.0, (now - t0) * (total - done) / (done - done0))
                line += f", ETA {int(eta // 60)}m{int(eta % 60):02d}s"
        if ui.is_main_process():
            ui.err_console.print(line)


@app.command("prepare")
def prepare_command(
    dataset: Annotated[
        str,
        typer.Option(
            help="Hub dataset id, or a local folder, file or glob of .jsonl, .jsonl.zst, .json, .parquet, .txt, "
            ".csv (e.g. a git-lfs clone of SlimPajama-627B/train)."
        ),
    ],
    name: Annotated[str | None, typer.Option(help="Hub dataset config name, e.g. sample-10BT.")] = None,
    split: Annotated[str, typer.Option(help="Hub dataset split (for local files only a label in the path).")] = "train",
    context_length: Annotated[
        int,
        typer.Option(
            "--context_length",
            "--context-length",
            help="Default training context, recorded in the manifest (packing happens at training time).",
        ),
    ] = 2048,
    output: Annotated[
        str | None, typer.Option(help="Output folder. Default: data/{dataset}/{name}/{split}.", show_default=False)
    ] = None,
    tokenizer: Annotated[
        str, typer.Option(help="Hub id or local dir; `flame data tokenizer` builds one offline.")
    ] = DEFAULT_TOKENIZER,
    column: Annotated[str | None, typer.Option(help="Text column. Default: text or content.")] = None,
    streaming: Annotated[bool, typer.Option(help="Stream a hub dataset instead of downloading it first.")] = False,
    val_docs: Annotated[
        str | None,
        typer.Option(
            help="Held-out validation documents: a count (1000) or a fraction (0.01); 0 for none. "
            "Default: 1% of the documents, at most 1000.",
            show_default=False,
        ),
    ] = None,
    num_proc: Annotated[
        int | None, typer.Option(help="Tokenizer processes. Default: all cores.", show_default=False)
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the validation draw.")] = 42,
):
    """Tokenize raw text into a prepared dataset (documents whole, EOS appended) for `flame train`.

    [b]Examples[/b]

      flame data prepare --dataset HuggingFaceFW/fineweb-edu --name sample-10BT --split train --context_length 2048

      flame data prepare --dataset /data/SlimPajama-627B/train --tokenizer tokenizers/bpe-32k
    """
    config = PrepareConfig(
        dataset=dataset,
        name=name,
        split=split,
        context_length=context_length,
        output=output,
        tokenizer=tokenizer,
        column=column,
        streaming=streaming,
        val_docs=_val_docs(val_docs),
        num_proc=num_proc,
        overwrite=overwrite,
        seed=seed,
    )
    with _Display() as display:
        result = prepare(config, on_progress=display)
    manifest = result.manifest
    table = ui.table(title=f"prepared {result.output}", title_justify="left")
    table.add_column("split")
    table.add_column("documents", justify="right")
    table.add_column("tokens", justify="right")
    for split_name, counts in manifest["splits"].items():
        table.add_row(split_name, f"{counts['documents']:,}", f"{counts['tokens']:,}")
    ui.print0(table)
    source = manifest["source"]
    tok = manifest["tokenizer"]
    ui.print0(
        f"column {source['column']!r}, tokenizer {tok['name_or_path']} (vocab {tok['vocab_size']:,}, "
        f"eos {tok['eos_token_id']}), {manifest['settings']['num_proc']} "
        f"process{'es' if manifest['settings']['num_proc'] != 1 else ''}, "
        f"{manifest['settings']['tokenize_seconds']:.1f}s tokenizing"
    )
    if manifest["settings"]["skipped_empty"]:
        ui.warn(f"skipped {manifest['settings']['skipped_empty']:,} empty documents (empty, null or missing text)")
    for note in result.notes:
        ui.warn(note)


@app.command("tokenizer")
def tokenizer_command(
    inputs: Annotated[
        list[str], typer.Argument(help="Local folders, files or globs of text (same formats as prepare).")
    ],
    output: Annotated[str, typer.Option(help="Folder to write; use it as `prepare --tokenizer`.")],
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size, special tokens included.")] = 32000,
    column: Annotated[str | None, typer.Option(help="Text column. Default: text or content.")] = None,
    max_docs: Annotated[int | None, typer.Option(help="Train on the first N documents only.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
):
    """Train a byte-level BPE tokenizer offline (EOS <|endoftext|>), loadable by AutoTokenizer.

    [b]Example[/b]

      flame data tokenizer corpus/ --vocab-size 32000 --output tokenizers/bpe-32k
    """
    config = TokenizerConfig(
        inputs=inputs,
        output=output,
        vocab_size=vocab_size,
        column=column,
        max_docs=max_docs,
        overwrite=overwrite,
    )
    # The tokenizers trainer draws its own progress bars (counting, merging) on a terminal.
    result = train_tokenizer(config, show_progress=ui.interactive())
    ui.print0(
        f"tokenizer {result['output']}: vocab {result['vocab_size']:,}, eos {result['eos_token']}, "
        f"trained on {result['documents']:,} documents"
    )
