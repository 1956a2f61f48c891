"""On a CUDA machine: a GLA run killed with SIGKILL mid-run and continued by `flame resume` follows the loss curve
of the same run left alone (issue 5's GPU check).

    FLAME_GPU_REPORT=gpu-resume.json pytest -m gpu tests/test_gpu_resume.py

The model is GLA-340M's layer (hidden 1024, 4 heads, the same FLA kernel shapes) with 4 layers, bf16 autocast and
FLA's fused kernels, batch 4 x 2048, 60 updates, checkpoints every 20. The killed run dies after update 30 was
logged, so the resume repeats 21..30 and goes on to 60. On CPU the same continuation is bit for bit
(tests/cli/test_resume.py); on a GPU, the loss curves may differ by reduction-order noise only, so the test bounds
the largest relative difference and writes both curves to the report.
"""

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.prepared import counting_docs, make_prepared

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE, KILL_AFTER = 60, 20, 30


def _flame(*args, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    with log.open("a") as out:
        return subprocess.Popen([sys.executable, "-m", "flame", *args], cwd=REPO, env=env, stdout=out, stderr=out)


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records}


@pytest.mark.gpu
def test_sigkilled_gla_run_resumes_on_the_same_loss_curve(tmp_path):
    config = json.loads((REPO / "configs" / "gla_340M.json").read_text()) | {"num_hidden_layers": 4}
    (tmp_path / "gla.json").write_text(json.dumps(config))
    vocab = config["vocab_size"]
    data = make_prepared(tmp_path / "ds", counting_docs(1500, vocab, seed=0, min_len=200, max_len=2000), vocab)
    common = ["--model", str(tmp_path / "gla.json"), "--cache", str(data), "--steps", str(STEPS), "--batch", "4"]
    common += ["--context", "2048", "--lr", "1e-3", "--warmup", "10", "--save", str(SAVE), "--logging", "1"]
    common += ["--seed", "0", "--limit", "0"]
    log = tmp_path / "log.txt"

    alone = tmp_path / "alone"
    assert _flame("train", *common, "--path", str(alone), log=log).wait(timeout=900) == 0, log.read_text()[-3000:]

    killed = tmp_path / "killed"
    proc = _flame("train", *common, "--path", str(killed), log=log)
    deadline = time.time() + 900
    while proc.poll() is None and time.time() < deadline:
        if (killed / "metrics.jsonl").is_file() and max(_losses(killed), default=0) >= KILL_AFTER:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert proc.wait(timeout=60) == -signal.SIGKILL, log.read_text()[-3000:]
    steps_before = max(_losses(killed))
    assert _flame("resume", str(killed), log=log).wait(timeout=900) == 0, log.read_text()[-3000:]

    a, b = _losses(alone), _losses(killed)
    assert sorted(b) == sorted(a) == list(range(1, STEPS + 1))
    rel = {s: abs(b[s] - a[s]) / abs(a[s]) for s in a}
    report = {
        "test": "GLA (340M layers x4) SIGKILL after a logged update, flame resume, 1 GPU",
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "killed_after_step": steps_before,
        "resumed_from_step": max(s for s in range(SAVE, STEPS + 1, SAVE) if s <= steps_before),
        "max_rel_loss_diff": max(rel.values()),
        "max_rel_loss_diff_before_kill": max(rel[s] for s in a if s <= SAVE),
        "bit_identical_steps": sum(a[s] == b[s] for s in a),
        "loss_alone": [a[s] for s in sorted(a)],
        "loss_resumed": [b[s] for s in sorted(b)],
        "torch": torch.__version__,
    }
    if os.environ.get("FLAME_GPU_REPORT"):
        Path(os.environ["FLAME_GPU_REPORT"]).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if not k.startswith("loss_")}, indent=2))
    assert steps_before >= KILL_AFTER
    assert (killed / "checkpoints" / f"step-{STEPS:08d}").is_dir()
    assert a[STEPS] < 0.5 * a[1]  # it learned, so the comparison is of a moving curve
    assert max(rel.values()) < 2e-2, rel
