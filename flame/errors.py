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


def check_writable_dir(path, option: str) -> None:
    """A folder flame will create or write into must not be a file, lie under one, or be where nothing can be
    written (permissions, a read-only disk): one error naming `option`, before any work is done."""
    import os
    from pathlib import Path

    out = Path(path).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{option} {path} is a file", f"give a folder for {option} (flame creates it)")
    above = next(p for p in out.parents if p.exists())  # "/" at the latest
    if not out.exists() and not above.is_dir():
        raise OutputExistsError(f"{option} {path} lies under the file {above}", f"give a folder path for {option}")
    where = out if out.exists() else above
    if not os.access(where, os.W_OK) or where.parts[:2] in (("/", "proc"), ("/", "sys")):
        raise OutputExistsError(
            f"{option} {path}: cannot write in {where} (no permission, or a read-only disk)",
            f"give a {option} in a folder you can write to",
        )


def check_output_dir(
    output, inputs, *, overwrite: bool, replaces: tuple[str, ...], what: str, never: tuple[str, ...] = ()
) -> None:
    """Refuse an --output (one error naming the fix) that:
    - is a file, lies under one, or cannot be written (permissions, a read-only disk);
    - is, holds, or lies inside one of the inputs: --overwrite would delete them, or a later run would read the
      output as input;
    - exists, without --overwrite;
    - with --overwrite, is a folder holding files but none of `replaces` (what this command writes, e.g. a
      manifest.json), or any of `never` (what it does not write: a run dir's checkpoints/ beside its config.json):
      flame replaces its own outputs only, never a folder of the user's.
    `what` names the kind of output in that last message ("a prepared dataset")."""
    from pathlib import Path

    out = Path(output).expanduser().resolve()
    for given in inputs:
        if given and Path(given).expanduser().exists():
            source = Path(given).expanduser().resolve()
            if source == out or out in source.parents or (source.is_dir() and source in out.parents):
                raise OutputExistsError(
                    f"--output {output} is, holds, or lies inside the input {given}",
                    "give an --output outside the inputs",
                )
    check_writable_dir(output, "--output")
    if not out.exists():
        return
    if not overwrite:
        raise OutputExistsError(
            f"--output {output} exists", "pass --overwrite to replace it, or choose another --output"
        )
    here = Path.cwd().resolve()
    if out == here or out in here.parents:
        raise OutputExistsError(
            f"--output {output} is, or holds, the current folder, which --overwrite would replace under you",
            "run from outside it, or choose another --output",
        )
    if found := [name for name in never if (out / name).exists()]:
        raise OutputExistsError(
            f"--overwrite: {output} is not {what} (it holds {', '.join(found)}); flame replaces only what it wrote",
            "choose another --output, or remove that folder yourself",
        )
    if any(out.iterdir()) and not any((out / name).exists() for name in replaces):
        raise OutputExistsError(
            f"--overwrite: {output} is not {what} (no {' or '.join(replaces)} in it) and holds other files; flame "
            "replaces only what it wrote",
            "choose another --output, or remove that folder yourself",
        )


# What the machine, not flame or the input, refused: one error line with the fix, not a traceback.
_OS_FIXES = {
    "ENOSPC": "free space on that disk, or write to another one",
    "EDQUOT": "free space within your quota, or write to another disk",
    "EACCES": "give a path you can write to (or read, for an input)",
    "EPERM": "give a path you can write to (or read, for an input)",
    "EROFS": "give a path on a disk that is not read-only",
    "ENOTDIR": "a part of the path is a file: give a folder path",
}


def from_os_error(e: OSError) -> FlameError | None:
    """The FlameError for an OSError a user fixes on the machine (disk full, no permission, a read-only disk, a file
    where a folder should be), naming the path; None for the rest, which stay tracebacks (a bug, most likely)."""
    import errno

    name = errno.errorcode.get(e.errno or 0)
    if name not in _OS_FIXES:
        return None
    where = f": {e.filename}" if e.filename else ""
    return FlameError(f"{e.strerror or name}{where}", _OS_FIXES[name])


def disk_full(e: BaseException, where) -> FlameError | None:
    """The error line for a write that ran out of space, or None. Libraries written in Rust or C++ (safetensors,
    tokenizers) raise their own exception kinds with the OS's words in the message, not an OSError."""
    import errno

    text = str(e)
    if not (
        (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
        or "No space left on device" in text
        or "os error 28" in text
        or "Disk quota exceeded" in text
    ):
        return None
    return FlameError(f"no space left on the disk of {where}", _OS_FIXES["ENOSPC"])


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
