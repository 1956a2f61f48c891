"""On a CUDA machine: FLA's autotuning results saved with a run let `flame resume` on a fresh machine (an empty
Triton cache) skip the benchmarking (flame.autotune).

    pytest -m gpu tests/test_gpu_autotune.py

A tiny GLA (hidden 256, 2 layers) trains 2 updates with this machine's Triton cache (tuned or found there, as a
real run does); the run is resumed to 4 updates with another, empty, cache, as on a fresh node. The first run
keeps every result it used in RUN/tuning/, and the resume restores them all and benchmarks no kernel again.
(Starting the first run empty too would compile and tune every kernel twice: over 5 minutes on an H200.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.prepared import counting_docs, make_prepared

REPO = Path(__file__).resolve().parents[1]


def _flame(*args, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    if cache is not None:
        env["TRITON_CACHE_DIR"] = str(cache)
    return subprocess.run(
        [sys.executable, "-m", "flame", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )


def _tuning(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r.get("first_step_tuning") for r in records if "first_step_s" in r}


@pytest.mark.gpu
def test_a_resume_on_an_empty_triton_cache_reuses_the_runs_autotuning(tmp_path):
    vocab = 1024
    config = {"model_type": "gla", "hidden_size": 256, "num_hidden_layers": 2, "num_heads": 4, "vocab_size": vocab}
    (tmp_path / "gla.json").write_text(json.dumps(config))
    data = make_prepared(tmp_path / "ds", counting_docs(300, vocab, seed=0, min_len=200, max_len=1000), vocab)
    run = tmp_path / "run"
    common = ["--cache", str(data), "--batch", "2", "--context", "512", "--warmup", "1", "--save", "2"]
    first = _flame("train", "--model", str(tmp_path / "gla.json"), *common, "--steps", "2", "--path", str(run))
    assert first.returncode == 0, first.stderr[-3000:]
    saved = sorted(p.relative_to(run / "tuning") for p in (run / "tuning").rglob("*.autotune.json"))
    tuned_before = _tuning(run)[1]
    assert saved, "the run keeps the autotuning results its kernels used"
    assert len(saved) >= (tuned_before or {}).get("kernels_tuned", 0)

    resumed = _flame("resume", str(run), "--steps", "4", cache=tmp_path / "cache-b")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = resumed.stdout + resumed.stderr
    assert f"reusing {len(saved)} kernel autotuning results kept in {run / 'tuning'}: " in out
    assert sorted(p.relative_to(tmp_path / "cache-b") for p in (tmp_path / "cache-b").rglob("*.autotune.json")) == saved
    # the resume's first step is reported in its first record (step 4: step 3 is not a log step)
    assert sorted(_tuning(run)) == [1, 4]
    again = _tuning(run)[4]
    assert (again or {}).get("kernels_tuned", 0) == 0, again


@pytest.mark.gpu
def test_a_first_run_of_flames_own_shapes_on_an_empty_cache_benchmarks_nothing(tmp_path):
    """On an H200 with an empty Triton cache (a fresh machine), flame restores the results it ships
    (flame/tuning/h200-*.tgz) before the first step, so GLA-340M's layers at batch 2 x 2048 (the GPU tests' shapes)
    tune no kernel; FLA's kernels are still compiled."""
    import tarfile

    import torch

    from flame import autotune
    from tests.prepared import gla_340m_layers

    name = torch.cuda.get_device_name()
    if autotune.gpu_tag(name) != "h200":
        pytest.skip(f"flame ships autotuning results for the NVIDIA H200 only, not the {name}")
    root = gla_340m_layers(tmp_path)
    run, cache = tmp_path / "run", tmp_path / "empty-cache"
    options = ["--steps", "2", "--batch", "2", "--context", "2048", "--warmup", "1", "--save", "2", "--limit", "0"]
    done = _flame(
        "train", "--model", str(root / "gla.json"), "--cache", str(root / "ds"), *options, "--path", str(run),
        cache=cache,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    shipped = set()  # what the empty cache gets: every result in the archives for this GPU, once
    for archive in autotune.SHIPPED.glob("h200-*.tgz"):
        with tarfile.open(archive) as tar:
            shipped |= {m.name.removeprefix("./") for m in tar.getmembers() if m.isfile()}  # "./" in some
    assert f"reusing {len(shipped)} kernel autotuning results that flame ships for the {name} (flame/tuning)" in (
        done.stdout + done.stderr
    )
    first = _tuning(run)[1]
    assert (first or {}).get("kernels_tuned", 0) == 0, first
