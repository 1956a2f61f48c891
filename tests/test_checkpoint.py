"""Checkpoint folders: only complete (renamed) ones count, rotation keeps the newest, stale temp folders go."""

import pytest

from flame import checkpoint as ckpt
from flame.errors import CheckpointError


def _fake(run, step, complete=True):
    path = ckpt.step_dir(run, step)
    if not complete:
        path = path.parent / f".{path.name}.tmp"
    (path / "state").mkdir(parents=True)
    (path / "state" / ckpt.TRAINER_STATE).write_text(f'{{"step": {step}}}')
    return path


def test_only_complete_checkpoints_newest_last(tmp_path):
    for step in (30, 4, 100):
        _fake(tmp_path, step)
    _fake(tmp_path, 200, complete=False)
    (tmp_path / "checkpoints" / "notes").mkdir()
    assert [p.name for p in ckpt.complete(tmp_path)] == ["step-00000004", "step-00000030", "step-00000100"]
    assert ckpt.latest(tmp_path).name == "step-00000100"
    assert ckpt.latest(tmp_path / "elsewhere") is None


def test_rotate_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        _fake(tmp_path, step)
    deleted = ckpt.rotate(tmp_path, 2)
    assert [p.name for p in deleted] == ["step-00000001", "step-00000002"]
    assert [p.name for p in ckpt.complete(tmp_path)] == ["step-00000003", "step-00000004"]
    assert ckpt.rotate(tmp_path, 0) == []


def test_trainer_state_of_an_incomplete_folder_is_an_error(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(CheckpointError, match="not a complete flame checkpoint"):
        ckpt.read_trainer_state(tmp_path / "x")
    assert ckpt.read_trainer_state(_fake(tmp_path, 7)) == {"step": 7}


@pytest.mark.parametrize("text", ["", "{torn", "[1]"])
def test_a_damaged_trainer_state_is_one_error_pointing_at_an_earlier_checkpoint(tmp_path, text):
    path = _fake(tmp_path, 7)
    (path / "state" / ckpt.TRAINER_STATE).write_text(text)
    with pytest.raises(
        CheckpointError,
        match="trainer.json is damaged .*: go back to an earlier checkpoint of the run: flame resume RUN --checkpoint",
    ):
        ckpt.read_trainer_state(path)
