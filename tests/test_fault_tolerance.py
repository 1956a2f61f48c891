"""SIGKILL at random moments, also while a checkpoint is being written: `flame resume` always continues from the
newest complete checkpoint, no checkpoint on disk is ever corrupt, and the run ends with the uninterrupted loss."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flame import checkpoint as ckpt
from tests.prepared import counting_docs, llama_config, make_prepared

REPO = Path(__file__).resolve().parents[1]
STEPS = 24


def _flame(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flame", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    make_prepared(root / "ds", counting_docs(300, 64), 64)
    llama_config(root / "llama.json")
    env = dict(os.environ, PYTHONPATH=str(REPO), FLAME_QUIET="1", OMP_NUM_THREADS="1")
    train = [
        "train", "--model", str(root / "llama.json"), "--cache", str(root / "ds"), "--context", "32", "--batch", "4",
        "--lr", "3e-3", "--warmup", "2", "--seed", "0", "--logging", "1", "--save", "1", "--limit", "3",
        "--steps", str(STEPS),
    ]  # fmt: skip
    reference = root / "reference"
    proc = _flame(*train, "--path", str(reference), env=env)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    return root, env, train, _losses(reference)


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _check_disk(run: Path) -> None:
    """Every complete checkpoint reads back whole: trainer state JSON, weights, optimizer state."""
    from safetensors.torch import load_file

    for path in ckpt.complete(run):
        state = ckpt.read_trainer_state(path)
        assert path.name == f"step-{state['step']:08d}"
        for weights in (path / "model").glob("*.safetensors"):
            assert load_file(weights)
        assert (path / "state" / "accelerate" / "optimizer.bin").stat().st_size > 0


def _kill_loop(setup, tmp_path, kills: int, seed: int) -> None:
    root, env, train, reference = setup
    run = tmp_path / "run"
    rng = random.Random(seed)
    proc, done, killed = _flame(*train, "--path", str(run), env=env), False, 0
    while not done:
        if killed < kills:
            # Half the kills aim at a checkpoint being written (a .tmp folder exists), the rest at random moments.
            deadline = time.time() + rng.uniform(2.0, 6.0)
            aim_at_save = rng.random() < 0.5
            while proc.poll() is None and time.time() < deadline:
                if aim_at_save and time.time() > deadline - 3 and list((run / "checkpoints").glob(".step-*.tmp")):
                    break
                time.sleep(0.01)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed += 1
                _check_disk(run)
        else:
            proc.wait(timeout=300)
        if proc.returncode == 0:
            done = True
            continue
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
        newest = ckpt.latest(run)
        if newest is None:  # killed before the first checkpoint: start again, as a user would
            proc = _flame(*train, "--path", str(run), env=env)
        else:
            proc = _flame("resume", str(run), env=env)
    _check_disk(run)
    losses = _losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))  # every step logged exactly once
    assert losses[STEPS] == reference[STEPS]  # bit for bit on CPU
    assert losses == reference
    assert killed == kills


def test_three_sigkills_then_resume_equals_uninterrupted(setup, tmp_path):
    _kill_loop(setup, tmp_path, kills=3, seed=0)


@pytest.mark.slow
def test_twenty_sigkills_then_resume_equals_uninterrupted(setup, tmp_path):
    _kill_loop(setup, tmp_path, kills=20, seed=1)
