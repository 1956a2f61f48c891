"""`--cuda-graphs` (flame.graphs) on the CPU: the engine's side of a captured update (static input buffers, the
learning rate on the device, the outputs copied out of each replay, the eager warm-up, checkpoints and resume) with
the capture itself replaced by a stand-in that replays by running the captured update again; and the refusals.
The capture on a GPU: tests/test_gpu_graphs.py."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flame import engine, graphs
from flame.cli.app import app
from flame.config import TrainConfig
from flame.errors import ConfigError
from flame.inspect import inspect
from tests.prepared import counting_docs, gla_config, make_prepared
from tests.stand_in import install

STEPS = 8


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    make_prepared(root / "ds", counting_docs(300, 64), 64, val_docs=counting_docs(20, 64, seed=1))
    gla_config(root / "gla.json")
    return root


@pytest.fixture
def stand_in(monkeypatch):
    """GraphedUpdate's capture replaced by tests/stand_in.py's, for this test."""
    return install(monkeypatch.setattr)


def _cfg(files, run: Path, **kw) -> TrainConfig:
    base = dict(
        model=str(files / "gla.json"), cache=str(files / "ds"), path=str(run), context=32, batch=2, update=2,
        steps=STEPS, lr=3e-3, warmup=3, seed=0, logging=4, save=4, limit=0, cuda_graphs=False,
    )  # fmt: skip
    return TrainConfig(**(base | kw))


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "checkpoints" / f"step-{step:08d}" / "model" / "model.safetensors")


def test_graphed_updates_train_what_the_eager_loop_trains(files, tmp_path, stand_in):
    eager = engine.train(_cfg(files, tmp_path / "eager"))
    graphed = engine.train(_cfg(files, tmp_path / "graphed", cuda_graphs=True))
    # captured once, after the 3 eager updates, with no gradients (the graph's backward writes them each replay)
    assert stand_in.captures == 1
    assert stand_in.grads_at_capture and all(g is None for g in stand_in.grads_at_capture)
    a, b = _records(tmp_path / "eager"), _records(tmp_path / "graphed")
    assert [r["step"] for r in b] == [1, 4, 8]
    # the record after the capture says when, and `flame inspect RUN` shows it
    assert [sorted(r.get("cuda_graph", {})) for r in b] == [[], ["capture_s", "update"], []]
    assert b[1]["cuda_graph"]["update"] == 4 and not any("cuda_graph" in r for r in a)
    assert inspect(tmp_path / "graphed").cuda_graph == b[1]["cuda_graph"]
    assert inspect(tmp_path / "eager").cuda_graph is None
    shown = " ".join(CliRunner().invoke(app, ["inspect", str(tmp_path / "graphed")]).output.split())
    assert "CUDA graph update 4 captured in 0.0 s, replayed since" in shown
    # the record at 8 averages the losses of updates 5-8, all replays: each its own loss, not the last one 4 times
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-6), key
    assert graphed.loss == pytest.approx(eager.loss, rel=1e-6)
    wa, wb = _weights(tmp_path / "eager", STEPS), _weights(tmp_path / "graphed", STEPS)
    assert wa.keys() == wb.keys()
    for name in wa:  # the learning rate reached every replayed update (warmup, then cosine)
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-7)


def test_a_non_finite_replayed_update_is_skipped_and_counted_as_eagerly(files, tmp_path, stand_in, monkeypatch):
    real = engine.forward_loss
    runs = {}
    for name, on in (("eager", False), ("graphed", True)):
        calls = {"n": 0}

        def poisoned(model, batch, num_items):  # update 5's two micro-batches (a replay): a NaN loss
            calls["n"] += 1
            loss = real(model, batch, num_items)
            return loss * float("nan") if calls["n"] in (9, 10) else loss

        monkeypatch.setattr(engine, "forward_loss", poisoned)
        result = engine.train(_cfg(files, tmp_path / name, cuda_graphs=on))
        runs[name] = (_records(tmp_path / name), result.skipped, _weights(tmp_path / name, STEPS))
    (eager, skipped, weights), (graphed, graphed_skipped, graphed_weights) = runs["eager"], runs["graphed"]
    assert skipped == graphed_skipped == 1
    assert [(r["step"], r["skipped"]) for r in graphed] == [(1, 0), (4, 0), (8, 1)]
    for key in ("loss", "grad_norm"):  # the record at 8: the mean of the finite losses 6-8, and update 8's norm
        assert [r[key] for r in graphed] == pytest.approx([r[key] for r in eager], rel=1e-6), key
    for name in weights:  # the skipped update left weights and moments as they were, in both
        torch.testing.assert_close(graphed_weights[name], weights[name], rtol=1e-5, atol=1e-7)


def test_a_graphed_run_continues_exactly_with_or_without_graphs(files, tmp_path, stand_in, capsys):
    engine.train(_cfg(files, tmp_path / "whole", cuda_graphs=True))
    assert "CUDA graph: update 4 captured in " in capsys.readouterr().out
    full = _records(tmp_path / "whole")
    for name, switch in (("on", None), ("off", False)):
        run = tmp_path / name  # the run as it was at its checkpoint at 4 (resume drops the later records)
        shutil.copytree(tmp_path / "whole", run)
        shutil.rmtree(run / "checkpoints" / f"step-{STEPS:08d}")
        engine.resume(run, {"cuda_graphs": switch})
        said = capsys.readouterr().out
        assert ("CUDA graph: update 8 captured in " in said) is (switch is None) and "update 4 captured" not in said
        assert json.loads((run / "config.json").read_text())["cuda_graphs"] is (switch is None)
        assert [r["step"] for r in _records(run)] == [1, 4, 8]
        assert [r["loss"] for r in _records(run)] == pytest.approx([r["loss"] for r in full], rel=1e-6), name
    # the whole run captured at update 4; the continuation with graphs warmed up again (5-7) and captured at 8, the
    # one without never
    assert stand_in.captures == 2


def test_options_that_change_shapes_or_compile_are_refused(files, tmp_path):
    for option in ("varlen", "compile", "checkpointing"):
        with pytest.raises(ConfigError, match=f"--cuda-graphs cannot be combined with --{option}: drop one"):
            engine.plan(_cfg(files, tmp_path, cuda_graphs=True, **{option: True}))


def test_graphs_need_cuda_and_the_fused_adamw():
    adamw = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], fused=True)
    cuda = torch.device("cuda")
    assert graphs.unsupported(cuda, adamw) is None
    assert graphs.unsupported(torch.device("cpu"), adamw) == "--cuda-graphs needs a CUDA GPU, this run is on cpu"
    assert "fused AdamW" in graphs.unsupported(cuda, None)


def test_the_cli_option_reaches_the_engine_and_a_cpu_run_gets_one_clear_error(files, tmp_path):
    args = ["train", "--model", str(files / "gla.json"), "--cache", str(files / "ds")]
    args += ["--context", "32", "--warmup", "1"]
    result = CliRunner().invoke(app, [*args, "--path", str(tmp_path / "dry"), "--cuda-graphs", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert re.search(r"^options +--cuda-graphs\b", result.output, re.M), result.output
    result = CliRunner().invoke(app, [*args, "--path", str(tmp_path / "run"), "--cuda-graphs", "--steps", "2"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines == [
        "error: --cuda-graphs needs a CUDA GPU, this run is on cpu: drop --cuda-graphs (flame resume: --no-cuda-graphs)"
    ], result.output
    assert not (tmp_path / "run").exists()  # refused before the run dir was made
    result = CliRunner().invoke(app, [*args, "--path", str(tmp_path / "v"), "--cuda-graphs", "--varlen", "--dry-run"])
    assert result.exit_code == 1 and "--cuda-graphs cannot be combined with --varlen" in result.output


def test_an_update_that_cannot_be_captured_is_one_clear_error(files, tmp_path, stand_in, monkeypatch):
    def record(self, body):
        raise RuntimeError("operation not permitted when stream is capturing\nCUDA kernel errors might be ...")

    monkeypatch.setattr(graphs.GraphedUpdate, "_record", record)
    args = ["train", "--model", str(files / "gla.json"), "--cache", str(files / "ds"), "--path", str(tmp_path / "r")]
    result = CliRunner().invoke(app, [*args, "--context", "32", "--warmup", "1", "--steps", "6", "--cuda-graphs"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "error: --cuda-graphs: the update could not be captured in a CUDA graph (operation not permitted when stream "
        "is capturing); the model may read a value back to the host during its update: drop --cuda-graphs (flame "
        "resume: --no-cuda-graphs)"
    ), result.output
    assert "Traceback" not in result.output


def test_by_default_a_run_that_allows_it_is_captured_and_one_that_does_not_trains_eagerly(
    files, tmp_path, stand_in, capsys
):
    engine.train(_cfg(files, tmp_path / "default", cuda_graphs=None))
    assert "CUDA graph: update 4 captured in " in capsys.readouterr().out and stand_in.captures == 1
    assert json.loads((tmp_path / "default" / "config.json").read_text())["cuda_graphs"] is None
    for option in ("varlen", "compile", "checkpointing"):  # not refused as with --cuda-graphs: eager
        engine.plan(_cfg(files, tmp_path / option, cuda_graphs=None, **{option: True}))
    engine.train(_cfg(files, tmp_path / "checkpointing", cuda_graphs=None, checkpointing=True))
    assert "CUDA graph" not in capsys.readouterr().out and stand_in.captures == 1


def test_by_default_graphs_are_wanted_on_cuda_one_process_or_ddp_with_the_fused_adamw(files, tmp_path):
    adamw = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], fused=True)
    cfg, cuda = _cfg(files, tmp_path, cuda_graphs=None), torch.device("cuda")
    assert graphs.wanted(cfg, cuda, "one process", adamw) is True
    assert graphs.wanted(cfg, cuda, "DDP", adamw) is True
    assert graphs.wanted(cfg, cuda, "DDP", adamw, machines=2) is False  # the all-reduce would cross the network
    assert graphs.wanted(_cfg(files, tmp_path, cuda_graphs=True), cuda, "DDP", adamw, machines=2) is True
    assert graphs.wanted(cfg, torch.device("cpu"), "one process", adamw) is False
    assert graphs.wanted(cfg, cuda, "FSDP2, full shard", adamw) is False
    assert graphs.wanted(cfg, cuda, "one process", None) is False
    assert graphs.wanted(_cfg(files, tmp_path, cuda_graphs=False), cuda, "one process", adamw) is False


def test_a_cpu_run_trains_eagerly_by_default(files, tmp_path, capsys):
    engine.train(_cfg(files, tmp_path / "cpu", cuda_graphs=None, steps=5))
    out = capsys.readouterr()
    assert "CUDA graph" not in out.out + out.err


def test_by_default_an_update_that_cannot_be_captured_trains_on_eagerly(files, tmp_path, stand_in, monkeypatch):
    """The capture fails in the forward of its first micro-batch (as a host read-back fails on a GPU), after
    accelerate counted that micro-batch: the run goes on eagerly from that update, with the eager run's losses
    and weights, and says why once."""
    real = engine.forward_loss
    capturing = {"now": False}

    def record(self, body):
        capturing["now"] = True
        try:
            return body()
        finally:
            capturing["now"] = False

    def forward_loss(model, batch, num_items):
        if capturing["now"]:
            raise RuntimeError("operation not permitted when stream is capturing\nCUDA kernel errors might be ...")
        return real(model, batch, num_items)

    monkeypatch.setattr(graphs.GraphedUpdate, "_record", record)
    monkeypatch.setattr(engine, "forward_loss", forward_loss)
    engine.train(_cfg(files, tmp_path / "eager"))
    args = ["train", "--model", str(files / "gla.json"), "--cache", str(files / "ds"), "--path", str(tmp_path / "r")]
    args += ["--context", "32", "--batch", "2", "--update", "2", "--steps", str(STEPS), "--lr", "3e-3"]
    args += ["--warmup", "3", "--seed", "0", "--logging", "4", "--save", "4", "--limit", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if "CUDA graph" in line]
    assert said == [
        "warning: CUDA graph: update 4 could not be captured (operation not permitted when stream is capturing); "
        "training on eagerly (--no-cuda-graphs skips the attempt)"
    ], result.output
    a, b = _records(tmp_path / "eager"), _records(tmp_path / "r")
    assert [r["step"] for r in b] == [1, 4, 8]
    failure = "operation not permitted when stream is capturing"
    assert b[1]["cuda_graph"] == {"update": 4, "failure": failure}
    shown = " ".join(CliRunner().invoke(app, ["inspect", str(tmp_path / "r")]).output.split())
    assert f"CUDA graph update 4 could not be captured ({failure}): trained eagerly" in shown
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-6), key
    wa, wb = _weights(tmp_path / "eager", STEPS), _weights(tmp_path / "r", STEPS)
    for name in wa:  # every update applied, once: the micro-batch count was put back after the failed capture
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-7)


def test_the_dry_run_says_whether_the_update_will_be_captured(files, tmp_path, monkeypatch):
    args = ["train", "--model", str(files / "gla.json"), "--cache", str(files / "ds"), "--context", "32"]
    args += ["--warmup", "1", "--dry-run", "--path", str(tmp_path / "dry")]

    def row(*extra) -> str:
        result = CliRunner().invoke(app, [*args, *extra])
        assert result.exit_code == 0, result.output
        return re.search(r"^CUDA graphs +(.*?)\s*$", result.output, re.M).group(1)

    assert row() == "on a CUDA GPU: captured at update 4"
    assert row("--no-cuda-graphs") == "off (--no-cuda-graphs)"
    assert row("--varlen") == "off with --varlen"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert row() == "on a CUDA GPU: captured at update 12"  # DDP: after its 11 eager updates
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert row() == "off on 2 machines (--cuda-graphs asks for them)"
    assert row("--cuda-graphs") == "on a CUDA GPU: captured at update 12"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert row() == "off under FSDP, full shard"
    result = CliRunner().invoke(app, [*args, "--cuda-graphs"])
    assert result.exit_code == 1
    assert "--cuda-graphs runs on one process or under DDP, this run is FSDP, full shard: drop --cuda-graphs" in (
        result.output
    )


def launched(*args: str, **env: str) -> str:
    """`flame ARGS` with tests/stand_in.py's capture on 2 CPU processes (gloo) under `accelerate launch`: what it
    printed (stdout, then stderr)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              "29541", "-m", "tests.stand_in"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "FLAME_QUIET": "1"} | env
    done = subprocess.run([*launch, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_a_graphed_ddp_update_trains_what_one_process_does(files, tmp_path):
    """Two CPU processes (gloo) under `accelerate launch` with the stand-in capture, which replays by running DDP's
    update again: captured at update 12, after DDP's 11 eager ones. The losses are those of one process with twice
    the accumulation, so are the weights and the validation losses, with 2 micro-batches per update on each; and
    DDP's eager loop continues the run from its checkpoint exactly."""
    common = ["--model", str(files / "gla.json"), "--cache", str(files / "ds"), "--context", "32", "--batch", "2",
              "--update", "2", "--steps", "14", "--logging", "1", "--lr", "3e-3", "--warmup", "2", "--seed", "0",
              "--save", "7", "--limit", "0", "--eval", "7"]  # fmt: skip
    assert "CUDA graph: update 12 captured in " in launched("train", *common, "--path", str(tmp_path / "ddp"))
    one = _cfg(files, tmp_path / "one", batch=2, update=4, steps=14, lr=3e-3, warmup=2, logging=1, save=14, eval=7)
    engine.train(one)
    ddp, one = _records(tmp_path / "ddp"), _records(tmp_path / "one")
    assert [r["step"] for r in ddp] == list(range(1, 15))
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in ddp] == pytest.approx([r[key] for r in one], rel=1e-5), key
    assert [r["step"] for r in ddp if "val_loss" in r] == [r["step"] for r in one if "val_loss" in r] == [7, 14]
    val = [r["val_loss"] for r in ddp if "val_loss" in r]
    assert val == pytest.approx([r["val_loss"] for r in one if "val_loss" in r], rel=1e-5)
    wa, wb = _weights(tmp_path / "one", 14), _weights(tmp_path / "ddp", 14)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-7)

    half = tmp_path / "half"
    shutil.copytree(tmp_path / "ddp", half)
    shutil.rmtree(half / "checkpoints" / "step-00000014")
    assert "CUDA graph" not in launched("resume", str(half), "--no-cuda-graphs")
    resumed = _records(half)
    assert [r["step"] for r in resumed] == list(range(1, 15))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in ddp], rel=1e-5)


