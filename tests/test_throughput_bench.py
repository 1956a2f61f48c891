"""Plumbing of benchmarks/throughput.py on the CPU: a subprocess per engine, its JSON row back, the table printed.
(The measurement itself is a benchmark for the GPU machine, never a timed test.)"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import throughput  # noqa: E402


def test_tiny_bare_run_returns_a_row_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["--device", "cpu", "--tiny", "--engines", "bare", "--batch", "2", "--context", "64"]
    assert throughput.main(argv + ["--steps", "2", "--warmup", "1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert (row["model"], row["engine"], row["device"]) == ("tiny-gla", "bare", "cpu")
    assert row["tokens_per_s"] > 0 and row["first_s"] > 0 and row["peak_gib"] > 0
    assert row["mfu"] is None and row["mfu_6n"] is None  # no known peak FLOP/s on a CPU
    assert row["kernels"] == "torch"  # on the CPU every engine runs flame.kernels' portable code
    # every update counted by the optimizer hook; collections only between the first and the last (3 generations)
    assert row["gc"]["updates"] == 1 + 1 + 2 and len(row["gc"]["collections"]) == len(row["gc"]["seconds"]) == 3
    lines = capsys.readouterr().out.splitlines()
    assert "batch 2 x context 64, 2 timed steps after 1 + 1" in lines
    assert "model      engine       tokens/s    MFU  MFU 6N  peak GiB  first s" in lines
    assert any(ln.startswith("tiny-gla   bare       ") for ln in lines)


def test_on_a_gpu_flame_runs_its_own_kernels_and_the_baselines_fla_s_as_shipped():
    assert throughput._kernels("flame", set()) == "auto"
    assert throughput._kernels("flame", {"share-casts", "fla-kernels"}) == "triton"
    assert throughput._kernels("bare", set()) == throughput._kernels("hf", set()) == "triton"
    assert (
        throughput._kernels("bare-graph", {"flame-kernels"}) == throughput._kernels("hf", {"flame-kernels"}) == "auto"
    )


def test_bare_async_runs_the_bare_loop_without_reading_back_and_is_compared_with_flame(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["--device", "cpu", "--tiny", "--engines", "bare-async,flame", "--batch", "1", "--context", "32"]
    assert throughput.main(argv + ["--steps", "2", "--warmup", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["engine"] for r in rows] == ["bare-async", "flame"]
    assert rows[0]["params"] == rows[1]["params"] and rows[0]["tokens_per_s"] > 0
    # the global optimizer-step hook sees flame's AdamW once per update, through accelerate's wrapper
    assert [r["gc"]["updates"] for r in rows] == [1 + 0 + 2, 1 + 0 + 2]
    assert "tiny-gla: flame/bare-async tokens/s " in capsys.readouterr().out


def test_an_engine_with_options_runs_beside_the_plain_one_and_is_compared_with_it(tmp_path, capsys):
    """flame:share-casts is flame with --share-casts (on the CPU, fp32: the casts do nothing), in the same run."""
    out = tmp_path / "rows.json"
    argv = ["--device", "cpu", "--tiny", "--engines", "bare,bare:share-casts,flame,flame:share-casts"]
    assert (
        throughput.main(argv + ["--batch", "1", "--context", "32", "--steps", "1", "--warmup", "0", "--json", str(out)])
        == 0
    )
    rows = json.loads(out.read_text())
    assert [r["engine"] for r in rows] == ["bare", "bare:share-casts", "flame", "flame:share-casts"]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    printed = capsys.readouterr().out
    ratios = [ln.split(" tokens/s")[0] for ln in printed.splitlines() if ln.startswith("tiny-gla: ")]
    assert ratios == [
        "tiny-gla: bare:share-casts/bare",
        "tiny-gla: flame/bare",
        "tiny-gla: flame:share-casts/bare",
        "tiny-gla: flame:share-casts/flame",
    ]
    assert any(ln.startswith("tiny-gla   flame:share-casts ") for ln in printed.splitlines())


def test_profile_runs_more_steps_under_the_profiler_and_prints_where_the_time_went(tmp_path, capsys):
    """bare profiles its own extra steps; flame's loop is the engine's, so its steps are counted by an optimizer
    hook: the timed window and the profiled updates come from that hook, and the run has 2 more updates."""
    out = tmp_path / "rows.json"
    argv = ["--device", "cpu", "--tiny", "--engines", "bare,flame", "--batch", "1", "--context", "32", "--steps", "2"]
    assert throughput.main(argv + ["--warmup", "1", "--profile", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    printed = capsys.readouterr().out
    for row in rows:
        prof = row["profile"]
        assert prof["steps"] == 2 and prof["gpu_busy"] is None and prof["wall_ms_per_step"] > 0  # no busy share
        assert prof["host_top"] == []  # on the CPU the host's ops are "top" itself
        names = [name for name, ms, share in prof["top"]]
        assert "aten::mm" in names and 0 < len(names) <= 25
        assert sum(share for _, _, share in prof["top"]) <= 1.0 + 1e-9
        assert row["tokens_per_s"] > 0
        assert f"tiny-gla {row['engine']}: {prof['wall_ms_per_step']:.1f} ms per step; most time:" in printed
    assert [r["engine"] for r in rows] == ["bare", "flame"]
    assert [r["gc"]["updates"] for r in rows] == [1 + 1 + 2 + 2] * 2  # the profiled updates after the timed ones


def test_profile_refuses_a_cuda_graph_engine(capsys):
    """A replayed graph steps the optimizer where no hook runs: refused before any worker starts."""
    with pytest.raises(SystemExit) as exc:
        throughput.main(["--device", "cuda", "--tiny", "--engines", "flame:cuda-graphs", "--profile", "2"])
    assert exc.value.code == 2
    assert "--profile counts optimizer steps, which a replayed CUDA graph does not make" in capsys.readouterr().err


@pytest.mark.parametrize("engines", ["bare,fast", "flame:fast", "fast:compile"])
def test_an_unknown_engine_or_option_is_refused(engines):
    with pytest.raises(SystemExit) as exc:
        throughput.main(["--device", "cpu", "--tiny", "--engines", engines])
    assert exc.value.code == 2


def test_an_unknown_model_is_refused():
    with pytest.raises(SystemExit) as exc:
        throughput.main(["--models", "gla-9B"])
    assert exc.value.code == 2


def test_set_overrides_the_model_config_for_every_engine(tmp_path):
    rows = {}
    for layers in (2, 1):
        out = tmp_path / f"rows{layers}.json"
        argv = ["--device", "cpu", "--tiny", "--engines", "bare", "--batch", "1", "--context", "32", "--steps", "1"]
        argv += ["--warmup", "0", "--set", f"num_hidden_layers={layers}", "--json", str(out)]
        assert throughput.main(argv) == 0
        (rows[layers],) = json.loads(out.read_text())
    one_layer = rows[2]["params"] - rows[1]["params"]
    assert one_layer > 0 and rows[1]["params"] - one_layer > 0  # embeddings and head stay


def test_set_needs_key_equals_value():
    with pytest.raises(SystemExit):
        throughput.main(["--device", "cpu", "--tiny", "--set", "fuse_norm"])


def test_a_model_fla_refuses_on_this_gpu_is_skipped_before_any_worker_runs(tmp_path, monkeypatch, capsys):
    why = "gated_deltanet cannot train on this NVIDIA H200 with Triton 3.6.0: FLA refuses its backward pass there"
    monkeypatch.setattr(throughput, "_blocker", lambda path: (why, "pip install 'triton>=3.7.1'"))
    monkeypatch.setattr(throughput.subprocess, "Popen", None)  # no worker may start
    out = tmp_path / "rows.json"
    assert throughput.main(["--models", "gdn-340M", "--engines", "bare,flame", "--json", str(out)]) == 1
    assert json.loads(out.read_text()) == [
        {"model": "gdn-340M", "engine": "bare", "error": why},
        {"model": "gdn-340M", "engine": "flame", "error": why},
    ]
    assert f"gdn-340M   flame      failed ({why})" in capsys.readouterr().out.splitlines()


def test_repeat_interleaves_the_engines_and_reports_the_median_run(tmp_path, monkeypatch, capsys):
    order, speeds = [], {"bare": iter([100.0, 300.0, 200.0]), "flame": iter([90.0, 95.0, 400.0])}

    def fake_run(model, eng, config_path, args, env, round_):
        order.append((round_, eng))
        first = 50.0 if round_ == 0 else 1.0
        row = {"model": model, "engine": eng, "tokens_per_s": next(speeds[eng]), "first_s": first}
        return row | {"peak_gib": 1.0 + round_, "mfu": None, "mfu_6n": None, "device": "cpu"}

    monkeypatch.setattr(throughput, "_run_engine", fake_run)
    out = tmp_path / "rows.json"
    argv = ["--device", "cpu", "--tiny", "--engines", "bare,flame", "--repeat", "3", "--json", str(out)]
    assert throughput.main(argv) == 0
    assert order == [(0, "bare"), (0, "flame"), (1, "flame"), (1, "bare"), (2, "bare"), (2, "flame")]
    bare, flame = json.loads(out.read_text())
    assert (bare["tokens_per_s"], bare["tokens_per_s_runs"]) == (200.0, [100.0, 300.0, 200.0])
    assert (flame["tokens_per_s"], flame["first_s"], flame["peak_gib"]) == (95.0, 50.0, 3.0)
    assert "tiny-gla: flame/bare tokens/s 0.475, peak memory 1.000" in capsys.readouterr().out


def test_repeat_must_be_positive():
    with pytest.raises(SystemExit):
        throughput.main(["--device", "cpu", "--tiny", "--repeat", "0"])


@pytest.mark.parametrize("warmup", [0, 2])
def test_the_hf_trainer_is_timed_over_the_window_after_its_warm_up(tmp_path, warmup):
    out = tmp_path / "rows.json"
    argv = ["--device", "cpu", "--tiny", "--engines", "hf", "--batch", "1", "--context", "32", "--steps", "2"]
    assert throughput.main(argv + ["--warmup", str(warmup), "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["engine"] == "hf" and row["tokens_per_s"] > 0 and row["first_s"] > 0


def test_the_checkpointing_option_checkpoints_each_engines_blocks(tmp_path, capsys):
    """bare:checkpointing and flame:checkpointing run with activation checkpointing, beside the plain engines."""
    import argparse

    from flame.models import build_model

    model, config = build_model(_tiny_config(tmp_path), seed=0)
    options = argparse.Namespace(checkpointing=True, share_casts=False, bf16_residual=False, compile=False)
    throughput._apply_options(model, config, options)
    assert all(block.gradient_checkpointing for block in model.model.layers)

    out = tmp_path / "rows.json"
    argv = ["--device", "cpu", "--tiny", "--engines", "bare:checkpointing,flame:checkpointing", "--batch", "1"]
    assert throughput.main(argv + ["--context", "32", "--steps", "1", "--warmup", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["engine"] for r in rows] == ["bare:checkpointing", "flame:checkpointing"]
    assert all(r["tokens_per_s"] > 0 for r in rows)


def _tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(throughput.TINY))
    return path


def test_bare_graph_needs_a_gpu(capsys):
    with pytest.raises(SystemExit) as exc:
        throughput.main(["--device", "cpu", "--tiny", "--engines", "bare,bare-graph"])
    assert exc.value.code == 2
    assert "bare-graph captures CUDA graphs: it needs --device cuda" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        throughput.main(["--device", "cpu", "--tiny", "--engines", "flame,flame:cuda-graphs"])
    assert "flame:cuda-graphs captures CUDA graphs: it needs --device cuda" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the bare loop's own is bare-graph
        throughput.main(["--device", "cuda", "--tiny", "--engines", "bare:cuda-graphs"])
    assert ":cuda-graphs is flame's option" in capsys.readouterr().err


@pytest.mark.gpu
def test_bare_graph_and_flame_cuda_graphs_capture_the_whole_step_and_replay_it(tmp_path, capsys):
    out = tmp_path / "rows.json"
    engines = "bare,bare-graph,flame,flame:cuda-graphs"
    # GLA-340M's layer x 2 at 2 x 2048: the shapes of tests/test_gpu_graphs.py, whose FLA tuning
    # flame/tuning/h200-340M.tgz holds (a tiny model's new shapes took minutes to tune on a fresh machine)
    argv = ["--models", "gla-340M", "--set", "num_hidden_layers=2", "--engines", engines]
    argv += ["--batch", "2", "--context", "2048", "--steps", "5"]
    assert throughput.main(argv + ["--warmup", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["engine"] for r in rows] == engines.split(",")
    assert all(r["tokens_per_s"] > 0 and r["peak_gib"] > 0 for r in rows)
    assert "gla-340M: bare-graph/bare tokens/s " in capsys.readouterr().out


def test_group_projections_groups_the_bare_loop_s_and_flame_s_and_not_the_trainer_s(capsys):
    """bare:group-projections and flame:group-projections group the tiny GLA's projections (its 2 layers: q, k, v,
    gate and the low-rank gate's first linear; the MLP's gate and up) before update 1; the HF Trainer has no such
    option, and plain flame runs them one by one as the other engines do."""
    argv = ["--device", "cpu", "--tiny", "--engines", "bare:group-projections,flame,flame:group-projections"]
    assert throughput.main(argv + ["--batch", "1", "--context", "32", "--steps", "1", "--warmup", "0"]) == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "grouped projections: [5, 2, 5, 2]" in text  # the bare loop's
    assert text.count("--group-projections: projections that read one input, grouped: 4 groups of 2/5") == 1
    with pytest.raises(SystemExit):
        throughput.main(["--device", "cpu", "--tiny", "--engines", "hf:group-projections"])
    assert ":group-projections is for bare, bare-async and flame" in capsys.readouterr().err


def test_flames_last_step_record_stops_the_gc_clock(tmp_path):
    """Under CUDA graphs the optimizer hook sees no replayed update, so the record of flame's last step stops the
    garbage-collector clock, before train() collects what the run leaves; a collection after that is not counted."""
    import argparse
    import gc

    import torch

    from flame.logging import RunLogger

    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps(throughput.TINY))
    clock = throughput._GcClock(last=10**9)  # as if no update after the first were seen
    clock.updates = 1
    stops = []
    clock.stop = lambda: stops.append(1) or throughput._GcClock.stop(clock)
    record = RunLogger.record
    options = dict.fromkeys(("compile", "share_casts", "bf16_residual", "checkpointing", "cuda_graphs"), False)
    args = argparse.Namespace(warmup=1, steps=2, profile=0, batch=1, context=32, group_projections=None, **options)
    (work := tmp_path / "work").mkdir()
    row = throughput.run_flame(str(tiny), args, torch.device("cpu"), work, clock)
    assert row["tokens_per_s"] > 0 and len(stops) == 1 and clock.stopped
    assert RunLogger.record is record  # put back
    before = clock.counts[:]
    clock.on_gc("start", {"generation": 2})
    gc.collect()
    clock.on_gc("stop", {"generation": 2})
    assert clock.counts == before


def test_flames_gc_clock_starts_after_the_collection_its_engine_runs_after_step_1(tmp_path, monkeypatch):
    """engine.freeze_survivors collects once, on purpose, after flame's first update (in the first step's time, not in
    tokens/s): the clock leaves it out and starts at the record of step 1."""
    import argparse
    import gc

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from flame import engine

    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps(throughput.TINY))
    clock = throughput._GcClock(last=10**9)
    around = []
    freeze = engine.freeze_survivors

    def watched():
        before = (clock.updates, clock.counts[:])
        freeze()
        around.append((before, clock.counts[:]))

    monkeypatch.setattr(engine, "freeze_survivors", watched)
    options = dict.fromkeys(("compile", "share_casts", "bf16_residual", "checkpointing", "cuda_graphs"), False)
    args = argparse.Namespace(warmup=1, steps=2, profile=0, batch=1, context=32, group_projections=None, **options)
    (work := tmp_path / "work").mkdir()
    hook = register_optimizer_step_post_hook(clock.on_step)
    gc.callbacks.append(clock.on_gc)
    try:
        throughput.run_flame(str(tiny), args, torch.device("cpu"), work, clock)
    finally:
        gc.callbacks.remove(clock.on_gc)
        hook.remove()
    [((updates, before), after)] = around
    assert updates == 1 and before == after == [0, 0, 0]  # after update 1, and its full collection not counted
    assert clock.updates == 1 + 1 + 2 and not clock.waiting and clock.stopped


def test_gla_states_variants_set_flames_worker_environment(monkeypatch, capsys):
    """flame:keep-states and flame:fla-states run flame with FLAME_GLA_STATES=keep and =fla (plain flame: unset, the
    default); neither means anything to FLA's kernels as shipped, so the baselines and :fla-kernels refuse them."""
    monkeypatch.delenv("FLAME_GLA_STATES", raising=False)
    seen = []

    class Worker:
        def __init__(self, cmd, env, **kwargs):
            seen.append(env.get("FLAME_GLA_STATES"))
            row = {"tokens_per_s": 1.0, "first_s": 1.0, "peak_gib": 1.0, "mfu": None, "mfu_6n": None, "device": "cpu"}
            self.stdout, self.returncode = iter([f"RESULT {json.dumps(row)}\n"]), 0

        def wait(self):
            return 0

    monkeypatch.setattr(throughput.subprocess, "Popen", Worker)
    assert throughput.main(["--device", "cpu", "--tiny", "--engines", "flame,flame:keep-states,flame:fla-states"]) == 0
    assert seen == [None, "keep", "fla"]
    for engines in (
        "hf:keep-states",
        "bare:fla-states",
        "flame:fla-kernels:keep-states",
        "flame:keep-states:fla-states",
    ):
        with pytest.raises(SystemExit):
            throughput.main(["--device", "cpu", "--tiny", "--engines", engines])
        assert ":fla-states or :keep-states (one of them) is for flame's kernels" in capsys.readouterr().err
    assert seen == [None, "keep", "fla"]  # nothing ran


