"""The training loop: token-weighted accumulation, NaN/inf handling, exact continuation from a checkpoint,
SIGTERM, and DDP on CPU (gloo) against one process with twice the accumulation."""

import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from flame import engine
from flame.config import TrainConfig
from flame.errors import CheckpointError, ConfigError, DataError, TrainingError
from tests.prepared import counting_docs, gla_config, llama_config, make_prepared, own_precision

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    make_prepared(root / "ds", counting_docs(300, 64), 64)
    llama_config(root / "llama.json")
    gla_config(root / "gla.json")
    return root


def _cfg(files, run, **kw):
    base = dict(
        model=str(files / "llama.json"),
        cache=str(files / "ds"),
        path=str(run),
        context=32,
        batch=4,
        lr=3e-3,
        warmup=2,
        seed=0,
        logging=1,
        save=1000,
    )
    return TrainConfig(**(base | kw))


def _first_moment(run: Path, step: int) -> list[torch.Tensor]:
    """AdamW's exp_avg after the first update is (1 - beta1) x gradient: the update's gradient, read back."""
    state = torch.load(run / "checkpoints" / f"step-{step:08d}" / "state" / "accelerate" / "optimizer.bin")
    return [s["exp_avg"] for _, s in sorted(state["state"].items())]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", ["llama.json", "gla.json"])
def test_batch_2_update_4_gives_the_gradient_of_batch_8(files, tmp_path, model):
    for name, batch, update in (("a", 8, 1), ("b", 2, 4)):
        engine.train(
            _cfg(files, tmp_path / name, model=str(files / model), batch=batch, update=update, steps=1, norm=0)
        )
    a, b = _first_moment(tmp_path / "a", 1), _first_moment(tmp_path / "b", 1)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)
    assert _losses(tmp_path / "a") == pytest.approx(_losses(tmp_path / "b"), rel=1e-5)


def test_activation_checkpointing_trains_the_same_losses_with_less_estimated_memory(files, tmp_path, monkeypatch):
    from fla.layers.gla import GatedLinearAttention

    calls = []  # (the block's own forward is wrapped by transformers for checkpointing: count inside it)
    forward = GatedLinearAttention.forward
    monkeypatch.setattr(
        GatedLinearAttention, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k)
    )
    gla = str(files / "gla.json")
    runs = {}
    for name, checkpointing in (("plain", False), ("ckpt", True)):
        calls.clear()
        engine.train(_cfg(files, tmp_path / name, model=gla, steps=3, checkpointing=checkpointing))
        runs[name] = len(calls)
    # 2 layers, 3 steps: each layer's attention runs again in backward (after the one forward that groups the
    # projections, flame.projections, which the recomputation runs grouped too)
    assert runs == {"plain": 2 + 2 * 3, "ckpt": 2 + 2 * 2 * 3}
    assert _losses(tmp_path / "ckpt") == pytest.approx(_losses(tmp_path / "plain"), rel=1e-6)
    plain = engine.plan(_cfg(files, tmp_path / "p", model=gla, batch=64, context=256)).memory_gib
    ckpt = engine.plan(_cfg(files, tmp_path / "p", model=gla, batch=64, context=256, checkpointing=True)).memory_gib
    assert ckpt["activations"] < plain["activations"] and ckpt["total"] < plain["total"]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["checkpointing"] is True


def test_what_survives_the_first_step_is_frozen_for_the_run_and_unfrozen_after(files, tmp_path, monkeypatch):
    frozen = []
    real = engine.freeze_survivors

    def freeze():
        real()
        frozen.append(gc.get_freeze_count())

    monkeypatch.setattr(engine, "freeze_survivors", freeze)
    engine.train(_cfg(files, tmp_path / "run", steps=3))
    assert len(frozen) == 1 and frozen[0] > 10_000  # once, after step 1: the model and torch's objects among them
    assert gc.get_freeze_count() == 0


def test_a_finished_bf16_run_leaves_no_model_behind(files, tmp_path):
    """accelerate's bf16 wraps the model's forward in a bound method it keeps on the model itself, a reference cycle:
    without the engine's collection at the end, a run's weights (on a GPU, its memory: 0.41 GiB of a 2-layer
    GLA-340M on an H200) stay allocated until Python's collector happens to run, under the next run in the process."""
    from transformers import PreTrainedModel

    def models_alive() -> set[int]:
        return {id(o) for o in gc.get_objects() if isinstance(o, PreTrainedModel) and o.device.type != "meta"}

    gc.collect()
    before = models_alive()
    gc.disable()  # only the engine's own collection may free anything
    try:
        with own_precision():
            engine.train(_cfg(files, tmp_path / "run", steps=2, precision="bf16"))
        left = models_alive() - before
    finally:
        gc.enable()
    assert left == set()


