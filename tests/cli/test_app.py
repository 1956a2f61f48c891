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
