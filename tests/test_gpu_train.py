"""On a CUDA machine: GLA-340M trains a few hundred steps with bf16 autocast and FLA's fused Triton kernels.

    FLAME_GPU_REPORT=gpu-train.json pytest -m gpu tests/test_gpu_train.py

Writes tokens/s, MFU and peak memory (with the device name and date) to the JSON file FLAME_GPU_REPORT names.
"""

import datetime
import json
import os
from pathlib import Path

import pytest
import torch

from flame import engine
from flame.config import TrainConfig
from tests.prepared import counting_docs, make_prepared

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.gpu
def test_gla_340m_trains_with_bf16_and_fused_kernels(tmp_path):
    config = json.loads((REPO / "configs" / "gla_340M.json").read_text())
    vocab = config["vocab_size"]
    data = make_prepared(tmp_path / "ds", counting_docs(4000, vocab, seed=0, min_len=200, max_len=2000), vocab)
    steps, batch, context = 300, 8, 2048
    cfg = TrainConfig(
        model=str(REPO / "configs" / "gla_340M.json"),
        cache=str(data),
        path=str(tmp_path / "run"),
        steps=steps,
        batch=batch,
        context=context,
        lr=1e-3,
        warmup=50,
        logging=25,
        save=steps,
        seed=0,
    )
    result = engine.train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    report = {
        "test": "gla_340M bf16 fused kernels, 1 GPU",
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "steps": steps,
        "batch": batch,
        "context": context,
        "tokens_per_s": last["tokens_per_s"],
        "mfu": last["mfu"],
        "memory_gib": last["memory_gib"],
        "loss_first": records[0]["loss"],
        "loss_last": last["loss"],
        "torch": torch.__version__,
    }
    if os.environ.get("FLAME_GPU_REPORT"):
        Path(os.environ["FLAME_GPU_REPORT"]).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    assert result.step == steps and result.skipped == 0
    assert last["loss"] < 0.5 * records[0]["loss"]
    assert 0 < last["mfu"] < 1
    assert (tmp_path / "run" / "checkpoints" / f"step-{steps:08d}" / "model" / "model.safetensors").is_file()
