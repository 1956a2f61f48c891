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
STEPS = 80


def _flame(*args, env=None) -> subprocess.Popen:
    """`flame ...` in a subprocess; its stderr goes to a file (a pipe nobody reads could fill and block it)."""
    log = open(Path(env["FLAME_TEST_LOG"]), "a")  # noqa: SIM115  (closed with the process)
    proc = subprocess.Popen([sys.executable, "-m", "flame", *args], cwd=REPO, env=env, stdout=log, stderr=log)
    log.close()
    return proc


def _log(env) -> str:
    return Path(env["FLAME_TEST_LOG"]).read_text()[-3000:]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    make_prepared(root / "ds", counting_docs(300, 64), 64)
    # wide enough that writing a checkpoint (weights + AdamW moments) takes long enough for kills to land in it
    llama_config(root / "llama.json", hidden_size=256, intermediate_size=512)
    env = dict(os.environ, PYTHONPATH=str(REPO), FLAME_QUIET="1", OMP_NUM_THREADS="1", FLAME_TEST_LOG=str(root / "log"))
    train = [
        "train", "--model", str(root / "llama.json"), "--cache", str(root / "ds"), "--context", "32", "--batch", "4",
        "--lr", "3e-3", "--warmup", "2", "--seed", "0", "--logging", "1", "--save", "1", "--limit", "3",
        "--steps", str(STEPS),
    ]  # fmt: skip
    reference = root / "reference"
    proc = _flame(*train, "--path", str(reference), env=env)
    assert proc.wait(timeout=300) == 0, _log(env)
    return root, env, train, _losses(reference)


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _lines(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _check_disk(run: Path) -> None:
    """Every complete checkpoint reads back whole: trainer state JSON, weights, optimizer state."""
    from safetensors.torch import load_file

    for path in ckpt.complete(run):
        state = ckpt.read_trainer_state(path)
        assert path.name == f"step-{state['step']:08d}"
        for weights in (path / "model").glob("*.safetensors"):
            assert load_file(weights)
        assert (path / "state" / "accelerate" / "optimizer.bin").stat().st_size > 0


def _kill_loop(setup, tmp_path, kills: int, seed: int) -> int:
    """Returns how many kills landed while a checkpoint was being written."""
    root, env, train, reference = setup
    run = tmp_path / "run"
    rng = random.Random(seed)
    proc, done, killed, during_save = _flame(*train, "--path", str(run), env=env), False, 0, 0
    while not done:
        if killed < kills:
            # Wait until this process trains (a new metrics line: start-up takes seconds, training milliseconds a
            # step), then kill it: half the kills as soon as a checkpoint is being written (a .tmp folder exists),
            # the rest after a random fraction of a second.
            logged = _lines(run)
            while proc.poll() is None and _lines(run) <= logged:
                time.sleep(0.001)
            if rng.random() < 0.5:
                while proc.poll() is None and not list((run / "checkpoints").glob(".step-*.tmp")):
                    time.sleep(0.0005)
            else:
                time.sleep(rng.uniform(0.0, 0.3))
            if proc.poll() is None:
                during_save += bool(list((run / "checkpoints").glob(".step-*.tmp")))
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed += 1
                _check_disk(run)
        else:
            proc.wait(timeout=300)
        if proc.returncode == 0:
            done = True
            continue
        assert proc.returncode == -signal.SIGKILL, _log(env)
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
    return during_save


def test_three_sigkills_then_resume_equals_uninterrupted(setup, tmp_path):
    _kill_loop(setup, tmp_path, kills=3, seed=0)


@pytest.mark.slow
def test_twenty_sigkills_then_resume_equals_uninterrupted(setup, tmp_path):
    assert _kill_loop(setup, tmp_path, kills=20, seed=1) >= 5  # kills did land mid-save
