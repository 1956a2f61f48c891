"""The first step: notice before it on CUDA, still-working lines during it, its time reported on its own."""

import json
import time
import types
from pathlib import Path

import pytest

from flame import engine, firststep, metrics
from flame.config import TrainConfig
from flame.firststep import FirstStep, compile_notice, triton_cache_dir
from tests.prepared import counting_docs, llama_config, make_prepared


def test_the_cache_dir_is_triton_cache_dir_else_home(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "tc"))
    assert triton_cache_dir() == tmp_path / "tc"
    monkeypatch.delenv("TRITON_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert triton_cache_dir() == tmp_path / ".triton" / "cache"


def test_the_notice_is_for_cuda_only_and_names_the_cache(monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", "/shared/triton")
    assert compile_notice("cpu") is None
    assert compile_notice("cuda") == (
        "first step: FLA's Triton kernels are compiled and autotuned for this run's shapes on first use "
        "(minutes on a fresh machine); the results are cached in /shared/triton and later runs reuse them"
    )


def test_on_cuda_the_step_is_announced_kept_alive_and_timed(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_CACHE_DIR", "/shared/triton")
    with FirstStep("cuda", every=0.1, quiet_for=0.05) as first:
        first.begin()
        time.sleep(0.4)
        seconds = first.end()
        assert first.seconds == seconds and 0.35 <= seconds < 2
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == compile_notice("cuda")
    alive = lines[1:-1]
    assert len(alive) >= 2 and all(ln.startswith("first step: still compiling/autotuning kernels, ") for ln in alive)
    assert lines[-1] == firststep.done_line(seconds, True)
    assert firststep.done_line(12.34, True) == (
        "first step took 12.3 s (compilation and autotuning included; not counted in tokens/s)"
    )


def test_a_step_from_a_warm_cache_prints_only_its_time(capsys):
    with FirstStep("cuda", every=0.05, quiet_for=1.0) as first:
        first.begin()
        time.sleep(0.1)
        seconds = first.end()
    assert capsys.readouterr().out.splitlines() == [f"first step took {seconds:.1f} s (not counted in tokens/s)"]


def test_on_cpu_no_notice_only_the_time(capsys):
    with FirstStep("cpu", every=0.05) as first:
        first.begin()
        time.sleep(0.15)
        seconds = first.end()
    assert capsys.readouterr().out.splitlines() == [f"first step took {seconds:.1f} s (not counted in tokens/s)"]


def test_other_ranks_print_nothing(capsys):
    with FirstStep("cuda", enabled=False, every=0.05) as first:
        first.begin()
        time.sleep(0.12)
        assert first.end() >= 0.12
    assert capsys.readouterr().out == ""


def test_an_error_in_the_step_stops_the_ticker(capsys):
    with pytest.raises(RuntimeError), FirstStep("cuda", every=0.05) as first:
        first.begin()
        raise RuntimeError("boom")
    time.sleep(0.15)
    out = capsys.readouterr().out
    assert first._thread is None and "first step took" not in out
    time.sleep(0.1)
    assert capsys.readouterr().out == ""


def test_train_reports_the_first_step_apart_and_keeps_it_out_of_tokens_per_s(tmp_path, monkeypatch, capsys):
    make_prepared(tmp_path / "ds", counting_docs(100, 64), 64)
    llama_config(tmp_path / "llama.json")
    real, calls = engine.forward_loss, {"n": 0}
    # The throughput meter's clock jumps 1000 s in step 1 as well: had step 1 counted, tokens/s would be below
    # 4 x (4 x 32) / 1000, however slow the machine runs the other steps.
    jump = {"s": 0.0}
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + jump["s"]))

    def slow_first(model, batch, num_items):  # a first step as slow as a kernel compilation, on the CPU path
        calls["n"] += 1
        if calls["n"] == 1:
            time.sleep(1.5)
            jump["s"] = 1000.0
        return real(model, batch, num_items)

    monkeypatch.setattr(engine, "forward_loss", slow_first)
    cfg = TrainConfig(
        model=str(tmp_path / "llama.json"), cache=str(tmp_path / "ds"), path=str(tmp_path / "run"),
        context=32, batch=4, steps=4, logging=1, save=1000, seed=0,
    )  # fmt: skip
    engine.train(cfg)
    records = [json.loads(ln) for ln in (Path(cfg.path) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0]["first_step_s"] >= 1.5 and all("first_step_s" not in r for r in records[1:])
    assert records[0]["tokens_per_s"] == 0.0  # nothing measured yet: step 1 is not throughput
    assert all(r["tokens_per_s"] > 4 * 4 * 32 / 1000 for r in records[1:])
    out = capsys.readouterr().out
    assert out.count("first step took ") == 1 and "Triton" not in out  # CPU: no compile notice
    assert firststep.done_line(records[0]["first_step_s"], False) in out


def test_a_continued_run_reports_its_own_first_step_in_its_first_record(tmp_path):
    make_prepared(tmp_path / "ds", counting_docs(100, 64), 64)
    llama_config(tmp_path / "llama.json")
    base = dict(model=str(tmp_path / "llama.json"), cache=str(tmp_path / "ds"), context=32, batch=4, seed=0)
    engine.train(TrainConfig(**base, path=str(tmp_path / "run"), steps=2, logging=1, save=2))
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    engine.train(TrainConfig(**base, path=str(tmp_path / "run"), steps=6, logging=2, save=100, checkpoint=str(ckpt)))
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 4, 6]
    assert ["first_step_s" in r for r in records] == [True, False, True, False]


def test_tuning_records_each_kernel_and_shape_and_restores_triton(monkeypatch):
    from triton import knobs
    from triton.runtime.autotuner import Autotuner

    def bench(autotuner, *args, config, **meta):  # stands in for Triton's: one config benchmarked
        time.sleep(0.01)
        return [float(config)]

    monkeypatch.setattr(Autotuner, "_bench", bench)
    kernel = types.SimpleNamespace(__name__="chunk_fwd_kernel")
    tuner = types.SimpleNamespace(fn=types.SimpleNamespace(fn=kernel), arg_names=["q", "K", "BT"], keys=["K", "BT"])
    tuning = firststep.Tuning().install()
    assert Autotuner._bench is not bench
    assert tuning.doing() == ""
    for config in (1, 2, 3):
        assert Autotuner._bench(tuner, "q", 64, config=config, BT=16) == [float(config)]
    Autotuner._bench(tuner, "q", 128, config=1, BT=16)
    assert tuning.doing() == "autotuning chunk_fwd_kernel (K=128,BT=16), 2 kernels so far"
    knobs.runtime.jit_cache_hook()
    time.sleep(0.01)
    knobs.runtime.jit_post_compile_hook()
    tuning.uninstall()
    assert Autotuner._bench is bench
    assert knobs.runtime.jit_cache_hook is None and knobs.runtime.jit_post_compile_hook is None

    record = tuning.record()
    assert [(t["kernel"], t["key"], t["configs"]) for t in record["tuned"]] == [
        ("chunk_fwd_kernel", "K=64,BT=16", 3),
        ("chunk_fwd_kernel", "K=128,BT=16", 1),
    ]
    assert record["kernels_tuned"] == 2 and record["configs_benchmarked"] == 4 and record["compilations"] == 1
    assert record["tuning_s"] >= 0.04 and record["compile_s"] >= 0.01
    line = tuning.summary(top=1)
    assert line.startswith("first step: autotuned 2 kernel/shape pairs, 4 configs benchmarked in 0 s")
    assert line.endswith("slowest: chunk_fwd_kernel (K=64,BT=16) 3 configs 0 s")
    assert firststep.Tuning().summary() is None


def test_tuning_leaves_hooks_set_by_others_alone(monkeypatch):
    from triton import knobs

    mine = lambda *a, **k: False  # noqa: E731
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", mine)
    tuning = firststep.Tuning().install()
    tuning.uninstall()
    assert knobs.runtime.jit_cache_hook is mine and knobs.runtime.jit_post_compile_hook is None