def test_shared_casts_train_under_bf16_with_the_same_first_loss_and_less_estimated_memory(files, tmp_path):
    """--share-casts under bf16 autocast (here the CPU's, --precision bf16): the first forward is unchanged, the
    updates after it differ only by how gradients are summed; the plan counts one bf16 copy per block norm."""
    gla = str(files / "gla.json")
    with own_precision():
        for name, share in (("plain", False), ("shared", True)):
            # without grouped projections, which cast their input once whether the casts are shared or not
            cfg = _cfg(files, tmp_path / name, model=gla, steps=3, logging=1, precision="bf16", share_casts=share,
                       group_projections=False)  # fmt: skip
            engine.train(cfg)
    plain, shared = _losses(tmp_path / "plain"), _losses(tmp_path / "shared")
    assert shared[0] == plain[0] and shared != plain
    assert shared == pytest.approx(plain, rel=1e-2)
    assert json.loads((tmp_path / "shared" / "config.json").read_text())["share_casts"] is True
    kw = dict(model=gla, batch=64, context=256, precision="bf16")
    before = engine.plan(_cfg(files, tmp_path / "p", **kw, share_casts=False)).memory_gib["activations"]
    after = engine.plan(_cfg(files, tmp_path / "p", **kw, share_casts=True)).memory_gib["activations"]
    assert after < before


def test_bf16_residual_trains_close_to_fp32_residual_and_is_planned_and_saved(files, tmp_path):
    """--bf16-residual under bf16 autocast (the CPU's): losses within 1% of the fp32 residual stream's (each
    residual add rounds to bf16, so they differ from the first step), recorded in config.json; the plan keeps the
    norms' inputs in bf16: 2 bytes less per element of each block's two norms, the largest block's backward and the
    final norm, (4 x 2 layers + 4 + 2) x 32 wide = 448 bytes a token."""
    gla = str(files / "gla.json")
    with own_precision():
        for name, residual in (("fp32", False), ("bf16", True)):
            engine.train(_cfg(files, tmp_path / name, model=gla, steps=3, logging=1, precision="bf16",
                              bf16_residual=residual))  # fmt: skip
    fp32, bf16 = _losses(tmp_path / "fp32"), _losses(tmp_path / "bf16")
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=1e-2)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["bf16_residual"] is True
    kw = dict(model=gla, batch=64, context=256, precision="bf16")
    before = engine.plan(_cfg(files, tmp_path / "p", **kw)).memory_gib["activations"]
    after = engine.plan(_cfg(files, tmp_path / "p", **kw, bf16_residual=True)).memory_gib["activations"]
    assert (before - after) * 2**30 == pytest.approx(448 * 64 * 256)


def test_a_compile_run_keeps_the_users_own_triton_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    with engine._triton_cache_pinned():
        assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path)
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path)


@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor on CPU needs a C++ compiler"
)
def test_compile_trains_the_same_losses_and_saves_the_same_weight_names(files, tmp_path, monkeypatch):
    from safetensors import safe_open

    from flame.firststep import triton_cache_dir

    dynamo = torch._dynamo.config
    # As the blocks compile: the setting that keeps FLA's layer_idx from costing a recompilation per layer, and
    # TRITON_CACHE_DIR pinned to Triton's cache (else inductor points it at its own folder and FLA re-tunes)
    traced_with = []
    compile_block = torch.nn.Module.compile

    def compile_noting_the_settings(self, *args, **kwargs):
        traced_with.append((dynamo.allow_unspec_int_on_nn_module, os.environ.get("TRITON_CACHE_DIR")))
        return compile_block(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", compile_noting_the_settings)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    for name, compiled in (("eager", False), ("compiled", True)):
        engine.train(_cfg(files, tmp_path / name, steps=2, save=2, compile=compiled))
    assert traced_with == [(True, str(triton_cache_dir()))] * 2  # two blocks
    assert dynamo.allow_unspec_int_on_nn_module is False and "TRITON_CACHE_DIR" not in os.environ  # restored
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), rel=1e-4)
    names = []
    for name in ("eager", "compiled"):
        path = tmp_path / name / "checkpoints" / "step-00000002" / "model" / "model.safetensors"
        with safe_open(str(path), "pt") as f:
            names.append(sorted(f.keys()))
    assert names[0] == names[1] and not any("_orig_mod" in k for k in names[1])


