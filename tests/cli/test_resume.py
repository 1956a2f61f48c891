"""`flame resume RUN_DIR`: exact continuation from the newest complete checkpoint, and its errors."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from flame import engine
from flame.cli.app import app
from flame.config import TrainConfig
from flame.errors import ConfigError
from tests.prepared import counting_docs, llama_config, make_prepared

runner = CliRunner()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted 6-update run that checkpoints at 3 and 6."""
    root = tmp_path_factory.mktemp("resume")
    make_prepared(root / "ds", counting_docs(300, 64), 64, val_docs=counting_docs(20, 64, seed=3))
    make_prepared(root / "other", counting_docs(300, 64, seed=7), 64)
    llama_config(root / "llama.json")
    cfg = TrainConfig(
        model=str(root / "llama.json"),
        cache=str(root / "ds"),
        path=str(root / "full"),
        context=32,
        batch=4,
        lr=3e-3,
        warmup=2,
        seed=0,
        logging=1,
        steps=6,
        save=3,
    )
    engine.train(cfg)
    return root


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _interrupted_copy(full_run, tmp_path):
    """The full run as if killed after its step-3 checkpoint, while writing step 6."""
    run = tmp_path / "run"
    shutil.copytree(full_run / "full", run)
    ckpts = run / "checkpoints"
    (ckpts / "step-00000006").rename(ckpts / ".step-00000006.tmp")
    return run


def test_resume_continues_exactly_from_the_newest_complete_checkpoint(full_run, tmp_path):
    run = _interrupted_copy(full_run, tmp_path)
    result = runner.invoke(app, ["resume", str(run)])
    assert result.exit_code == 0, result.output
    assert "finished at step 6" in result.output
    resumed = [(r["step"], r["loss"], r["tokens"]) for r in _records(run)]
    uninterrupted = [(r["step"], r["loss"], r["tokens"]) for r in _records(full_run / "full")]
    assert resumed == uninterrupted  # bit for bit on CPU, records after step 3 replaced, none doubled
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]


def test_resume_may_raise_steps(full_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full_run / "full", run)
    result = runner.invoke(app, ["resume", str(run), "--steps", "8", "--save", "4"])
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in _records(run)][-3:] == [6, 7, 8]
    assert json.loads((run / "config.json").read_text())["steps"] == 8
    assert (run / "checkpoints" / "step-00000008").is_dir()


def test_a_longer_run_warns_that_its_schedule_moves(full_run, tmp_path):
    run = _interrupted_copy(full_run, tmp_path)  # at step 3 of 6: cosine, lr 3e-3, warmup 2
    result = runner.invoke(app, ["resume", str(run), "--steps", "12"])
    assert result.exit_code == 0, result.output
    line = "warning: the cosine schedule now spans 12 updates instead of 6: update 4 runs at learning rate"
    assert line in " ".join(result.output.split())
    assert [r["step"] for r in _records(run)] == list(range(1, 13))


