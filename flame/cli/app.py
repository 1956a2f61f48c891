"""The `flame` command: root app, command groups, and error handling.

    flame --help

A FlameError raised anywhere below becomes one red line on stderr and exit code 1; FLAME_DEBUG=1 shows the
traceback instead. Only commands that work are registered here.
"""

import os
import re
import warnings
from typing import Annotated

import typer
from typer.core import TyperGroup

try:  # typer 0.2x parses with its own copy of click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:
    from click.exceptions import NoArgsIsHelpError, UsageError

from flame import __version__, ui
from flame.cli import convert, data
from flame.cli import inspect as inspect_cli
from flame.cli import resume as resume_cli
from flame.cli import train as train_cli
from flame.errors import FlameError, from_os_error
from flame.ui import error_line


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Library warnings (FLA's RWKV notice, a deprecation) as one line naming where they come from, instead of
    Python's two with the source line; FLAME_DEBUG=1 keeps Python's format."""
    where = os.path.join(*filename.split(os.sep)[-3:]) if "site-packages" in filename else filename
    text = " ".join(str(message).split())
    return f"warning: {text} ({category.__name__}, {where}:{lineno})\n"


if os.environ.get("FLAME_DEBUG") != "1":
    warnings.formatwarning = one_line_warning


def _help_layout() -> None:
    """--help as a user reads it. Piped (`flame train --help | less`), rich would lay the help out 80 columns wide
    and cut paths and option names with an ellipsis; it gets 120 (TERMINAL_WIDTH still decides). typer 0.29 shows a
    flag's type (`--overwrite <bool>`), which reads as if it took a value (`--overwrite true` is an error); flags show
    none."""
    from typer import rich_utils
    from typer.core import TyperOption

    if rich_utils.MAX_WIDTH is None and not os.isatty(1):
        rich_utils.MAX_WIDTH = 120
    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is not None and not getattr(shown, "_flame", False):

        def display_type_rich(self, ctx):
            return None if getattr(self, "is_flag", False) else shown(self, ctx)

        display_type_rich._flame = True
        TyperOption.display_type_rich = display_type_rich


_help_layout()


class FlameGroup(TyperGroup):
    """Turns FlameError into one readable line. Lives on the click group so CliRunner tests see it too."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FlameError as e:
            if os.environ.get("FLAME_DEBUG") == "1":
                raise
            error_line(str(e))
            raise typer.Exit(1) from None
        except KeyboardInterrupt:  # Ctrl-C outside training (which saves and stops on its own): said, exit 130
            if os.environ.get("FLAME_DEBUG") == "1":
                raise
            if ui.is_main_process():  # under accelerate launch every process gets the signal
                error_line("interrupted (Ctrl-C): what was being written is removed, what was there before is kept")
            raise typer.Exit(130) from None
        except OSError as e:  # a full disk, no permission: the machine's refusal, with the path and the fix
            known = from_os_error(e)
            if known is None or os.environ.get("FLAME_DEBUG") == "1":
                raise
            error_line(str(known))
            raise typer.Exit(1) from None
        except UsageError as e:  # an unknown option or command, a value of the wrong type: click's exit 2
            if isinstance(e, NoArgsIsHelpError) or os.environ.get("FLAME_DEBUG") == "1":
                raise
            where = e.ctx.command_path if e.ctx else "flame"
            message = e.format_message().rstrip(".")
            launched = where.endswith((" train", " resume"))  # the old train.sh's knobs, now the launcher's
            if launched and re.search(r"No such option: --(gpus|nodes|num[_-]processes|nproc)\b", message):
                unknown = re.split(r" \(?Possible", message)[0]
                error_line(
                    f"{unknown}: the processes come from accelerate, e.g. `accelerate launch --num_processes 8 -m "
                    f"{where} ...` (README, Training: the train.sh table)"
                )
            else:
                error_line(f"{message}: see `{where} --help`")
            raise typer.Exit(2) from None


app = typer.Typer(
    name="flame",
    cls=FlameGroup,
    help="Train flash-linear-attention language models: prepare data, train, resume, convert, inspect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool):
    if value:
        typer.echo(f"flame {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
):
    """Train flash-linear-attention language models: prepare data, train, resume, convert, inspect."""


# Command groups. One line each; a module registers only commands that work.
app.add_typer(data.app, name="data")
app.add_typer(convert.app, name="convert")
app.command("train")(train_cli.train)
app.command("resume")(resume_cli.resume)
app.command("inspect")(inspect_cli.inspect)


def main():
    app()
