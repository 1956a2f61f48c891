"""Errors a user can act on.

The engine raises a FlameError kind; the CLI prints it as one red line and exits 1 (`FLAME_DEBUG=1` shows the
traceback). The message names the problem; `fix` says what to do about it.
"""


class FlameError(Exception):
    """A problem with the user's input or environment, with the fix."""

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message}: {self.fix}" if self.fix else self.message


class ConfigError(FlameError):
    """An option or configuration value is wrong or inconsistent."""


class DataError(FlameError):
    """A corpus, dataset or tokenizer cannot be read or used."""


class ModelError(FlameError):
    """A model config or model dir cannot be built or loaded."""


class CheckpointError(FlameError):
    """A checkpoint or run dir is missing, incomplete or does not match."""


class OutputExistsError(FlameError):
    """An output path exists and would be overwritten."""


class TrainingError(FlameError):
    """Training cannot go on (e.g. the loss diverged); what was trained is saved first."""


def check_output_dir(output, inputs) -> None:
    """Refuse an --output that is a file, or that is or holds one of the inputs (--overwrite would delete them)."""
    from pathlib import Path

    out = Path(output).expanduser().resolve()
    for given in inputs:
        if given and Path(given).expanduser().exists():
            source = Path(given).expanduser().resolve()
            if source == out or out in source.parents:
                raise OutputExistsError(
                    f"--output {output} is, or holds, the input {given}", "give an --output outside the inputs"
                )
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--output {output} is a file", "give a folder for the output (flame creates it)")


def read_json_object(
    path,
    error: type[FlameError],
    fix: str,
    *,
    invalid: str = "is not valid JSON",
    not_object: str = "holds no JSON object",
    not_object_fix: str | None = None,
) -> dict:
    """Read a file that must hold a JSON object (a run config, trainer state, manifest, model config); one `error`
    naming the file when it does not: "{path} {invalid} (json's reason)" or "{path} {not_object}", with the fix."""
    import json
    from pathlib import Path

    try:
        value = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{path} {invalid} ({e})", fix) from e
    if not isinstance(value, dict):
        raise error(f"{path} {not_object}", not_object_fix or fix)
    return value


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, for one-line errors that quote a library's reason; its type name
    when the message is empty."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