def test_going_back_to_an_earlier_checkpoint_sets_the_newer_ones_aside(full_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full_run / "full", run)
    (run / "wandb-id").write_text("abc123\n")  # as a run logged to wandb has (wandb is not started: no --project)
    before = (run / "metrics.jsonl").read_text()
    result = runner.invoke(app, ["resume", str(run), "--checkpoint", "step-00000003"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "went back to step 3: moved step-00000006 to" in text
    assert "with the records logged until then (metrics-until-step-00000006.jsonl) and the wandb run goes on" in text
    assert (run / "set-aside" / "metrics-until-step-00000006.jsonl").read_text() == before
    assert not (run / "wandb-id").exists()  # a new wandb run: wandb drops the steps at or below its run's highest
    # one history: the records after step 3 are this run's (the same, bit for bit, as nothing else changed)
    assert [(r["step"], r["loss"]) for r in _records(run)] == [
        (r["step"], r["loss"]) for r in _records(full_run / "full")
    ]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    assert sorted(p.name for p in (run / "set-aside").iterdir()) == [
        "metrics-until-step-00000006.jsonl",
        "step-00000006",
    ]
    result = runner.invoke(app, ["resume", str(run), "--checkpoint", "step-00000003", "--steps", "3"])
    assert result.exit_code == 1 and "is at step 3, and --steps is 3: nothing to train" in result.output
    result = runner.invoke(app, ["resume", str(run), "--checkpoint", "step-00000004"])
    assert result.exit_code == 1
    assert "--checkpoint step-00000004 is not a complete checkpoint of" in result.output
    assert "give one of: step-00000003, step-00000006" in " ".join(result.output.split())


def test_train_from_an_older_checkpoint_of_the_same_run_is_refused(full_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full_run / "full", run)
    config = json.loads((run / "config.json").read_text())
    args = ["train", "--model", config["model"], "--cache", config["cache"], "--path", str(run)]
    result = runner.invoke(app, [*args, "--checkpoint", str(run / "checkpoints" / "step-00000003"), "--steps", "7"])
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "is not the newest checkpoint of run dir" in text and "(step-00000006)" in text
    assert f"flame resume {run} --checkpoint step-00000003" in text
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]


def test_resume_may_start_evaluating_without_changing_the_training(full_run, tmp_path):
    run = _interrupted_copy(full_run, tmp_path)
    result = runner.invoke(app, ["resume", str(run), "--eval", "2", "--eval-windows", "4"])
    assert result.exit_code == 0, result.output
    records = _records(run)
    assert [r["step"] for r in records if "val_loss" in r] == [4, 6]
    train = [(r["step"], r["loss"]) for r in records]
    assert train == [(r["step"], r["loss"]) for r in _records(full_run / "full")]
    assert json.loads((run / "config.json").read_text())["eval"] == 2


def test_resume_of_a_finished_run_has_nothing_to_do(full_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full_run / "full", run)
    result = runner.invoke(app, ["resume", str(run)])
    assert result.exit_code == 0, result.output
    assert "already at step 6: nothing to train" in result.output


def test_not_a_run(tmp_path):
    result = runner.invoke(app, ["resume", str(tmp_path)])
    assert result.exit_code == 1
    assert f"error: {tmp_path} is not a flame run (no config.json)" in result.output
    assert "Traceback" not in result.output


def test_no_complete_checkpoint(full_run, tmp_path):
    run = _interrupted_copy(full_run, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step-00000003")
    result = runner.invoke(app, ["resume", str(run)])
    assert result.exit_code == 1
    assert "has no complete checkpoint (an interrupted save's .tmp folder is never used)" in result.output


def test_other_data_is_refused_unless_forced(full_run, tmp_path):
    run = _interrupted_copy(full_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["cache"] = str(full_run / "other")
    (run / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["resume", str(run)])
    assert result.exit_code == 1
    assert "was trained on other data" in result.output and "--force" in result.output
    result = runner.invoke(app, ["resume", str(run), "--force"])
    assert result.exit_code == 0, result.output
    assert "finished at step 6" in result.output


def test_a_run_dir_being_trained_is_not_trained_by_a_second_launch(full_run, tmp_path):
    import os
    import socket

    from flame.checkpoint import RunLock

    run = _interrupted_copy(full_run, tmp_path)
    other = RunLock(run)  # as the first launch holds it (a requeued job started while it still runs)
    assert other.acquire() is None
    result = runner.invoke(app, ["resume", str(run)])
    assert result.exit_code == 1
    line = f"is being trained by pid {os.getpid()} on {socket.gethostname()}: wait for it to end or stop it"
    assert line in " ".join(result.output.split())
    assert not (run / "checkpoints" / "step-00000006").exists() and len(_records(run)) == 6  # nothing written
    shutil.rmtree(run / "checkpoints")  # a live run before its first save: not "no complete checkpoint"
    result = runner.invoke(app, ["resume", str(run)])
    assert result.exit_code == 1 and "is being trained by pid" in result.output
    other.release()
    run = _interrupted_copy(full_run, tmp_path / "again")
    result = runner.invoke(app, ["resume", str(run)])
    assert result.exit_code == 0, result.output
    assert RunLock(run).acquire() is None  # released when the training ended


def test_data_that_moved_is_given_anew_and_checked(full_run, tmp_path):
    run = _interrupted_copy(full_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["cache"] = str(tmp_path / "gone")  # the dataset was moved after the run started
    (run / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["resume", str(run)])
    assert result.exit_code == 1 and "if a run's data moved, `flame resume RUN --cache NEW_PLACE`" in result.output
    result = runner.invoke(app, ["resume", str(run), "--cache", str(full_run / "other")])
    assert result.exit_code == 1 and "was trained on other data" in result.output  # a new place, not new data
    shutil.copytree(full_run / "ds", tmp_path / "moved")
    result = runner.invoke(app, ["resume", str(run), "--cache", str(tmp_path / "moved")])
    assert result.exit_code == 0, result.output
    assert [(r["step"], r["loss"]) for r in _records(run)] == [
        (r["step"], r["loss"]) for r in _records(full_run / "full")
    ]
    assert json.loads((run / "config.json").read_text())["cache"] == str(tmp_path / "moved")


def test_model_shape_mismatch(full_run, tmp_path):
    run = _interrupted_copy(full_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["model"] = str(llama_config(tmp_path / "wider.json", hidden_size=48))
    (run / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["resume", str(run)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "step-00000003 does not match this model and optimizer" in result.output
    assert "give the --model config that run was trained with" in result.output


def test_only_safe_options_change(tmp_path):
    with pytest.raises(ConfigError, match="flame resume cannot change context, lr: only steps, logging"):
        engine.resume(tmp_path, {"lr": 1.0, "context": 64, "steps": 9})


def test_resume_continues_the_same_wandb_run(full_run, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = _interrupted_copy(full_run, tmp_path)
    result = runner.invoke(app, ["resume", str(run), "--project", "flame-test", "--steps", "5"])
    assert result.exit_code == 0, result.output
    run_id = (run / "wandb-id").read_text().strip()
    result = runner.invoke(app, ["resume", str(run), "--steps", "6"])
    assert result.exit_code == 0, result.output
    assert (run / "wandb-id").read_text().strip() == run_id
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(f"-{run_id}") for p in offline)
    state = json.loads((run / "checkpoints" / "step-00000006" / "state" / "trainer.json").read_text())
    assert state["wandb_id"] == run_id
