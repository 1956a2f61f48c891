"""flame.metrics: peak FLOPs table, MFU arithmetic, throughput window, ETA, peak memory."""

import pytest
import torch

from flame.metrics import Throughput, eta, mfu, peak_flops, peak_memory_gib


@pytest.mark.parametrize(
    "name, dtype, peak",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
        ("NVIDIA H200", "bf16", 989e12),
        ("NVIDIA H200", torch.bfloat16, 989e12),
        ("NVIDIA H100 PCIe", "bf16", 756e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
        ("NVIDIA A100-SXM4-80GB", "tf32", 156e12),
        ("NVIDIA A100-SXM4-80GB", torch.float32, 19.5e12),
        ("Tesla V100-SXM2-32GB", "bf16", None),
        ("cpu", "bf16", None),
        (None, "bf16", None),
        ("Some Future Accelerator", "bf16", None),
    ],
)
def test_peak_flops(name, dtype, peak):
    assert peak_flops(name, dtype) == peak


def test_mfu_arithmetic():
    # 8 H100 at 989 TFLOP/s; 2.0e9 FLOPs per token; 1.978e6 tokens/s in all -> 3.956e15 / 7.912e15 = 0.5
    assert mfu(1.978e6, 2.0e9, 8, 989e12) == pytest.approx(0.5)
    assert mfu(1000.0, 6.0e9, 1, 312e12) == pytest.approx(6.0e12 / 312e12)
    assert mfu(1000.0, 6.0e9, 1, None) is None


def test_throughput_window():
    meter = Throughput(n_devices=4, window=2)
    meter.update(tokens=1000, seconds=10.0)  # a slow warm-up step, aged out by the window
    meter.update(tokens=4000, seconds=1.0)
    meter.update(tokens=4000, seconds=3.0)
    assert meter.tokens_per_s == 2000.0
    assert meter.tokens_per_s_per_device == 500.0
    assert meter.seconds_per_step == 2.0


def test_throughput_counts_several_steps_at_once():
    meter = Throughput(window=3)
    meter.update(tokens=3000, seconds=6.0, steps=3)  # the engine waits for the GPU at log steps only
    meter.update(tokens=1000, seconds=1.0)
    assert (meter.tokens_per_s, meter.seconds_per_step) == (4000 / 7.0, 7.0 / 4)
    meter.update(tokens=6000, seconds=2.0, steps=3)  # the newest three steps are the window now
    assert (meter.tokens_per_s, meter.seconds_per_step) == (3000.0, 2.0 / 3)


def test_throughput_clock():
    meter = Throughput()
    assert meter.tokens_per_s == 0.0
    meter.update(tokens=10)  # the first call only starts the clock
    assert meter.tokens_per_s == 0.0
    meter.update(tokens=10)
    assert meter.tokens_per_s > 0


def test_eta():
    assert eta(100, 1000, 0.5) == 450.0
    assert eta(1000, 1000, 0.5) == 0.0
    assert eta(1200, 1000, 0.5) == 0.0


def test_peak_memory_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("reads the GPU counter on a GPU machine")
    block = torch.ones(64, 1024, 1024, dtype=torch.uint8)  # 64 MiB, touched
    assert peak_memory_gib() >= 64 / 1024
    del block
