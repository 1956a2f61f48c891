from typer.testing import CliRunner

from flame import __version__
from flame.cli.app import FlameGroup, app
from flame.errors import DataError

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"flame {__version__}"


def test_help_lists_description():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "flash-linear-attention" in result.output


def test_flame_error_is_one_line_and_exit_1(monkeypatch):
    import typer

    boom = typer.Typer(cls=FlameGroup)

    @boom.command()
    def fail():
        raise DataError("no documents in x.jsonl", "give a file with a 'text' column")

    @boom.command()
    def other():
        pass

    monkeypatch.delenv("FLAME_DEBUG", raising=False)
    result = runner.invoke(boom, ["fail"])
    assert result.exit_code == 1
    assert result.output.strip() == "error: no documents in x.jsonl: give a file with a 'text' column"
    assert "Traceback" not in result.output

    monkeypatch.setenv("FLAME_DEBUG", "1")
    result = runner.invoke(boom, ["fail"])
    assert isinstance(result.exception, DataError)


def test_a_full_disk_or_no_permission_is_one_line_naming_the_path_and_a_bug_stays_a_traceback(monkeypatch):
    import errno
    import os

    import typer

    boom = typer.Typer(cls=FlameGroup)
    raised = {}

    @boom.command()
    def fail():
        raise raised["e"]

    @boom.command()
    def other():
        pass

    monkeypatch.delenv("FLAME_DEBUG", raising=False)
    for e, line in [
        (
            OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/run/checkpoints/step-00000100"),
            "error: No space left on device: /data/run/checkpoints/step-00000100: free space on that disk, or write "
            "to another one",
        ),
        (
            PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/shared/out"),
            "error: Permission denied: /shared/out: give a path you can write to (or read, for an input)",
        ),
        (
            NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), "notes.txt/sub"),
            "error: Not a directory: notes.txt/sub: a part of the path is a file: give a folder path",
        ),
    ]:
        raised["e"] = e
        result = runner.invoke(boom, ["fail"])
        assert result.exit_code == 1 and result.output.strip() == line
    raised["e"] = KeyboardInterrupt()
    result = runner.invoke(boom, ["fail"])
    assert result.exit_code == 130
    assert result.output.strip() == (
        "error: interrupted (Ctrl-C): what was being written is removed, what was there before is kept"
    )
    raised["e"] = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "x")  # not the machine's: a bug
    assert isinstance(runner.invoke(boom, ["fail"]).exception, FileNotFoundError)
    monkeypatch.setenv("FLAME_DEBUG", "1")
    raised["e"] = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data")
    assert isinstance(runner.invoke(boom, ["fail"]).exception, OSError)


def test_usage_errors_are_one_line_naming_the_help_and_exit_2(monkeypatch):
    monkeypatch.delenv("FLAME_DEBUG", raising=False)
    for args, line in [
        (["train", "--bogus"], "error: No such option: --bogus: see `flame train --help`"),
        (["nosuch"], "error: No such command 'nosuch': see `flame --help`"),
        (["train", "--batch", "abc"], "error: Invalid value for '--batch': "),
        (
            ["train", "--gpus", "8"],  # the old train.sh's knob: the launcher's now
            "error: No such option: --gpus: the processes come from accelerate, e.g. `accelerate launch "
            "--num_processes 8 -m flame train ...`",
        ),
        (["data", "prepare", "--gpus", "1"], "error: No such option: --gpus: see `flame data prepare --help`"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(line), result.output
    # with no arguments a group still shows its help
    result = runner.invoke(app, ["data"])
    assert "prepare" in result.output and "error" not in result.output


def test_library_warnings_print_as_one_line_naming_their_source():
    import os

    from flame.cli.app import one_line_warning

    fla = os.path.join(os.sep, "venv", "lib", "python3.11", "site-packages", "fla", "layers", "rwkv7.py")
    line = one_line_warning(UserWarning("According to Bo, you are\n  using a potentially buggy"), UserWarning, fla, 151)
    assert line == (
        "warning: According to Bo, you are using a potentially buggy (UserWarning, "
        + os.path.join("fla", "layers", "rwkv7.py")
        + ":151)\n"
    )
    mine = one_line_warning("x", DeprecationWarning, "/work/x.py", 3)
    assert mine == "warning: x (DeprecationWarning, /work/x.py:3)\n"


def test_help_shows_flags_without_a_type_and_whole_paths_when_piped():
    prepare = runner.invoke(app, ["data", "prepare", "--help"]).output
    assert "data/{dataset}/{name}/{split}" in prepare and "--context_length,--context-length" in prepare
    assert "…" not in prepare  # nothing cut at 80 columns (piped help is 120 wide)
    convert = runner.invoke(app, ["convert", "from-llama", "--help"]).output
    assert "--overwrite" in convert and "<bool>" not in convert  # a flag takes no value; `<bool>` read as if it did
    assert "<path>" in convert  # options that take a value still show its type