def test_paired_runs_the_engines_at_once_taking_turns_and_prints_each_rounds_ratio(tmp_path, capsys):
    """--paired 2 with 4 timed steps: both workers alive, one engine running at a time; round 0 is each worker's
    set-up, step 1 and warm-up, then 2 rounds of 2 updates each, the order reversed every other round."""
    out = tmp_path / "rows.json"
    argv = ["--device", "cpu", "--tiny", "--engines", "bare,flame", "--batch", "1", "--context", "32"]
    assert throughput.main(argv + ["--steps", "4", "--warmup", "1", "--paired", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["engine"] for r in rows] == ["bare", "flame"]
    for row in rows:
        assert len(row["turns_s"]) == 2 and all(s > 0 for s in row["turns_s"])
        assert row["tokens_per_s"] == pytest.approx(4 * 32 / sum(row["turns_s"]))  # timed over its turns only
        assert row["gc"]["updates"] == 1 + 1 + 4
    printed = capsys.readouterr()
    turns = [ln.split(" (batch 1 x 32): ")[::-1] for ln in printed.err.splitlines() if ln.startswith("== tiny-gla ")]
    assert turns == [
        ["set-up, step 1 and warm-up", "== tiny-gla bare"],
        ["set-up, step 1 and warm-up", "== tiny-gla flame"],
        ["turn 1/2, 2 updates", "== tiny-gla flame"],
        ["turn 1/2, 2 updates", "== tiny-gla bare"],
        ["turn 2/2, 2 updates", "== tiny-gla bare"],
        ["turn 2/2, 2 updates", "== tiny-gla flame"],
    ]
    bare, flame = rows
    ratios = sorted(b / f for b, f in zip(bare["turns_s"], flame["turns_s"]))
    line = next(ln for ln in printed.out.splitlines() if ln.startswith("tiny-gla: flame/bare tokens/s "))
    assert line.endswith(f"; turn by turn: median {ratios[0]:.3f}, {ratios[0]:.3f}..{ratios[1]:.3f} over 2 rounds")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "5", "--paired", "2"], "--paired 2: --steps must be a multiple of it"),
        (["--paired", "2", "--repeat", "2"], "--paired takes turns within one run: drop --repeat and --profile"),
        (["--paired", "2", "--profile", "2"], "--paired takes turns within one run: drop --repeat and --profile"),
        (["--paired", "-1"], "--paired must be at least 1"),
    ],
)
def test_paired_refuses_what_it_cannot_time(extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        throughput.main(["--device", "cpu", "--tiny", "--engines", "bare,flame"] + extra)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_paired_refuses_a_cuda_graph_engine(capsys):
    with pytest.raises(SystemExit):
        throughput.main(["--device", "cuda", "--tiny", "--engines", "bare,flame:cuda-graphs", "--paired", "2"])
    assert "--paired counts optimizer steps, which a replayed CUDA graph does not make" in capsys.readouterr().err
