"""On a machine with 2 CUDA GPUs: `accelerate launch` of `flame train` with each shipped config of configs/accelerate/
(DDP, FSDP, DeepSpeed ZeRO-2 and ZeRO-3) on 2 processes trains the losses of one process with twice the
accumulation, writes a checkpoint whose model/ holds the whole model, and `flame resume` under the same launcher
continues it with the losses of the uninterrupted run, bit for bit.

    FLAME_GPU_REPORT=gpu-distributed.json pytest -m gpu tests/test_gpu_distributed.py

GLA-340M's layer x 2 (the shapes of the committed tuning), batch 2 x 2048 per process, 4 updates, saved at 2 and 4.
"""

import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flame import engine
from flame.config import TrainConfig
from tests.prepared import gla_340m_layers

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
SETUPS = ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"]
OPTIONS = ["--steps", str(STEPS), "--batch", "2", "--context", "2048", "--lr", "1e-3", "--warmup", "2",
           "--logging", "1", "--save", "2", "--limit", "0", "--seed", "0"]  # fmt: skip

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (the device tool's nvidia-h200-x2)"),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The data and model, and the reference: one process, batch 2 x update 2 (the global batch of 2 x 2 x 1)."""
    root = gla_340m_layers(tmp_path_factory.mktemp("gpu-distributed"))
    one = TrainConfig(
        model=str(root / "gla.json"), cache=str(root / "ds"), path=str(root / "one"), steps=STEPS, batch=2, update=2,
        context=2048, lr=1e-3, warmup=2, logging=1, save=2, limit=0, seed=0,
    )  # fmt: skip
    engine.train(one)
    return root


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _launch(setup_name: str, port: int, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / f"{setup_name}.yaml"), "--num_processes", "2",
               "--main_process_port", str(port), "-m", "flame", *args]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO), "NCCL_NVLS_ENABLE": "0", "FLAME_QUIET": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert (done.returncode == 0) == ok, (done.stdout + done.stderr)[-4000:]
    return done


@pytest.mark.parametrize("name", SETUPS)
def test_two_gpus_train_the_losses_of_one_and_resume_exactly(setup, name):
    run, half = setup / name, setup / f"{name}-half"
    port = 29600 + SETUPS.index(name)
    common = ["--model", str(setup / "gla.json"), "--cache", str(setup / "ds"), *OPTIONS]
    _launch(name, port, "train", *common, "--path", str(run))
    # the same run stopped after its checkpoint at 2, then continued by `flame resume` under the same launcher
    shutil.copytree(run, half)
    shutil.rmtree(half / "checkpoints" / f"step-{STEPS:08d}")
    _launch(name, port, "resume", str(half))
    if name == "fsdp":  # FSDP's sharded checkpoint under DDP: one error line before anything is loaded
        refused = _launch("ddp", port, "resume", str(half), ok=False)
        assert "was saved by FSDP, full shard, in a format that DDP cannot read" in refused.stdout + refused.stderr

    one, two, resumed = _losses(setup / "one"), _losses(run), _losses(half)
    report = {
        "test": f"GLA (340M layer x 2), {name} on 2 GPUs, batch 2 x 2048 per GPU, against 1 GPU with update 2",
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "one_gpu": one,
        "two_gpus": two,
        "resumed": resumed,
        "largest_relative_difference": max(abs(a - b) / abs(b) for a, b in zip(two, one)),
    }
    if os.environ.get("FLAME_GPU_REPORT"):
        path = Path(os.environ["FLAME_GPU_REPORT"])
        earlier = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps(earlier | {name: report}, indent=2) + "\n")
    print(json.dumps(report, indent=2))

    assert len(two) == STEPS and len(resumed) == STEPS
    # bf16 everywhere; FSDP reduces gradients in bf16 and DeepSpeed trains bf16 weights, hence not bit for bit
    assert two == pytest.approx(one, rel=2e-2)
    # each setup repeats itself bit for bit on the GPU (two fresh FSDP runs did), so a resume must too: under FSDP
    # within 1e-3 it hid AdamW's moments not being loaded (flame.optim.fill_state)
    assert resumed == two
    saved = run / "checkpoints" / f"step-{STEPS:08d}"
    state = json.loads((saved / "state" / "trainer.json").read_text())
    assert state["world"] == 2 and state["step"] == STEPS and state["data"]["position"] == STEPS * 2 * 2
    # model/ holds the whole model (gathered from the shards under FSDP and ZeRO-3), as the one-process run's
    from safetensors import safe_open

    def shapes(checkpoint: Path) -> dict:
        with safe_open(str(checkpoint / "model" / "model.safetensors"), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    assert shapes(saved) == shapes(setup / "one" / "checkpoints" / f"step-{STEPS:08d}")


@pytest.mark.parametrize("name", SETUPS)
def test_two_gpus_accumulating_micro_batches_train_the_losses_of_one(setup, name):
    """--batch 1 --update 2 per GPU: the reference's 4 sequences an update (batch 2 x update 2 on one GPU), each
    process's gradients accumulated over 2 micro-batches before they are reduced (accelerate's accumulate: no_sync
    under DDP and FSDP, DeepSpeed's own under ZeRO), and the same losses."""
    run = setup / f"{name}-accumulated"
    options = [*OPTIONS, "--update", "2"]
    options[options.index("--batch") + 1], options[options.index("--save") + 1] = "1", str(STEPS)
    _launch(name, 29610 + SETUPS.index(name), "train", "--model", str(setup / "gla.json"), "--cache",
            str(setup / "ds"), *options, "--path", str(run))  # fmt: skip
    one, accumulated = _losses(setup / "one"), _losses(run)
    print(json.dumps({"setup": name, "one_gpu": one, "two_gpus_update_2": accumulated}))
    assert len(accumulated) == STEPS
    assert accumulated == pytest.approx(one, rel=2e-2)  # bf16, as in the test above
    state = json.loads((run / "checkpoints" / f"step-{STEPS:08d}" / "state" / "trainer.json").read_text())
    assert (state["world"], state["data"]["position"]) == (2, STEPS * 1 * 2 * 2)  # batch x update x processes


def test_ddp_captures_its_update_and_trains_what_it_trains_eagerly(setup):
    """By default DDP's update is captured too (DDP's all-reduce with it, the model prepared on the capturing
    stream), after DDP's 11 eager updates: the same losses as DDP's eager loop bit for bit, over 16 updates, 5 of
    them replayed."""
    common = ["--model", str(setup / "gla.json"), "--cache", str(setup / "ds"), *OPTIONS, "--steps", "16"]
    graphed = _launch("ddp", 29610, "train", *common, "--path", str(setup / "ddp-graphed"))
    eager = _launch("ddp", 29611, "train", *common, "--path", str(setup / "ddp-eager"), "--no-cuda-graphs")
    assert "CUDA graph: update 12 captured in " in graphed.stdout, graphed.stdout + graphed.stderr
    assert "CUDA graph" not in eager.stdout + eager.stderr
    a, b = _losses(setup / "ddp-eager"), _losses(setup / "ddp-graphed")
    print(json.dumps({"eager": a, "graphed": b}))
    assert len(a) == 16 and b == a