def test_the_graph_is_let_go_before_the_process_group_is_destroyed(files, tmp_path, stand_in, monkeypatch):
    """A graph holding NCCL's collectives (DDP's) alive at end_training made it wait forever on 2 H200s."""
    from accelerate import Accelerator

    seen = []
    close, end = graphs.GraphedUpdate.close, Accelerator.end_training
    monkeypatch.setattr(graphs.GraphedUpdate, "close", lambda self: (seen.append("close"), close(self))[1])
    monkeypatch.setattr(Accelerator, "end_training", lambda self: (seen.append("end"), end(self))[1])
    engine.train(_cfg(files, tmp_path / "r", cuda_graphs=None, steps=5))
    assert stand_in.captures == 1 and seen == ["close", "end"]


def test_when_one_process_cannot_capture_its_update_every_process_trains_eagerly(files, tmp_path):
    """NCCL needs a collective captured on every process or on none: rank 1's capture fails, so rank 0 (which
    prints) drops its own graph too and says so; the run trains on eagerly with one process's losses."""
    args = ["--model", str(files / "gla.json"), "--cache", str(files / "ds"), "--context", "32", "--batch", "2",
            "--steps", "12", "--logging", "1", "--lr", "3e-3", "--warmup", "2", "--seed", "0", "--save", "12",
            "--path", str(tmp_path / "ddp")]  # fmt: skip
    out = launched("train", *args, STAND_IN_FAILS="1")
    assert "CUDA graph: update 12 could not be captured (on another process); training on eagerly" in out, out
    assert "captured in" not in out
    engine.train(_cfg(files, tmp_path / "one", batch=2, update=2, steps=12, lr=3e-3, warmup=2, logging=1, save=12))
    ddp, one = _records(tmp_path / "ddp"), _records(tmp_path / "one")
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert ddp[11]["cuda_graph"] == {"update": 12, "failure": "on another process"}