def test_compile_of_a_model_without_decoder_layers_is_one_clear_error():
    """--compile compiles the layers that hold a token mixer (models.blocks); a model with none is refused, not
    trained uncompiled in silence."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="--compile: no decoder layers") as error:
        engine.compile_blocks(model)
    assert error.value.fix == "drop --compile for this model"


def test_checkpointing_a_model_that_cannot_is_one_clear_error(files, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "supports_gradient_checkpointing", False)
    with pytest.raises(ConfigError, match="--checkpointing: model type llama does not support activation"):
        engine.train(_cfg(files, tmp_path / "run", steps=1, checkpointing=True))


@pytest.fixture(scope="module")
def with_validation(files):
    make_prepared(files / "dsv", counting_docs(300, 64), 64, val_docs=counting_docs(40, 64, seed=5))
    return files / "dsv"


def test_validation_loss_is_the_mean_token_loss_of_the_same_windows_and_leaves_training_alone(
    files, with_validation, tmp_path
):
    from transformers import AutoModelForCausalLM

    from flame.data import loader

    common = dict(cache=str(with_validation), steps=4, save=4)
    engine.train(_cfg(files, tmp_path / "plain", **common))
    engine.train(_cfg(files, tmp_path / "eval", eval=2, eval_windows=6, **common))
    records = [json.loads(line) for line in (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "val_loss" in r) for r in records] == [(1, False), (2, True), (3, False), (4, True)]
    assert _losses(tmp_path / "eval") == _losses(tmp_path / "plain")  # evaluating changes nothing in training

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "eval" / "checkpoints" / "step-00000004" / "model")
    source = loader.open_source(str(with_validation), split="validation")
    windows = loader.Validation(source, context=32, windows=6, seed=0)
    ids = torch.from_numpy(np.stack(windows.rows).astype(np.int64))
    assert ids.shape == (6, 32)
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss.item()  # mean over the 6 x 31 predicted tokens
    assert records[-1]["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert records[1]["val_loss"] > records[-1]["val_loss"]


def test_validation_of_a_gla_with_varlen_sees_each_document_alone(files, with_validation, tmp_path):
    common = dict(model=str(files / "gla.json"), cache=str(with_validation), steps=2, eval=2, eval_windows=4)
    for name, varlen in (("packed", False), ("varlen", True)):
        engine.train(_cfg(files, tmp_path / name, varlen=varlen, **common))
    packed, varlen = (
        json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"]
        for name in ("packed", "varlen")
    )
    assert math.isfinite(packed) and math.isfinite(varlen)
    assert packed != varlen  # the varlen run trains and evaluates with document boundaries


def test_eval_without_a_validation_split_is_one_clear_error(files, tmp_path):
    with pytest.raises(DataError) as error:
        engine.plan(_cfg(files, tmp_path / "run", eval=10))
    assert str(error.value) == (
        f"{files / 'ds'} has no validation split for --eval: prepare the data with --val-docs > 0, or drop --eval"
    )


def test_a_validation_split_smaller_than_a_window_is_one_clear_error(files, tmp_path):
    make_prepared(tmp_path / "tiny", counting_docs(300, 64), 64, val_docs=[[5, 6, 7, 2]])
    with pytest.raises(DataError, match="the validation split of .* has 4 tokens, fewer than one --context window"):
        engine.plan(_cfg(files, tmp_path / "run", cache=str(tmp_path / "tiny"), eval=10))


def _poison(monkeypatch, bad_calls, times=float("inf")):
    """The loss of the forward calls numbered in bad_calls (from 1) multiplied by `times` (inf or nan)."""
    calls = {"n": 0}
    real = engine.forward_loss

    def poisoned(model, batch, num_items):
        calls["n"] += 1
        loss = real(model, batch, num_items)
        return loss * times if calls["n"] in bad_calls else loss

    monkeypatch.setattr(engine, "forward_loss", poisoned)


def test_nan_updates_are_skipped_and_counted(files, tmp_path, monkeypatch):
    _poison(monkeypatch, {3, 4}, float("nan"))
    result = engine.train(_cfg(files, tmp_path, steps=8))
    assert result.skipped == 2 and result.step == 8 and result.stopped == "done"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [0, 0, 1, 2, 2, 2, 2, 2]
    assert math.isnan(records[2]["grad_norm"]) and records[2]["loss"] is None
    assert all(math.isfinite(p.item()) for p in [torch.tensor(r["loss"]) for r in records if r["loss"] is not None])


def test_a_run_of_nan_updates_saves_and_stops(files, tmp_path, monkeypatch):
    _poison(monkeypatch, range(1, 10**6))
    with pytest.raises(TrainingError, match="3 updates in a row had a NaN/inf loss or gradient"):
        engine.train(_cfg(files, tmp_path, steps=20, max_bad_steps=3))
    assert (tmp_path / "checkpoints" / "step-00000003" / "model" / "model.safetensors").is_file()


def test_updates_are_read_back_in_order_in_one_go():
    u = engine.Updates(max_bad=2)
    u.add(1, torch.tensor(2.0), torch.tensor(1.0))
    u.add(2, torch.tensor(float("nan")), torch.tensor(1.0))
    u.add(3, 1.5, None, True)  # read back already, and applied
    u.add(4, torch.tensor(float("inf")), torch.tensor(float("nan")))
    u.add(5, torch.tensor(1.0), torch.tensor(float("inf")))
    warnings = []
    u.settle(warnings.append)
    assert (u.skipped, u.bad_in_a_row, u.halted_at, u.pending) == (3, 2, 5, [])
    assert (u.window, u.first_loss, u.loss, u.grad_norm) == ([2.0, 1.5, 1.0], 2.0, 1.0, float("inf"))
    assert warnings == [
        "step 2: loss nan, grad norm 1.0: update skipped (1 so far)",
        "step 4: loss inf, grad norm nan: update skipped (2 so far)",
        "step 5: loss 1.0, grad norm inf: update skipped (3 so far)",
    ]


def test_updates_left_on_the_device_train_exactly_as_updates_read_back_every_step(files, tmp_path, monkeypatch):
    """With a fused AdamW a non-finite update is skipped on the device (found_inf) and losses are read back at log
    steps only; without it they are read back and the update decided on the host every step. Same run, same log."""
    runs = {}
    for name, device_skip in (("device", True), ("host", False)):
        _poison(monkeypatch, {3, 4})
        used = []
        skips = engine.skips_on_device if device_skip else (lambda optimizer: None)
        monkeypatch.setattr(engine, "skips_on_device", lambda optimizer: used.append(skips(optimizer)) or used[-1])
        result = engine.train(_cfg(files, tmp_path / name, steps=9, logging=4))
        assert (used[0] is not None) == device_skip  # the fused AdamW takes found_inf on this device (CPU or CUDA)
        monkeypatch.undo()
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        keep = ("step", "loss", "grad_norm", "skipped", "tokens", "lr")
        runs[name] = [json.dumps({k: json.loads(ln)[k] for k in keep}) for ln in lines]
        runs[name] += [json.dumps([result.skipped, result.loss, result.first_loss])]
    assert runs["device"] == runs["host"]
    records = [json.loads(r) for r in runs["device"][:-1]]
    assert [(r["step"], r["skipped"]) for r in records] == [(1, 0), (4, 2), (8, 2), (9, 2)]
    assert math.isnan(records[1]["grad_norm"])  # step 4's own, the last of its window
    assert all(math.isfinite(r["loss"]) for r in records)  # the mean of the window's finite losses


def test_a_run_of_bad_updates_found_at_a_log_step_stops_and_saves_there(files, tmp_path, monkeypatch):
    _poison(monkeypatch, set(range(1, 100)))
    with pytest.raises(TrainingError) as error:
        engine.train(_cfg(files, tmp_path, steps=20, logging=5, max_bad_steps=3))
    ckpt = tmp_path / "checkpoints" / "step-00000005"
    assert str(error.value) == (
        f"3 updates in a row had a NaN/inf loss or gradient (the last at step 3); stopped at step 5 and saved {ckpt}: "
        "lower --lr, raise --warmup or --norm clipping, and continue with --checkpoint"
    )
    trainer = json.loads((ckpt / "state" / "trainer.json").read_text())
    assert (trainer["step"], trainer["skipped"], trainer["bad_in_a_row"]) == (5, 5, 5)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped"]) for r in records] == [(1, 1), (5, 5)]  # the stopping step is logged first


def test_continuing_from_a_checkpoint_repeats_the_uninterrupted_run(files, tmp_path):
    engine.train(_cfg(files, tmp_path / "full", steps=10, update=2, save=4, limit=0))
    ckpt = tmp_path / "full" / "checkpoints" / "step-00000004"
    result = engine.train(_cfg(files, tmp_path / "cont", steps=10, update=2, save=4, checkpoint=str(ckpt)))
    assert result.step == 10 and result.tokens == 10 * 2 * 4 * 32
    assert _losses(tmp_path / "cont") == _losses(tmp_path / "full")[4:]
    # continuing a finished run trains nothing and writes nothing
    last = tmp_path / "cont" / "checkpoints" / "step-00000010"
    again = engine.train(_cfg(files, tmp_path / "cont", steps=10, update=2, save=4, checkpoint=str(last)))
    assert again.step == 10 and again.checkpoint is None
    assert _losses(tmp_path / "cont") == _losses(tmp_path / "full")[4:]


@pytest.mark.slow
def test_continuing_in_place_across_an_epoch_with_varlen(files, tmp_path):
    # GLA, varlen, 8 windows of 64 per update: the data (about 120 windows per epoch) wraps into epoch 1 at update 16
    kw = dict(model=str(files / "gla.json"), varlen=True, context=64, update=2, steps=18, save=8, limit=0)
    engine.train(_cfg(files, tmp_path / "full", **kw))
    engine.train(_cfg(files, tmp_path / "run", **kw))
    full = _losses(tmp_path / "full")
    # continue the run in its own dir from step 8: the records logged after step 8 are dropped and re-made
    engine.train(_cfg(files, tmp_path / "run", **kw, checkpoint=str(tmp_path / "run/checkpoints/step-00000008")))
    assert _losses(tmp_path / "run") == full
    state = json.loads((tmp_path / "run/checkpoints/step-00000018/state/trainer.json").read_text())
    tokens = json.loads((files / "ds" / "manifest.json").read_text())["splits"]["train"]["tokens"]
    assert state["data"]["position"] == 18 * 8 and 1 < 18 * 8 / (tokens // 64) < 2


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while not (path.is_file() and path.read_text().strip()):
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def _env():
    return os.environ | {"PYTHONPATH": str(REPO), "FLAME_QUIET": "1"}


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_exits_cleanly(files, tmp_path):
    args = [
        sys.executable,
        "-m",
        "flame",
        "train",
        "--model",
        str(files / "llama.json"),
        "--cache",
        str(files / "ds"),
        "--path",
        str(tmp_path),
        "--context",
        "32",
        "--batch",
        "4",
        "--steps",
        "100000",
        "--logging",
        "1",
        "--save",
        "100000",
    ]
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(tmp_path / "metrics.jsonl", 120)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    saved = sorted((tmp_path / "checkpoints").iterdir())
    assert len(saved) == 1 and "stopped on request" in out
    state = json.loads((saved[0] / "state" / "trainer.json").read_text())
    assert saved[0].name == f"step-{state['step']:08d}" and 0 < state["step"] < 100000


def _two_cpu_processes(port: int) -> list[str]:
    """`accelerate launch` of `flame train` on 2 CPU processes: `--cpu` would start ONE process unless MPI is set
    up; its torchrun launcher (--multi_gpu) on a machine without CUDA starts N that accelerate runs on gloo."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(port), "-m", "flame", "train"]  # fmt: skip


