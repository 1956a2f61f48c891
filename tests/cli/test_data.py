import json
import os

import pytest
from typer.testing import CliRunner

from flame.cli.app import app
from tests.data import conftest as data_fixtures
from tests.data.helpers import documents, write_jsonl

tokenizer_dir = data_fixtures.tokenizer_dir
hub_cache = data_fixtures.hub_cache

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("FLAME_DEBUG", raising=False)


def run(*args):
    return runner.invoke(app, ["data", *map(str, args)])


def one_error_line(result, *fragments):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    # Plain progress lines may come first; the error is one line, the last.
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:], result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_help_lists_commands_and_options():
    result = run("--help")
    assert result.exit_code == 0 and "prepare" in result.output and "tokenizer" in result.output
    result = run("prepare", "--help")
    assert result.exit_code == 0
    for option in (
        "--dataset",
        "--name",
        "--split",
        "--context_length",
        "--output",
        "--tokenizer",
        "--column",
        "--streaming",
        "--val-docs",
        "--num-proc",
        "--overwrite",
        "--seed",
        "fineweb-edu",
    ):
        assert option in result.output, option


def test_prepare_with_options(tmp_path, tokenizer_dir):
    write_jsonl(tmp_path / "c" / "x.jsonl", documents(40), column="body")
    out = tmp_path / "out"
    result = run(
        "prepare",
        "--dataset",
        tmp_path / "c",
        "--tokenizer",
        tokenizer_dir,
        "--output",
        out,
        "--column",
        "body",
        "--context_length",
        256,
        "--val-docs",
        "0.1",
        "--num-proc",
        1,
        "--seed",
        3,
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["context_length"] == 256 and manifest["source"]["column"] == "body"
    assert manifest["splits"]["train"]["documents"] == 36 and manifest["splits"]["validation"]["documents"] == 4
    assert manifest["settings"]["seed"] == 3
    assert f"prepared {out}" in result.output and "validation" in result.output
    assert "tokenizing:" in result.output  # plain progress lines when not on a terminal

    result = run(
        "prepare",
        "--dataset",
        tmp_path / "c",
        "--tokenizer",
        tokenizer_dir,
        "--output",
        out,
        "--column",
        "body",
        "--overwrite",
        "--val-docs",
        5,
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["splits"]["validation"]["documents"] == 5


def test_prepare_default_output_and_hub_offline(tmp_path, tokenizer_dir, hub_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(
        "prepare",
        "--dataset",
        "tester/tiny",
        "--name",
        "sample",
        "--split",
        "train",
        "--tokenizer",
        tokenizer_dir,
        "--val-docs",
        0,
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "data/tester/tiny/sample/train/manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] == 30
    result = run("prepare", "--dataset", "tester/absent", "--tokenizer", tokenizer_dir)
    one_error_line(result, "'tester/absent' is not in the offline cache", "hf download")


def test_bad_inputs_are_one_line(tmp_path, tokenizer_dir):
    tok = ["--tokenizer", tokenizer_dir, "--output", tmp_path / "out"]
    one_error_line(run("prepare", "--dataset", tmp_path / "missing", *tok), "no file or folder matches")
    one_error_line(run("prepare", "--dataset", str(tmp_path / "*.jsonl"), *tok), "matches no files")
    (tmp_path / "c.xml").write_text("<x/>")
    one_error_line(run("prepare", "--dataset", tmp_path / "c.xml", *tok), "no supported files", ".parquet")
    write_jsonl(tmp_path / "body.jsonl", ["x"], column="body", id=1)
    one_error_line(run("prepare", "--dataset", tmp_path / "body.jsonl", *tok), "columns: body, id", "--column")
    write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    one_error_line(run("prepare", "--dataset", tmp_path / "empty.jsonl", *tok), "no documents in")
    one_error_line(
        run("prepare", "--dataset", tmp_path / "body.jsonl", "--tokenizer", tmp_path / "no-tok"),
        "does not exist",
        "flame data tokenizer",
    )
    one_error_line(
        run("prepare", "--dataset", tmp_path / "body.jsonl", "--tokenizer", "nobody/none"),
        "cannot load tokenizer 'nobody/none'",
        "flame data tokenizer",
    )
    one_error_line(run("prepare", "--dataset", tmp_path / "body.jsonl", *tok, "--val-docs", "many"), "--val-docs")
    (tmp_path / "out").mkdir()
    one_error_line(run("prepare", "--dataset", tmp_path / "body.jsonl", *tok), "exists", "--overwrite")
    assert sorted(os.listdir(tmp_path)) == ["body.jsonl", "c.xml", "empty.jsonl", "out"]


def test_tokenizer_command(tmp_path):
    write_jsonl(tmp_path / "c" / "a.jsonl", documents(60))
    result = run("tokenizer", tmp_path / "c", "--vocab-size", 300, "--output", tmp_path / "tok")
    assert result.exit_code == 0, result.output
    assert "trained on 60 documents" in result.output and (tmp_path / "tok" / "tokenizer.json").exists()
    one_error_line(run("tokenizer", tmp_path / "c", "--output", tmp_path / "tok"), "exists", "--overwrite")
    one_error_line(run("tokenizer", tmp_path / "none", "--output", tmp_path / "t2"), "no file or folder matches")


def test_plain_progress_gives_an_eta_from_the_rate_of_work_not_from_the_start(monkeypatch, capsys):
    import itertools

    from flame.cli import data as data_cli
    from flame.data.prepare import Progress

    # created at 100; a minute of start-up; then 10 s per 10% of the work
    clock = itertools.chain([100.0, 160.0, 170.0, 180.0], itertools.repeat(190.0))
    monkeypatch.setattr(data_cli.time, "time", lambda: next(clock))
    monkeypatch.setattr(data_cli, "PLAIN_EVERY_S", 0.0)
    display = data_cli._Display()
    for done in (10, 20, 30):
        display(Progress(docs=done, tokens=10 * done, done=done * 10**5, total=10**7, unit="B"))
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split("tokens/s, ")[1] for ln in lines] == ["10%", "20%, ETA 1m20s", "30%, ETA 1m10s"]
    assert display.bar.tasks[0].description == "tokenizing (MB)"
    small = data_cli._Display()
    small(Progress(done=4000, total=8000, unit="B"))
    assert small.bar.tasks[0].description == "tokenizing (KB)" and small.bar.tasks[0].total == 8.0  # was 0/0 in MB
