import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flame.config import TrainConfig
from flame.optim import build_optimizer, lr_at


def test_warmup_is_linear_from_the_first_update():
    assert [lr_at(s, lr=1.0, steps=100, warmup=4, scheduler="constant") for s in range(5)] == [0.25, 0.5, 0.75, 1, 1]


def test_cosine_ends_at_min_lr_ratio():
    kw = dict(lr=2.0, steps=12, warmup=1, scheduler="cosine", min_lr=0.1)
    assert lr_at(1, **kw) == pytest.approx(2.0)
    assert lr_at(6, **kw) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    assert lr_at(11, **kw) == pytest.approx(0.2)  # the last update
    assert lr_at(50, **kw) == pytest.approx(0.2)  # past the end: stays at the floor


def test_linear_decays_to_min_lr():
    kw = dict(lr=1.0, steps=6, warmup=1, scheduler="linear", min_lr=0.0)
    assert [lr_at(s, **kw) for s in range(6)] == pytest.approx([1.0, 1.0, 0.75, 0.5, 0.25, 0.0])


def test_wsd_is_flat_then_decays_in_the_last_fraction():
    kw = dict(lr=1.0, steps=100, warmup=10, scheduler="wsd", min_lr=0.0, decay_ratio=0.1)
    assert lr_at(10, **kw) == 1.0
    assert lr_at(89, **kw) == 1.0
    assert lr_at(90, **kw) == pytest.approx(0.9)
    assert lr_at(99, **kw) == pytest.approx(0.0)


def test_schedule_is_pure():
    values = [lr_at(s, lr=3e-4, steps=50, warmup=5, min_lr=0.1) for s in range(50)]
    assert values == [lr_at(s, lr=3e-4, steps=50, warmup=5, min_lr=0.1) for s in range(50)]
    assert all(math.isfinite(v) and v > 0 for v in values)


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, TrainConfig(decay=0.1, beta1=0.8, beta2=0.9), "cpu")
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert sorted(p.ndim for p in decayed["params"]) == [2, 2]
    assert sorted(p.ndim for p in plain["params"]) == [1, 1, 1]
    assert decayed["betas"] == (0.8, 0.9)


def test_flames_adamw_where_the_launcher_leaves_the_optimizer_whole():
    """One process and DDP get flame's AdamW (its step and folded clip on a GPU, flame.kernels.adamw); FSDP and
    DeepSpeed, which shard or wrap the optimizer, torch's. Both keep torch's state, so checkpoints move between them."""
    from flame.kernels.adamw import AdamW

    model = torch.nn.Linear(4, 4)
    own = build_optimizer(model, TrainConfig(), "cpu", own_step=True)
    plain = build_optimizer(model, TrainConfig(), "cpu")
    assert type(own) is AdamW and type(plain) is torch.optim.AdamW
    assert own.defaults == plain.defaults and own.defaults["fused"] is True


def test_an_fsdp_checkpoint_gives_a_new_optimizer_its_moments(tmp_path):
    """accelerate loads FSDP's sharded optimizer state into what the live optimizer holds: nothing, in a new one,
    unless flame.optim.fill_state gave it a state first (2 CPU processes on gloo, accelerate's own save and load)."""
    script = Path(__file__).resolve().parent / "fsdp_optimizer.py"
    repo = script.parents[1]
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541"]
    done = subprocess.run(
        [*run, str(script), str(tmp_path / "optimizer")],
        env=os.environ | {"PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    restored = {f.name: int(f.read_text()) for f in (tmp_path / "optimizer").glob("restored-*")}
    assert sorted(restored) == ["restored-0", "restored-1"] and min(restored.values()) > 0, restored