def test_a_stop_vote_is_read_one_update_later():
    seen = []

    def reduce(t, reduction):
        seen.append((t.tolist(), reduction))
        return t * 2  # as if a second process voted the same

    vote = engine.StopVote(torch.device("cpu"), reduce)
    assert [vote(False), vote(True), vote(False), vote(False)] == [False, False, True, False]
    assert seen == [([0], "sum"), ([1], "sum"), ([0], "sum"), ([0], "sum")]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) DDP check; GPUs run the multi-GPU tests")
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_update(files, tmp_path):
    tag = str(tmp_path)
    args = ["--model", str(files / "gla.json"), "--cache", str(files / "ds"), "--context", "32", "--batch", "2",
            "--steps", "100000", "--logging", "1", "--save", "100000", "--path", str(tmp_path / "run")]  # fmt: skip
    env = _env() | {"FLAME_TEST_TAG": tag}
    proc = subprocess.Popen(_two_cpu_processes(29537) + args, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    _wait_for(tmp_path / "run" / "metrics.jsonl", 180)
    rank1 = [
        d for d in Path("/proc").iterdir() if d.name.isdigit() and _environ(d) >= {f"FLAME_TEST_TAG={tag}", "RANK=1"}
    ]
    assert len(rank1) == 1, rank1
    os.kill(int(rank1[0].name), signal.SIGTERM)  # rank 1 only: rank 0 learns of it from the vote
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    (saved,) = sorted((tmp_path / "run" / "checkpoints").iterdir())
    state = json.loads((saved / "state" / "trainer.json").read_text())
    assert saved.name == f"step-{state['step']:08d}" and 0 < state["step"] < 100000 and state["world"] == 2
    assert (saved / "state" / "accelerate" / "random_states_1.pkl").is_file()
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == state["step"] and f"stop requested: saved {saved} at step {state['step']}" in out


def _environ(proc_dir: Path) -> set[str]:
    try:
        return set((proc_dir / "environ").read_bytes().decode(errors="replace").split("\0"))
    except OSError:
        return set()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) DDP check; GPUs run the multi-GPU tests")
