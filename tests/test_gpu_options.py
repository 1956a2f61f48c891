"""On a CUDA machine: `flame train --eval`, `--checkpointing`, `--share-casts`, `--bf16-residual` and `--compile`
with FLA's Triton kernels and bf16.

    FLAME_GPU_REPORT=gpu-options.json pytest -m gpu tests/test_gpu_options.py

A GLA with GLA-340M's layer (hidden 1024, 4 heads: the FLA kernel shapes of the 340M model, so a Triton cache of
either serves both) and 2 layers, batch 4 x 2048, 8 updates, evaluated every 4. Each option is run against the
same run without it: the losses agree within bf16 reduction noise (the first loss of --share-casts exactly),
checkpointing and shared casts lower the peak memory, the bf16 residual stream (over shared casts) lowers it
again with losses within 5% (it rounds every residual add), and the report holds each run's first-step seconds,
tokens/s and peak memory side by side.
"""

import datetime
import json
import os
from pathlib import Path

import pytest
import torch

from flame import engine
from flame.config import TrainConfig
from tests.prepared import gla_340m_layers

STEPS = 8
LEFT: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-options")
    return gla_340m_layers(root)


def _run(setup, name, **options) -> list[dict]:
    LEFT[name] = torch.cuda.memory_allocated() / 1024**3  # what the runs before left allocated
    cfg = TrainConfig(
        model=str(setup / "gla.json"), cache=str(setup / "ds"), path=str(setup / name), steps=STEPS, batch=4,
        context=2048, lr=1e-3, warmup=2, logging=1, save=STEPS, seed=0, eval=4, eval_windows=8,
        # each option against the run without any (--share-casts is the default; CUDA graphs, by default where they
        # can be, are not with --compile or --checkpointing: eager throughout)
        **({"share_casts": False, "cuda_graphs": False} | options),
    )  # fmt: skip
    engine.train(cfg)
    return [json.loads(line) for line in (setup / name / "metrics.jsonl").read_text().splitlines()]


def _summary(records) -> dict:
    return {
        "first_step_s": records[0].get("first_step_s"),
        "tokens_per_s": records[-1]["tokens_per_s"],
        "memory_gib": records[-1]["memory_gib"],
        "loss": [r["loss"] for r in records],
        "val_loss": [r["val_loss"] for r in records if "val_loss" in r],
    }


@pytest.mark.gpu
def test_eval_checkpointing_shared_casts_and_compile_agree_with_the_plain_run(setup):
    runs = {
        "plain": _run(setup, "plain"),
        "checkpointing": _run(setup, "checkpointing", checkpointing=True),
        "share_casts": _run(setup, "share_casts", share_casts=True),
        "bf16_residual": _run(setup, "bf16_residual", share_casts=True, bf16_residual=True),
        "compile": _run(setup, "compile", compile=True),
    }
    report = {
        "test": "GLA (340M layer x 2), batch 4 x 2048, bf16, --eval, --checkpointing, --share-casts, --bf16-residual, "
        "--compile; 1 GPU",
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    } | {name: _summary(records) for name, records in runs.items()}
    if os.environ.get("FLAME_GPU_REPORT"):
        Path(os.environ["FLAME_GPU_REPORT"]).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))

    plain = report["plain"]
    assert [r["step"] for r in runs["plain"] if "val_loss" in r] == [4, 8]
    assert all(v == v and v < plain["val_loss"][0] * 1.5 for v in plain["val_loss"])  # finite, sane
    for name in ("checkpointing", "share_casts", "compile"):
        for a, b in zip(report[name]["loss"] + report[name]["val_loss"], plain["loss"] + plain["val_loss"]):
            assert abs(a - b) <= 2e-2 * abs(b), (name, a, b)
    assert report["checkpointing"]["memory_gib"] < plain["memory_gib"]
    assert report["share_casts"]["loss"][0] == plain["loss"][0]  # the same first forward
    assert report["share_casts"]["memory_gib"] < plain["memory_gib"]
    residual, shared = report["bf16_residual"], report["share_casts"]
    for a, b in zip(residual["loss"] + residual["val_loss"], shared["loss"] + shared["val_loss"]):
        assert abs(a - b) <= 5e-2 * abs(b), ("bf16_residual", a, b)
    assert residual["memory_gib"] < shared["memory_gib"]
    # a finished run frees its model: without the engine's collection the next run started with 0.41 GiB allocated
    # (and its peak, which the comparisons above read, counted them)
    assert max(LEFT.values()) < 0.1, LEFT
