"""Console output shared by every command: rank-0 only, rich on a terminal, plain lines elsewhere."""

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

# stderr for diagnostics and progress, stdout for results a script may read (tables, --json).
# markup off: printed strings carry user paths and labels ("data[1]", "[model config]"), never rich markup
console = Console(highlight=False, soft_wrap=True, markup=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


def table(*args, **kwargs) -> Table:
    """A rich Table, ruled with box-drawing characters on a terminal; off one (a pipe, a file) plain columns
    separated by spaces, which grep and awk read as they are."""
    if not console.is_terminal:
        kwargs = {"box": None, "pad_edge": False} | kwargs
    return Table(*args, **kwargs)


def is_main_process() -> bool:
    """True on rank 0 (or when not distributed): only rank 0 prints."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def interactive() -> bool:
    """True when progress bars make sense: a terminal, not --quiet, rank 0."""
    return err_console.is_terminal and is_main_process() and os.environ.get("FLAME_QUIET") != "1"


def print0(*args, **kwargs) -> None:
    """Print on rank 0 only (nanoGPT's print0). While a progress display is live on a terminal, above it: rich
    draws the display on stderr and would not see a line written to stdout, which then ran into the bar."""
    if not is_main_process():
        return
    if _LIVE and console.is_terminal:
        _LIVE[-1].console.print(*args, **kwargs)
    else:
        console.print(*args, **kwargs)


def warn(message: str) -> None:
    if is_main_process():
        err_console.print(Text.assemble(("warning: ", "yellow"), message))


def error_line(message: str) -> None:
    err_console.print(Text.assemble(("error: ", "bold red"), (message, "red")))


class RateColumn(ProgressColumn):
    """Items per second of one task field, e.g. docs/s or tokens/s."""

    def __init__(self, field: str | None = None, unit: str = "it"):
        super().__init__()
        self.field, self.unit = field, unit

    def render(self, task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        if not elapsed:
            return Text(f"- {self.unit}/s", style="progress.data.speed")
        done = task.fields.get(self.field, 0) if self.field else task.completed
        return Text(f"{human(done / elapsed)} {self.unit}/s", style="progress.data.speed")


_LIVE: list[Progress] = []  # the progress displays now live, innermost last


class _Progress(Progress):
    """Progress that says when it is live, so print0 can print above it."""

    def start(self) -> None:
        super().start()
        if not self.disable:
            _LIVE.append(self)

    def stop(self) -> None:
        if self in _LIVE:
            _LIVE.remove(self)
        super().stop()


def progress(*extra_columns: ProgressColumn) -> Progress:
    """A rich progress display with rate and ETA; disabled (callers print plain lines) when not interactive."""
    return _Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
        disable=not interactive(),
    )


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() or abs(n) >= 10 else f"{n:.2f}"


def flush() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
