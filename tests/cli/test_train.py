"""`flame train` through the CLI: tiny Llama and tiny GLA end to end, --dry-run, and one clear error per bad input."""

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flame.cli.app import app
from tests.prepared import counting_docs, gla_config, llama_config, make_prepared, own_precision

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-cli")
    make_prepared(root / "ds", counting_docs(300, 64), 64, val_docs=counting_docs(30, 64, seed=9))
    llama_config(root / "llama.json")
    gla_config(root / "gla.json")
    return root


def _train(files, tmp_path, model, *extra):
    args = ["train", "--model", str(files / model), "--cache", str(files / "ds"), "--path", str(tmp_path / "run")]
    args += ["--context", "32", "--batch", "4", "--lr", "3e-3", "--warmup", "5", "--seed", "0", *extra]
    return runner.invoke(app, args)


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_llama_loss_falls_and_checkpoints_rotate(files, tmp_path):
    result = _train(files, tmp_path, "llama.json", "--steps", "60", "--logging", "10", "--save", "20", "--limit", "2")
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    records = _records(run)
    assert [r["step"] for r in records] == [1, 10, 20, 30, 40, 50, 60]
    assert records[-1]["loss"] < 0.6 * records[0]["loss"]
    assert records[-1]["tokens"] == 60 * 4 * 32
    for key in ("lr", "grad_norm", "tokens_per_s", "mfu", "memory_gib", "time"):
        assert key in records[-1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000040", "step-00000060"]
    assert json.loads((run / "config.json").read_text())["steps"] == 60
    assert "finished at step 60" in result.output
    assert f"checkpoint: {run / 'checkpoints' / 'step-00000060'}" in result.output


def test_gla_varlen_checkpoint_loads_and_generates(files, tmp_path):
    result = _train(files, tmp_path, "gla.json", "--steps", "20", "--logging", "5", "--varlen")
    assert result.exit_code == 0, result.output
    records = _records(tmp_path / "run")
    assert records[-1]["loss"] < records[0]["loss"]

    import fla  # noqa: F401
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tmp_path / "run" / "checkpoints" / "step-00000020" / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([tokenizer.convert_tokens_to_ids(["t10", "t11", "t12"])])
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_the_printed_load_command_gives_a_model_that_runs_on_the_cpu(files, tmp_path):
    """The `load:` line after training, pasted into a fresh Python (no flame.kernels installed by a test fixture),
    loads the checkpoint's model, which then runs a forward on the CPU."""
    import shlex
    import subprocess
    import sys

    result = _train(files, tmp_path, "gla.json", "--steps", "2", "--logging", "1")
    assert result.exit_code == 0, result.output
    line = " ".join(result.output.split("load:", 1)[1].split("\n", 1)[0].split())
    python, flag, code = shlex.split(line)
    assert (python, flag) == ("python", "-c") and "step-00000002" in code
    run = code + "; import torch; print(tuple(model(torch.tensor([[1, 2, 3]])).logits.shape))"
    done = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    vocab = json.loads((files / "gla.json").read_text())["vocab_size"]
    assert done.stdout.strip().splitlines()[-1] == f"(1, 3, {vocab})"


def test_dry_run_prints_the_plan_and_trains_nothing(files, tmp_path):
    result = _train(files, tmp_path, "gla.json", "--steps", "10", "--dry-run")
    assert result.exit_code == 0, result.output
    for part in ("parameters", "embedding", "non-embedding", "FLOPs per token", "peak memory (est.)", "dataset"):
        assert part in result.output
    # the estimate is for the precision the run would train in here: fp32 on the CPU (--precision auto)
    assert "activations 0.00; one process; fp32)" in " ".join(result.output.split()), result.output
    result = _train(files, tmp_path, "gla.json", "--steps", "10", "--precision", "bf16", "--dry-run")
    assert "activations 0.00; one process; bf16)" in " ".join(result.output.split()), result.output
    assert "10 updates = " in result.output and "epochs" in result.output
    assert not (tmp_path / "run").exists()


def test_dry_run_shows_validation_and_the_speed_and_memory_options(files, tmp_path):
    result = _train(files, tmp_path, "gla.json", "--steps", "10", "--eval", "5", "--eval-windows", "12")
    assert result.exit_code == 0, result.output  # (trains: the CLI options reach the engine)
    assert [r["step"] for r in _records(tmp_path / "run") if "val_loss" in r] == [5, 10]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["share_casts"] is True  # the default
    args = ("--steps", "10", "--eval", "5", "--eval-windows", "12", "--compile", "--checkpointing", "--no-share-casts")
    result = _train(files, tmp_path / "dry", "gla.json", *args, "--bf16-residual", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "every 5 updates: 12 windows of 32 held out" in result.output
    listed = r"^options +--compile, --checkpointing, --no-share-casts,\s+--bf16-residual\b"  # may wrap
    assert re.search(listed, result.output, re.M), result.output
    # the defaults are not listed as choices
    result = _train(files, tmp_path / "dry2", "gla.json", "--share-casts", "--dry-run")
    assert result.exit_code == 0 and not re.search(r"^options ", result.output, re.M), result.output


def _one_error(result, *parts):
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for part in parts:
        assert part in lines[0]


def test_missing_dataset(files, tmp_path):
    result = runner.invoke(app, ["train", "--model", str(files / "gla.json"), "--cache", str(tmp_path / "nope")])
    _one_error(result, f"--cache {tmp_path / 'nope'} does not exist", "flame data prepare")


def test_unknown_model_type(files, tmp_path):
    (tmp_path / "bad.json").write_text('{"model_type": "not_a_model", "vocab_size": 64}')
    result = runner.invoke(app, ["train", "--model", str(tmp_path / "bad.json"), "--cache", str(files / "ds")])
    _one_error(result, "unknown model_type 'not_a_model'")


def test_vocab_mismatch(files, tmp_path):
    llama_config(tmp_path / "small.json", vocab=32)
    result = runner.invoke(app, ["train", "--model", str(tmp_path / "small.json"), "--cache", str(files / "ds")])
    _one_error(result, "has 64 tokens but the model's vocab_size is 32")


def test_context_longer_than_a_position_table(files, tmp_path):
    gpt2 = {"model_type": "gpt2", "n_positions": 256, "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 64}
    (tmp_path / "gpt2.json").write_text(json.dumps(gpt2))
    result = runner.invoke(
        app, ["train", "--model", str(tmp_path / "gpt2.json"), "--cache", str(files / "ds"), "--context", "512"]
    )
    _one_error(result, "--context 512 is longer than the model's position table (256 positions): lower --context")
    # RoPE (Llama's max_position_embeddings is 256 here) and recurrent models have no such table
    for config in ("llama.json", "gla.json"):
        result = _train(files, tmp_path, config, "--context", "512", "--dry-run")
        assert result.exit_code == 0, result.output


def test_context_longer_than_the_whole_dataset(files, tmp_path):
    make_prepared(tmp_path / "small", counting_docs(2, 8), 64)
    result = _train(files, tmp_path, "llama.json", "--cache", str(tmp_path / "small"), "--context", "64", "--dry-run")
    _one_error(result, f"--context 64 is longer than all of {tmp_path / 'small'}", "lower --context")


def test_paths_that_look_like_rich_markup_are_printed_as_they_are(files, tmp_path):
    import shlex

    run = tmp_path / "br[/x]" / "my [run]"
    result = _train(files, tmp_path, "llama.json", "--steps", "2", "--path", str(run))
    assert result.exit_code == 0, result.output
    assert f"checkpoint: {run / 'checkpoints' / 'step-00000002'}" in result.output
    # the next-step hints paste into a shell as they are
    assert f"continue:  flame resume {shlex.quote(str(run))} --steps MORE" in result.output
    assert "/checkpoints/step-00000002/model\")'" in result.output


def test_varlen_needs_an_fla_model(files, tmp_path):
    result = _train(files, tmp_path, "llama.json", "--varlen", "--dry-run")
    _one_error(result, "--varlen needs an FLA model")


def test_run_dir_with_checkpoints_is_not_overwritten(files, tmp_path):
    assert _train(files, tmp_path, "llama.json", "--steps", "2").exit_code == 0
    result = _train(files, tmp_path, "llama.json", "--steps", "2")
    _one_error(result, "already has checkpoints", "--checkpoint")


def test_several_datasets_with_weights(files, tmp_path):
    make_prepared(tmp_path / "b", counting_docs(100, 64, seed=3), 64)
    cache = f"{files / 'ds'}:0.75,{tmp_path / 'b'}:0.25"
    result = _train(files, tmp_path, "llama.json", "--steps", "4", "--cache", cache)
    assert result.exit_code == 0, result.output
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000004" / "state" / "trainer.json").read_text())
    assert state["data"]["taken"] == [12, 4]


def test_wandb_offline_run_named_after_type(files, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = _train(files, tmp_path, "llama.json", "--steps", "2", "--project", "flame-test", "--type", "tiny")
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    run_id = (run / "wandb-id").read_text().strip()
    offline = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1
    state = json.loads((run / "checkpoints" / "step-00000002" / "state" / "trainer.json").read_text())
    assert state["wandb_id"] == run_id


def test_epochs_set_the_steps_when_steps_is_0(files, tmp_path):
    tokens = json.loads((files / "ds" / "manifest.json").read_text())["splits"]["train"]["tokens"]
    windows = tokens // 32
    result = _train(files, tmp_path, "llama.json", "--epochs", "2", "--dry-run")
    assert result.exit_code == 0, result.output
    steps = -(-2 * windows // 4)  # ceil: 4 windows per update
    assert f"{steps} updates = " in result.output
    assert f"{windows} windows of 32" in result.output


def test_wandb_without_a_login_is_one_clear_error(files, tmp_path):
    # a fresh process: wandb keeps its settings (the offline mode of the other tests) per process
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {"WANDB_MODE": "online", "HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config")}
    args = ["--model", str(files / "llama.json"), "--cache", str(files / "ds"), "--path", str(tmp_path / "run")]
    result = subprocess.run(
        [sys.executable, "-m", "flame", "train", *args, "--context", "32", "--steps", "2", "--project", "p"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --project p: wandb cannot start")
    assert "Traceback" not in result.stderr and "WANDB_MODE=offline" in result.stderr
    assert not (tmp_path / "run").exists()  # the run dir it had begun (config.json, a wandb id) is gone again
    (tmp_path / "mine").mkdir()  # a --path that was there before is left, with what the run wrote into it
    result = subprocess.run(
        [sys.executable, "-m", "flame", "train", *args[:-1], str(tmp_path / "mine"), "--context", "32", "--steps", "2",
         "--project", "p"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1 and (tmp_path / "mine").is_dir(), result.stderr
    assert not (tmp_path / "mine" / ".lock").exists()


def test_a_checkpoint_on_other_data_needs_force(files, tmp_path):
    assert _train(files, tmp_path, "llama.json", "--steps", "2").exit_code == 0
    other = make_prepared(tmp_path / "other", counting_docs(100, 64, seed=3), 64)
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    args = ["--steps", "4", "--cache", str(other), "--checkpoint", str(ckpt), "--path", str(tmp_path / "next")]
    result = _train(files, tmp_path, "llama.json", *args)
    _one_error(result, "was trained on other data (300 documents of", "--force")
    result = _train(files, tmp_path, "llama.json", *args, "--force")
    assert result.exit_code == 0, result.output
    assert "finished at step 4" in result.output


def test_a_warmup_as_long_as_the_run_is_warned_about(files, tmp_path):
    result = _train(files, tmp_path, "llama.json", "--steps", "4", "--warmup", "10")
    assert result.exit_code == 0, result.output
    assert "warning: --warmup 10 is not below the run's 4 steps: the learning rate never reaches --lr 0.003" in (
        result.output
    )


def test_continuing_with_another_context_is_warned_about(files, tmp_path):
    assert _train(files, tmp_path, "llama.json", "--steps", "2").exit_code == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    args = ["--steps", "4", "--context", "16", "--checkpoint", str(ckpt), "--path", str(tmp_path / "next")]
    result = _train(files, tmp_path, "llama.json", *args)
    assert result.exit_code == 0, result.output
    assert f"warning: {ckpt} was trained with --context 32, this run uses 16" in result.output


def test_a_model_dir_trained_on_data_of_another_tokenizer_is_warned_about(files, tmp_path):
    assert _train(files, tmp_path, "llama.json", "--steps", "2").exit_code == 0
    model_dir = tmp_path / "run" / "checkpoints" / "step-00000002" / "model"  # holds the dataset's tokenizer
    other = make_prepared(tmp_path / "other", counting_docs(100, 64, seed=3), 64)
    tok = json.loads((other / "tokenizer" / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["t3"], vocab["t4"] = vocab["t4"], vocab["t3"]  # same size, two ids mean other words
    (other / "tokenizer" / "tokenizer.json").write_text(json.dumps(tok))
    warning = "was tokenized with another tokenizer than the model dir"
    args = ["--steps", "2", "--model", str(model_dir), "--path"]
    same = _train(files, tmp_path, "llama.json", *args, str(tmp_path / "same"))
    assert same.exit_code == 0 and warning not in same.output, same.output
    result = _train(files, tmp_path, "llama.json", *args, str(tmp_path / "new"), "--cache", str(other))
    assert result.exit_code == 0, result.output
    assert f"warning: {other} {warning} {model_dir}" in result.output


def test_bf16_residual_on_a_config_that_keeps_an_fp32_residual_is_warned_about(files, tmp_path):
    config = {"model_type": "mamba2", "hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2, "head_dim": 32,
              "expand": 2, "state_size": 8, "n_groups": 1, "chunk_size": 16, "vocab_size": 64}  # fmt: skip
    (files / "mamba2.json").write_text(json.dumps(config))
    with own_precision():
        result = _train(files, tmp_path, "mamba2.json", "--steps", "1", "--bf16-residual", "--precision", "bf16")
    assert result.exit_code == 0, result.output
    assert (
        "warning: --bf16-residual: this mamba2 config keeps its residual stream in fp32 (residual_in_fp32: true), so "
        "it stays fp32; set residual_in_fp32 to false in the model config for bf16"
    ) in " ".join(result.output.split())


@pytest.mark.parametrize("precision", [[], ["--precision", "fp32"]], ids=["cpu-auto", "fp32"])
def test_bf16_residual_in_an_fp32_run_is_warned_about(files, tmp_path, precision):
    """No bf16 autocast (the CPU's default, or --precision fp32): the option would do nothing, and flame says so."""
    result = _train(files, tmp_path, "llama.json", "--steps", "1", "--bf16-residual", *precision)
    assert result.exit_code == 0, result.output
    assert (
        "warning: --bf16-residual: this run trains in fp32 (no bf16 autocast), so the residual stream stays fp32; it "
        "applies with --precision bf16 (the default on a GPU)"
    ) in " ".join(result.output.split())
    with own_precision():
        bf16 = _train(files, tmp_path / "bf16", "llama.json", "--steps", "1", "--bf16-residual", "--precision", "bf16")
    assert bf16.exit_code == 0 and "warning: --bf16-residual" not in bf16.output, bf16.output


@pytest.mark.parametrize(
    ("launcher", "said", "stage"),
    [
        ({}, "DDP; bf16)", 0),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "FULL_SHARD"},
         "FSDP, full shard, sharded as ZeRO stage 3; bf16)", 3),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
         "DeepSpeed ZeRO-2, sharded as ZeRO stage 2; bf16)", 2),
    ],
)  # fmt: skip
def test_dry_run_estimates_memory_as_the_launcher_shards_it(files, tmp_path, monkeypatch, launcher, said, stage):
    """Under `accelerate launch` (2 processes here) the estimate is per device, sharded as the config shards (and
    as each holds the weights and gradients: FSDP's gathered bf16 weights, DeepSpeed's bf16 weights and fp32 master
    copy): for GLA-340M at 8 x 2048 in bf16, 21.36 GiB under DDP (captured or not: DDP's gradient buckets either
    way), 17.04 under ZeRO-2, 15.94 under FSDP's full shard (measured on 2 H200s: 21.06, 16.19, 15.46;
    benchmarks/RESULTS.md)."""
    from flame import models

    monkeypatch.setenv("WORLD_SIZE", "2")
    for key, value in launcher.items():
        monkeypatch.setenv(key, value)
    gla_340m = Path(__file__).resolve().parents[2] / "configs" / "gla_340M.json"
    args = ["train", "--model", str(gla_340m), "--cache", str(files / "ds"), "--path", str(tmp_path / "run")]
    result = runner.invoke(app, [*args, "--batch", "8", "--context", "2048", "--precision", "bf16", "--dry-run"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "8 x 1 update x 2 processes" in text and said in text, text
    expected = models.estimate_memory(
        models.load_config(gla_340m), 8, 2048, precision="bf16", zero_stage=stage, world_size=2, shared_casts=True,
        fsdp="FSDP" in said, deepspeed="DeepSpeed" in said,
    )["total"]  # fmt: skip
    assert f"{expected:.2f} GiB per device" in text
    assert {0: 21.36, 2: 17.04, 3: 15.94}[stage] == round(expected, 2)


def test_running_out_of_memory_is_one_error_line(files, tmp_path, monkeypatch):
    import torch

    from flame import engine

    def out_of_memory(*args):
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB."
        )

    monkeypatch.setattr(engine, "forward_loss", out_of_memory)
    result = _train(files, tmp_path, "llama.json", "--steps", "8")
    _one_error(
        result, "out of memory (Tried to allocate 2.00 GiB; GPU 0 has a total capacity of 79.15 GiB)", "lower --batch"
    )