def test_ddp_two_processes_match_one_process_with_twice_the_accumulation(files, tmp_path):
    common = [
        "--model",
        str(files / "gla.json"),
        "--cache",
        str(files / "ds"),
        "--context",
        "32",
        "--batch",
        "2",
        "--steps",
        "6",
        "--logging",
        "1",
        "--lr",
        "3e-3",
        "--warmup",
        "2",
        "--seed",
        "0",
    ]
    launch = _two_cpu_processes(29533)
    two = subprocess.run(
        launch + common + ["--update", "1", "--path", str(tmp_path / "ddp")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stdout + two.stderr
    one = _cfg(files, tmp_path / "one", model=str(files / "gla.json"), batch=2, update=2, steps=6, save=3, limit=0)
    engine.train(one)
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4)

    # World size 1 -> 2: continue the one-process run at step 3 on two processes (same global batch); the data
    # position is in global windows, so the remaining updates see the same windows and give the same losses.
    ckpt = tmp_path / "one" / "checkpoints" / "step-00000003"
    cont = subprocess.run(
        launch + common + ["--update", "1", "--path", str(tmp_path / "cont"), "--checkpoint", str(ckpt)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cont.returncode == 0, cont.stdout + cont.stderr
    assert _losses(tmp_path / "cont") == pytest.approx(_losses(tmp_path / "one")[3:], rel=1e-4)
    saved = tmp_path / "ddp" / "checkpoints" / "step-00000006" / "state"
    state = json.loads((saved / "trainer.json").read_text())
    assert state["world"] == 2 and state["data"]["position"] == 6 * 2 * 2
    assert (saved / "accelerate" / "random_states_1.pkl").is_file()


def test_continuing_needs_the_same_model_and_data(files, tmp_path):
    engine.train(_cfg(files, tmp_path / "a", steps=2))
    ckpt = tmp_path / "a" / "checkpoints" / "step-00000002"
    wide = llama_config(tmp_path / "wide.json", hidden_size=64, intermediate_size=128)
    with pytest.raises(CheckpointError, match="does not match this model and optimizer"):
        engine.train(_cfg(files, tmp_path / "b", model=str(wide), steps=4, checkpoint=str(ckpt)))
    other = make_prepared(tmp_path / "other", counting_docs(200, 64, seed=5), 64)
    with pytest.raises(CheckpointError, match="was trained on other data"):
        engine.train(_cfg(files, tmp_path / "c", cache=str(other), steps=4, checkpoint=str(ckpt)))
    incomplete = tmp_path / "a" / "checkpoints" / ".step-00000009.tmp"
    incomplete.mkdir()
    with pytest.raises(CheckpointError, match="not a complete flame checkpoint"):
        engine.train(_cfg(files, tmp_path / "d", steps=4, checkpoint=str(incomplete)))


def test_bf16_runs_the_forward_in_autocast_without_a_float32_copy_of_the_logits(files, tmp_path, monkeypatch):
    """accelerate alone would cast every model output to float32: for logits that is a second, twice-as-large copy
    at the peak of the forward (2 GiB at 8 x 2048 x 32K). flame keeps autocast and reads only the loss."""
    seen = []
    build = engine.models.build_model

    def build_and_watch(*a, **k):
        model, config = build(*a, **k)
        model.register_forward_hook(lambda m, args, out: seen.append((out.logits.dtype, out.loss.dtype)))
        return model, config

    monkeypatch.setattr(engine.models, "build_model", build_and_watch)
    with own_precision():
        engine.train(_cfg(files, tmp_path / "r", precision="bf16", steps=2))
    assert seen == [(torch.bfloat16, torch.float32)] * 3  # 2 steps, after the forward that groups projections
    assert all(math.isfinite(x) for x in _losses(tmp_path / "r"))


def test_a_run_dir_is_never_trained_over_by_another_run_or_a_model_dir(files, tmp_path):
    from flame.errors import OutputExistsError

    engine.train(_cfg(files, tmp_path / "a", steps=2))
    engine.train(_cfg(files, tmp_path / "b", steps=4, save=2))
    before = {p: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    other = tmp_path / "a" / "checkpoints" / "step-00000002"
    # another run's checkpoint into a run dir with checkpoints of its own: refused, nothing there touched
    with pytest.raises(OutputExistsError, match="has checkpoints of its own, and --checkpoint .* is not one of them"):
        engine.train(_cfg(files, tmp_path / "b", steps=6, save=2, checkpoint=str(other)))
    # a model dir (its config.json is a model's) or a file as --path: refused
    model_dir = tmp_path / "b" / "checkpoints" / "step-00000004" / "model"
    with pytest.raises(OutputExistsError, match=r"--path .*model is a model dir, not a run dir: give another --path"):
        engine.train(_cfg(files, model_dir, steps=2))
    (tmp_path / "config.json").write_text('{"banana": 1}')
    with pytest.raises(OutputExistsError, match="that flame train did not write"):
        engine.train(_cfg(files, tmp_path, steps=2))
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        engine.train(_cfg(files, tmp_path / "file", steps=2))
    with pytest.raises(OutputExistsError, match=r"--path .*file/run lies under the file"):
        engine.train(_cfg(files, tmp_path / "file" / "run", steps=2))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "checkpoints").write_text("x")
    with pytest.raises(OutputExistsError, match="holds a file named checkpoints, where the run's checkpoints go"):
        engine.train(_cfg(files, tmp_path / "c", steps=2))
    assert {p: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()} == before
    # its own checkpoint continues it, as before
    assert engine.train(_cfg(files, tmp_path / "b", steps=6, save=2, checkpoint=str(model_dir.parent))).step == 6


def test_a_run_that_fails_before_writing_leaves_no_run_dir_behind(files, tmp_path, monkeypatch):
    from flame import models
    from flame.errors import ModelError

    def broken(*args, **kwargs):
        raise ModelError("cannot build it", "fix it")

    monkeypatch.setattr(models, "build_model", broken)
    with pytest.raises(ModelError, match="cannot build it"):
        engine.train(_cfg(files, tmp_path / "new" / "run", steps=2))
    assert not (tmp_path / "new" / "run").exists()  # the dir made for its lock went again


def test_a_file_system_that_cannot_lock_trains_unguarded_with_a_warning(files, tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(f, how):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert engine.train(_cfg(files, tmp_path / "run", steps=2)).step == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot be locked (No locks available): a second launch on this run dir would not be stopped" in err


def test_a_full_disk_at_a_checkpoint_is_one_error_naming_the_run(files, tmp_path, monkeypatch):
    from flame import checkpoint as ckpt
    from flame.errors import TrainingError

    def full(*args, **kwargs):  # what safetensors raises: its own kind, the OS's words
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save", full)
    with pytest.raises(TrainingError) as e:
        engine.train(_cfg(files, tmp_path / "run", steps=2))
    assert str(e.value) == (
        f"no space left on the disk of {tmp_path / 'run'}, saving checkpoint step 2 (the checkpoints before it are "
        f"whole): free space on that disk, or write to another one; then `flame resume {tmp_path / 'run'}`"
    )


def test_a_run_that_saved_no_checkpoint_starts_over_with_a_warning(files, tmp_path, capsys):
    engine.train(_cfg(files, tmp_path / "run", steps=3))
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # as if it crashed before its first save
    capsys.readouterr()
    engine.train(_cfg(files, tmp_path / "run", steps=2))
    err = " ".join(capsys.readouterr().err.split())
    assert f"--path {tmp_path / 'run'} holds a run that saved no checkpoint (3 records in metrics.jsonl): it " in err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]


def test_an_epochs_run_resumed_longer_warns_that_its_schedule_moves(files, tmp_path, capsys):
    make_prepared(tmp_path / "small", counting_docs(20, 64), 64)  # a few updates an epoch
    cfg = _cfg(files, tmp_path / "run", steps=0, epochs=1, cache=str(tmp_path / "small"), save=100)
    n = engine.train(cfg).step  # the schedule's length came from --epochs: the saved config says steps 0
    capsys.readouterr()
    assert engine.resume(tmp_path / "run", {"steps": n + 2}).step == n + 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"the cosine schedule now spans {n + 2} updates instead of {n}: update {n + 1} runs at learning rate" in err


def test_a_run_resumes_from_any_working_directory(files, tmp_path, monkeypatch):
    files_copy = tmp_path / "work"
    shutil.copytree(files, files_copy)
    monkeypatch.chdir(files_copy)
    engine.train(_cfg(files, "run", model="llama.json", cache="ds", steps=2, save=1))
    saved = json.loads((files_copy / "run" / "config.json").read_text())
    assert saved["model"] == str(files_copy / "llama.json") and saved["cache"] == str(files_copy / "ds")
    monkeypatch.chdir("/")
    assert engine.resume(str(files_copy / "run"), {"steps": 3}).step == 3


def test_resuming_to_a_step_already_reached_changes_nothing(files, tmp_path):
    engine.train(_cfg(files, tmp_path / "run", steps=4, save=2))
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    result = engine.resume(str(tmp_path / "run"), {"steps": 3})
    assert (result.step, result.checkpoint, result.stopped) == (4, None, "done")
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def test_deepspeed_takes_its_micro_batch_from_batch_and_its_clipping_from_norm():
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(zero_stage=2, gradient_accumulation_steps=2)  # both "auto", as nothing sets them
    assert engine.fill_deepspeed_config(plugin, 4, 0.5) is None
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 4
    assert plugin.deepspeed_config["gradient_clipping"] == 0.5
    assert engine.fill_deepspeed_config(plugin, 4, 0.5) is None  # the same values set by a config are kept
    assert "gradient_clipping 0.5, not at --norm 1" in engine.fill_deepspeed_config(plugin, 4, 1.0)
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu is 4 but --batch is 8"):
        engine.fill_deepspeed_config(plugin, 8, 0.5)
    shipped = DeepSpeedPlugin(zero_stage=2, gradient_clipping=1.0)  # configs/accelerate/deepspeed_zero2.yaml
    assert engine.fill_deepspeed_config(shipped, 4, 1.0) is None and shipped.deepspeed_config["gradient_clipping"] == 1


@pytest.mark.parametrize("launcher", ["auto", "3"])
def test_update_is_the_accumulation_whatever_accelerate_launch_passes(files, tmp_path, monkeypatch, capsys, launcher):
    """`accelerate launch` hands a config's gradient_accumulation_steps to the Accelerator through the environment,
    over what flame passes: "auto" (the shipped DeepSpeed configs) crashed it, a number trained with that number."""
    monkeypatch.delenv(engine.LAUNCHER_ACCUMULATION, raising=False)
    engine.train(_cfg(files, tmp_path / "a", batch=8, update=1, steps=1, norm=0, save=1))
    monkeypatch.setenv(engine.LAUNCHER_ACCUMULATION, launcher)
    capsys.readouterr()
    engine.train(_cfg(files, tmp_path / "b", batch=2, update=4, steps=1, norm=0, save=1))
    err = capsys.readouterr().err
    for x, y in zip(_first_moment(tmp_path / "a", 1), _first_moment(tmp_path / "b", 1), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)
    said = "the accelerate config's gradient_accumulation_steps 3 is not used: flame accumulates --update 4"
    assert (said in err) == (launcher == "3")


def test_a_checkpoint_continues_only_under_a_setup_that_reads_its_format(files, tmp_path, monkeypatch):
    engine.train(_cfg(files, tmp_path / "a", steps=2, save=2))
    ckpt = tmp_path / "a" / "checkpoints" / "step-00000002"
    assert json.loads((ckpt / "state" / "trainer.json").read_text())["setup"] == "one process"
    cont = _cfg(files, tmp_path / "b", steps=4, checkpoint=str(ckpt))
    assert engine.plan(cont, world=2).sharding == "DDP"  # DDP reads what one process wrote (and the other way)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "FULL_SHARD")
    said = f"saved by one process, in a format that FSDP, full shard cannot read.*--model {ckpt / 'model'}"
    with pytest.raises(ConfigError, match=said):
        engine.plan(cont, world=2)


TORCH_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB of which 11.06 MiB is "
    "free. Including non-PyTorch memory, this process has 79.13 GiB memory in use. Of the allocated memory 78.50 GiB "
    "is allocated by PyTorch, and 150.00 MiB is reserved by PyTorch but unallocated. If reserved but unallocated "
    "memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
)  # torch 2.11's message on an 80 GB GPU


def test_running_out_of_memory_is_one_line_with_the_fix_and_keeps_the_checkpoints(files, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = engine.forward_loss

    def runs_out_at_the_fifth_forward(model, batch, num_items):
        calls["n"] += 1
        if calls["n"] == 5:
            raise torch.OutOfMemoryError(TORCH_OOM)
        return real(model, batch, num_items)

    monkeypatch.setattr(engine, "forward_loss", runs_out_at_the_fifth_forward)
    with pytest.raises(TrainingError) as caught:
        engine.train(_cfg(files, tmp_path, steps=8, save=2))
    assert str(caught.value) == (
        "out of memory (Tried to allocate 2.00 GiB; GPU 0 has a total capacity of 79.15 GiB of which 11.06 MiB is "
        "free): lower --batch (raise --update to keep the tokens per update) or --context, or add --checkpointing or "
        "--bf16-residual; `flame train ... --dry-run` estimates the peak (the run's checkpoints are kept)"
    )
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]


def test_an_out_of_memory_message_torch_words_otherwise_keeps_its_first_sentence():
    assert engine.out_of_memory(torch.OutOfMemoryError("MPS backend out of memory. Something else.")).message == (
        "out of memory (MPS backend out of memory)"
    )


def test_the_estimate_counts_kept_gla_states_only_without_varlen(files, tmp_path, monkeypatch):
    from flame.kernels.config import settings

    monkeypatch.setattr(settings, "mode", "auto")
    estimate = {}
    for states in ("recompute", "keep"):
        monkeypatch.setattr(settings, "gla_states", states)
        for varlen in (False, True):
            p = engine.plan(_cfg(files, tmp_path, model=str(files / "gla.json"), steps=4, varlen=varlen))
            estimate[states, varlen] = p.memory_gib["activations"]
    assert estimate["keep", False] > estimate["recompute", False]
    assert estimate["keep", True] == estimate["recompute", True] == estimate["recompute", False]


def test_a_run_estimated_over_the_gpus_memory_is_told_the_largest_batch_that_fits(files, tmp_path):
    p = engine.plan(_cfg(files, tmp_path, steps=4, batch=8))
    need = p.memory_gib["total"]
    assert need == p.memory_at(8)["total"]
    # a smaller batch is estimated with --update raised (every gradient alive), as the advice says to do
    at = {b: p.memory_at(b, accumulation=2)["total"] for b in range(1, 9)}
    assert all(at[b] < at[b + 1] for b in range(1, 8)) and at[8] > need
    assert engine.memory_warning(p, need, "this GPU's 1.0 GiB", gpu=True) is None  # exactly fits
    between = (at[3] + at[4]) / 2
    assert engine.memory_warning(p, between, "this GPU's 1.0 GiB", gpu=True) == (
        f"the estimated peak memory, {need:.1f} GiB per process, is more than this GPU's 1.0 GiB: this run will "
        f"likely run out of memory; --batch 3 fits by the estimate ({at[3]:.1f} GiB; raise --update to keep the "
        "tokens per update), or --checkpointing (`flame train ... --dry-run` shows the estimate)"
    )
    assert "not even --batch 1 fits by the estimate" in engine.memory_warning(p, at[1] / 2, "x", gpu=True)
    on_cpu = engine.memory_warning(p, at[1] / 2, "the 0.1 GiB available on this machine", gpu=False)
    assert on_cpu.endswith(
        "more than the 0.1 GiB available on this machine: this run will likely run out of memory; lower --batch or "
        "--context (flame's CPU kernels hold more than this estimate) (`flame train ... --dry-run` shows the estimate)"
    )


def test_the_memory_warning_comes_before_training_and_training_goes_on(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(engine, "memory_capacity_gib", lambda device, local: (1e-3, "the 0.0 GiB available"))
    result = engine.train(_cfg(files, tmp_path, steps=2))
    err = capsys.readouterr().err
    assert result.step == 2
    assert err.count("warning: the estimated peak memory") == 1 and "is more than the 0.0 GiB available" in err


def test_memory_capacity_on_the_cpu_is_the_available_memory_shared_by_the_processes():
    import psutil

    one, words = engine.memory_capacity_gib(torch.device("cpu"))
    two, shared = engine.memory_capacity_gib(torch.device("cpu"), 2)
    assert 0 < one <= psutil.virtual_memory().total / 2**30
    assert words == f"the {one:.1f} GiB available on this machine"
    assert abs(two - one / 2) < 0.5 and shared.endswith("available on this machine, shared by its 2 processes")
