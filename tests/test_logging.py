"""flame.logging's TensorBoard sink (--tensorboard): every record's numbers as scalars, a resume that hides what the
interrupted run logged after its checkpoint, and the one-line error without the package. metrics.jsonl and wandb:
tests/cli/test_train.py, tests/cli/test_resume.py."""

import json
import shutil
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # a dev dependency
from typer.testing import CliRunner

from flame import engine
from flame.cli.app import app
from flame.config import TrainConfig
from tests.prepared import counting_docs, llama_config, make_prepared


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("logging")
    make_prepared(root / "ds", counting_docs(300, 64), 64)
    llama_config(root / "llama.json")
    return root


def _cfg(files, run, **kw) -> TrainConfig:
    base = dict(model=str(files / "llama.json"), cache=str(files / "ds"), path=str(run), context=32, batch=4,
                lr=3e-3, warmup=2, seed=0, logging=1, steps=6, save=3, limit=0)  # fmt: skip
    return TrainConfig(**(base | kw))


def _scalars(run) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_holds_each_records_numbers_at_its_step(files, tmp_path):
    engine.train(_cfg(files, tmp_path / "run", tensorboard=True))
    records, scalars = _records(tmp_path / "run"), _scalars(tmp_path / "run")
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "memory_gib", "time"} <= set(scalars)
    assert "step" not in scalars
    for tag in ("loss", "lr", "grad_norm", "tokens"):
        assert [s for s, _ in scalars[tag]] == [1, 2, 3, 4, 5, 6]
        assert [v for _, v in scalars[tag]] == pytest.approx([r[tag] for r in records], rel=1e-6), tag


def test_a_resume_hides_the_events_logged_after_the_checkpoint(files, tmp_path):
    engine.train(_cfg(files, tmp_path / "full", tensorboard=True))
    run = tmp_path / "run"  # killed while writing its step-6 checkpoint: steps 4-6 logged, not saved
    shutil.copytree(tmp_path / "full", run)
    (run / "checkpoints" / "step-00000006").rename(run / "checkpoints" / ".step-00000006.tmp")
    engine.resume(run, {})
    loss = _scalars(run)["loss"]
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5, 6]  # not 4-6 twice
    assert [v for _, v in loss] == pytest.approx([r["loss"] for r in _records(tmp_path / "full")], rel=1e-6)


def test_a_resume_may_start_tensorboard(files, tmp_path):
    engine.train(_cfg(files, tmp_path / "run", steps=3))
    assert not (tmp_path / "run" / "tensorboard").exists()
    result = CliRunner().invoke(app, ["resume", str(tmp_path / "run"), "--steps", "5", "--tensorboard"])
    assert result.exit_code == 0, result.output
    assert [s for s, _ in _scalars(tmp_path / "run")["loss"]] == [4, 5]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["tensorboard"] is True


def test_without_the_package_it_is_one_clear_error_before_the_run_starts(files, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: find_spec answers None
    args = ["train", "--model", str(files / "llama.json"), "--cache", str(files / "ds"), "--context", "32"]
    result = CliRunner().invoke(app, [*args, "--path", str(tmp_path / "run"), "--steps", "2", "--tensorboard"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: --tensorboard needs the tensorboard package, which is not installed: pip install tensorboard"
    ], result.output
    assert not (tmp_path / "run").exists()
