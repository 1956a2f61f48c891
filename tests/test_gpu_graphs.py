"""On a CUDA machine: `flame train --cuda-graphs` captures the update with FLA's Triton kernels, bf16 autocast, two
micro-batches and the fused AdamW, and trains the losses of the same run without it; a resume without graphs
continues it.

    FLAME_GPU_REPORT=gpu-graphs.json pytest -m gpu tests/test_gpu_graphs.py

GLA-340M's layer (hidden 1024, 4 heads) x 2 layers, batch 2 x 2 updates x 2048, 10 updates (3 eager, the capture,
6 more replays), evaluated every 5 (an eager forward between replays).
"""

import datetime
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from flame import engine
from flame.config import TrainConfig
from tests.prepared import gla_340m_layers

STEPS = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-graphs")
    return gla_340m_layers(root)


def _cfg(setup, name, **options) -> TrainConfig:
    base = dict(
        model=str(setup / "gla.json"), cache=str(setup / "ds"), path=str(setup / name), steps=STEPS, batch=2,
        update=2, context=2048, lr=1e-3, warmup=2, logging=1, save=5, limit=0, seed=0, eval=5, eval_windows=8,
    )  # fmt: skip
    return TrainConfig(**(base | options))


def _records(setup, name) -> list[dict]:
    return [json.loads(line) for line in (setup / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.gpu
def test_a_captured_update_trains_the_eager_losses_and_resumes_without_graphs(setup, capsys):
    engine.train(_cfg(setup, "eager", cuda_graphs=False))
    engine.train(_cfg(setup, "graphed", cuda_graphs=True))
    captured = capsys.readouterr().out
    # the graphed run continued from its checkpoint at 5 without graphs (resume drops the later records)
    shutil.copytree(setup / "graphed", setup / "half")
    shutil.rmtree(setup / "half" / "checkpoints" / f"step-{STEPS:08d}")
    engine.resume(setup / "half", {"cuda_graphs": False})
    runs = {name: _records(setup, name) for name in ("eager", "graphed", "half")}
    report = {
        "test": "GLA (340M layer x 2), batch 2 x update 2 x 2048, bf16, --cuda-graphs against eager; 1 GPU",
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    } | {
        name: {
            "loss": [r["loss"] for r in records],
            "val_loss": [r["val_loss"] for r in records if "val_loss" in r],
            "tokens_per_s": records[-1]["tokens_per_s"],
            "memory_gib": records[-1]["memory_gib"],
        }
        for name, records in runs.items()
    }
    if os.environ.get("FLAME_GPU_REPORT"):
        Path(os.environ["FLAME_GPU_REPORT"]).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))

    assert "CUDA graph: update 4 captured in" in captured
    eager = report["eager"]
    assert report["graphed"]["loss"][0] == eager["loss"][0]  # the same first forward
    for name in ("graphed", "half"):
        assert len(report[name]["loss"]) == STEPS and len(report[name]["val_loss"]) == 2, name
        for a, b in zip(report[name]["loss"] + report[name]["val_loss"], eager["loss"] + eager["val_loss"]):
            assert abs(a - b) <= 1e-2 * abs(b), (name, a, b)
    # the graph keeps its own memory pool, which cannot reuse what the eager warm-up left cached: 0.25 GiB more here
    # on an H200, 0.16-0.19 GiB for GLA-340M at batch 8-32 (benchmarks/RESULTS.md)
    assert report["graphed"]["memory_gib"] - eager["memory_gib"] < 0.5


def _family_config(root: Path, family: str) -> Path:
    """`family`'s 340M config (configs/<family>_340M.json; RWKV7, which ships none, at 340M's width) with 2
    layers."""
    repo = Path(__file__).resolve().parents[1]
    if family == "rwkv7":
        config = {"model_type": "rwkv7", "hidden_size": 1024, "head_dim": 64, "vocab_size": 32000}
    else:
        config = json.loads((repo / "configs" / f"{family}_340M.json").read_text())
    path = root / f"{family}.json"
    path.write_text(json.dumps(config | {"num_hidden_layers": 2}))
    return path


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["transformer", "delta_net", "mamba2", "rwkv7", "gated_deltanet"])
def test_each_model_family_is_captured_with_the_eager_losses(setup, family, capsys):
    """Every family flame ships a config for (and RWKV7) under --cuda-graphs: the capture takes, and the 6 updates
    (3 eager, the capture, 2 replays) train the eager run's losses."""
    from flame.kernels.compat import hopper_triton_blocker

    blocker = hopper_triton_blocker(json.loads(_family_config(setup, family).read_text())["model_type"])
    if blocker:
        pytest.skip(blocker[0])
    model = str(_family_config(setup, family))
    runs = {}
    for name, graphs in (("eager", False), ("graphed", True)):
        engine.train(_cfg(setup, f"{family}-{name}", model=model, steps=6, eval=0, save=6, cuda_graphs=graphs))
        runs[name] = [r["loss"] for r in _records(setup, f"{family}-{name}")]
    captured = capsys.readouterr().out
    print(json.dumps({"family": family, "device": torch.cuda.get_device_name()} | runs))  # shown with -s

    assert "CUDA graph: update 4 captured in" in captured
    assert len(runs["graphed"]) == len(runs["eager"]) == 6
    assert runs["graphed"][0] == runs["eager"][0]
    for a, b in zip(runs["graphed"], runs["eager"]):
        assert abs(a - b) <= 1e-2 * abs(b), (family, a, b)


@pytest.mark.gpu
def test_by_default_an_update_that_reads_back_to_the_host_trains_on_eagerly(setup, capsys, monkeypatch):
    """A model whose update reads a value back to the host (here: every loss, with .item()) cannot be captured:
    the CUDA capture fails at update 4, and by default the run goes on eagerly with the losses of a run without
    graphs; --cuda-graphs makes the same failure an error."""
    real = engine.forward_loss

    def reads_back(model, batch, num_items):
        loss = real(model, batch, num_items)
        loss.item()  # a host synchronisation: not permitted while a stream is capturing
        return loss

    monkeypatch.setattr(engine, "forward_loss", reads_back)
    runs = {}
    for name, graphs in (("eager", False), ("default", None)):
        engine.train(_cfg(setup, f"sync-{name}", steps=6, eval=0, save=6, cuda_graphs=graphs))
        runs[name] = [r["loss"] for r in _records(setup, f"sync-{name}")]
    captured = capsys.readouterr()
    print(json.dumps(runs))
    assert "CUDA graph: update 4 could not be captured (" in captured.err
    assert "captured in" not in captured.out
    assert runs["default"] == runs["eager"] and len(runs["eager"]) == 6
    with pytest.raises(Exception, match="the update could not be captured in a CUDA graph"):
        engine.train(_cfg(setup, "sync-asked", steps=6, eval=0, save=6, cuda_graphs=True))
