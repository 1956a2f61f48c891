"""flame.inspect: facts of model configs, prepared datasets, checkpoints and run dirs, against what flame wrote."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flame import models
from flame.errors import ConfigError, ModelError
from flame.inspect import (
    CheckpointFacts,
    DatasetFacts,
    InspectOptions,
    ModelFacts,
    RunFacts,
    as_dict,
    detect,
    inspect,
    log2_histogram,
    plot_run,
)
from tests.data.helpers import documents, train_tiny_tokenizer, write_jsonl
from tests.inspect_runs import BATCH, CONTEXT, STEPS, copy_checkpoint, trained_run

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.json"))


def checks(facts: CheckpointFacts) -> dict[str, bool]:
    return {c.name: c.ok for c in facts.checks}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A real `flame data prepare` output: 60 documents through a tiny BPE, 6 held out."""
    from flame.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("inspect-data")
    tokenizer = train_tiny_tokenizer(root / "tok-corpus", root / "bpe")
    write_jsonl(root / "corpus" / "a.jsonl", documents(60, seed=3))
    out = root / "prepared"
    prepare(
        PrepareConfig(dataset=str(root / "corpus"), tokenizer=str(tokenizer), output=str(out), val_docs=6, num_proc=1)
    )
    return out


# ---------------------------------------------------------------------------------------------------------------
# model configs


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_parameters_of_every_shipped_config_equal_the_built_model(config):
    facts = inspect(config)
    assert isinstance(facts, ModelFacts)
    model, built = models.build_model(config, meta=True)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    if not built.tie_word_embeddings:
        embedding += model.get_output_embeddings().weight.numel()
    assert facts.params == {"total": total, "embedding": embedding, "non_embedding": total - embedding}
    raw = json.loads(config.read_text())
    assert facts.model_type == raw["model_type"]
    assert facts.layers == raw["num_hidden_layers"] and facts.hidden == raw["hidden_size"]
    heads = getattr(built, "num_heads", None) or built.num_attention_heads  # mamba2_1B leaves it to the default
    assert facts.heads == heads == raw.get("num_heads", raw.get("num_attention_heads", heads))
    assert facts.flops_per_token == models.flops_per_token(built, 2048)
    assert facts.memory["total_gib"] == models.estimate_memory(built, 8, 2048, shared_casts=True)["total"]


def _readme_row(config: Path) -> str:
    """The README's row for a shipped config, from what `flame inspect` says (defaults: batch 8, share casts)."""

    def n(x: int) -> str:
        return f"{x / 1e9:.2f}B" if x >= 1e9 else f"{x / 1e6:.1f}M"

    f, long = inspect(config), inspect(config, InspectOptions(context=8192))
    p = f.params
    return (
        f"| `configs/{config.name}` | {f.model_type} | {f.layers} x {f.hidden} | {n(p['total'])} "
        f"({n(p['embedding'])} / {n(p['non_embedding'])}) | {f.flops_per_token / 1e9:.2f}G / "
        f"{long.flops_per_token / 1e9:.2f}G | {f.memory['total_gib']:.1f} |"
    )


def test_the_readme_table_of_shipped_configs_is_what_inspect_says():
    """The table went stale once (its memory column predated shared casts by 10-15%); it is checked here."""
    readme = (REPO / "README.md").read_text()
    rows = [ln for ln in readme.splitlines() if ln.startswith("| `configs/") and ln.endswith(" |")]
    assert rows == [_readme_row(config) for config in CONFIGS]


def test_a_varlen_runs_estimate_counts_no_kept_gla_states(monkeypatch):
    """FLAME_GLA_STATES=keep keeps GLA's chunk states, except under --varlen, whose calls stay FLA's."""
    from flame.inspect import inspect_model
    from flame.kernels.config import settings

    monkeypatch.setattr(settings, "mode", "auto")
    monkeypatch.setattr(settings, "gla_states", "keep")
    config = REPO / "configs" / "gla_340M.json"
    built = models.load_config(config)
    packed, varlen = (
        inspect_model(config, InspectOptions(), run={"share_casts": True, "varlen": v}).memory for v in (False, True)
    )
    assert packed["total_gib"] == models.estimate_memory(built, 8, 2048, shared_casts=True)["total"]
    assert varlen["total_gib"] == models.estimate_memory(built, 8, 2048, shared_casts=True, varlen=True)["total"]
    assert varlen["total_gib"] < packed["total_gib"]


def test_demo_config_counts_equal_a_really_built_model():
    model, _ = models.build_model(REPO / "configs" / "demo_gla.json", seed=0)
    assert inspect(REPO / "configs" / "demo_gla.json").params["total"] == sum(p.numel() for p in model.parameters())


def test_model_options_reach_the_flop_count_and_memory_estimate():
    config = REPO / "configs" / "transformer_340M.json"
    options = InspectOptions(context=4096, batch=2, precision="fp32", zero_stage=3, world_size=8, update=4)
    facts = inspect(config, options)
    built = models.load_config(config)
    expected = models.estimate_memory(built, 2, 4096, precision="fp32", zero_stage=3, world_size=8, accumulation=4)
    assert facts.context == 4096 and facts.flops_per_token == models.flops_per_token(built, 4096)
    assert facts.memory == {
        "batch": 2,
        "context": 4096,
        "update": 4,
        "precision": "fp32",
        "zero_stage": 3,
        "world_size": 8,
        "checkpointing": False,
        "share_casts": True,  # flame train's default (under fp32 it changes nothing)
        "bf16_residual": False,
        "deepspeed": False,
        "fsdp": False,
    } | {f"{k}_gib": v for k, v in expected.items()}
    both = inspect(config, InspectOptions(checkpointing=True, share_casts=True)).memory
    expected = models.estimate_memory(built, 8, 2048, activation_checkpointing=True, shared_casts=True)
    assert (both["checkpointing"], both["share_casts"], both["total_gib"]) == (True, True, expected["total"])
    assert both["total_gib"] < inspect(config).memory["total_gib"]
    unshared = inspect(config, InspectOptions(share_casts=False)).memory
    expected = models.estimate_memory(built, 8, 2048, shared_casts=False)
    assert (unshared["share_casts"], unshared["total_gib"]) == (False, expected["total"])
    assert unshared["total_gib"] > inspect(config).memory["total_gib"]  # the default shares the casts
    # a run trained with a bf16 residual stream is estimated so (transformers' norms keep 2 bytes less a token)
    from flame.inspect import inspect_model

    trained = inspect_model(config, InspectOptions(), run={"share_casts": True, "bf16_residual": True}).memory
    expected = models.estimate_memory(built, 8, 2048, shared_casts=True, bf16_residual=True)
    assert (trained["bf16_residual"], trained["total_gib"]) == (True, expected["total"])
    assert trained["total_gib"] < inspect(config).memory["total_gib"]
    # softmax attention grows with the context; the default (2048) is cheaper
    assert facts.flops_per_token > inspect(config).flops_per_token


def test_a_checkpoint_model_dir_is_a_model_with_weights(run):
    facts = inspect(run / "checkpoints" / "step-00000006" / "model")
    assert isinstance(facts, ModelFacts) and facts.has_weights and facts.model_type == "llama"
    assert facts.params["total"] == 64 * 32 + 2 * (32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64 + 2 * 32) + 32


def test_a_model_dir_with_unusable_weights_is_one_error(run, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(run / "checkpoints" / "step-00000006" / "model", model_dir)
    weights = next(model_dir.glob("*.safetensors"))
    whole = weights.read_bytes()
    weights.write_bytes(whole[:-10])
    with pytest.raises(ModelError, match=rf"weights of .*model are unusable: {weights.name} is [\d,]+ bytes where its"):
        inspect(model_dir)
    weights.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    with pytest.raises(ModelError, match=r"is not a safetensors file: download or save them again .*git lfs pull"):
        inspect(model_dir)
    weights.unlink()  # a dir with a PyTorch .bin has weights too
    torch.save({"x": torch.zeros(2)}, model_dir / "pytorch_model.bin")
    assert inspect(model_dir).has_weights


# ---------------------------------------------------------------------------------------------------------------
# prepared datasets


def test_dataset_counts_equal_the_manifest(dataset):
    import datasets
    from transformers import AutoTokenizer

    facts = inspect(dataset)
    assert isinstance(facts, DatasetFacts)
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert facts.splits == manifest["splits"] == facts.manifest_splits
    assert facts.documents == 60 == sum(s["documents"] for s in manifest["splits"].values())
    assert facts.tokens == sum(s["tokens"] for s in manifest["splits"].values())
    assert facts.splits["validation"]["documents"] == 6 and facts.problems == []
    assert facts.source == manifest["source"] and facts.tokenizer == manifest["tokenizer"]

    train = [list(r) for r in datasets.load_from_disk(str(dataset))["train"]["input_ids"]]
    lengths = np.array([len(r) for r in train])
    assert sum(facts.histogram["counts"]) == len(train)
    for lo, hi, count in zip(
        facts.histogram["edges"], facts.histogram["edges"][1:], facts.histogram["counts"], strict=False
    ):
        assert count == int(((lengths >= lo) & (lengths < hi)).sum())
    assert facts.lengths["min"] == lengths.min() and facts.lengths["max"] == lengths.max()
    tok = AutoTokenizer.from_pretrained(dataset / "tokenizer")
    assert facts.sample["tokens"] == len(train[0]) and facts.sample["text"] == tok.decode(train[0])[:400]
    assert facts.sample["text"].startswith("doc 0:")


def test_dataset_sample_index_and_cut(dataset):
    facts = inspect(dataset, InspectOptions(sample=3, sample_chars=10))
    assert facts.sample["index"] == 3 and len(facts.sample["text"]) == 10 and facts.sample["truncated"]
    assert facts.sample["text"].startswith("doc ") and facts.sample["text"] != inspect(dataset).sample["text"][:10]
    with pytest.raises(ConfigError, match="--sample 54 is past the last train document"):
        inspect(dataset, InspectOptions(sample=54))


def test_dataset_that_disagrees_with_its_manifest_is_reported(dataset, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["train"]["tokens"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    facts = inspect(copy)
    assert len(facts.problems) == 1 and facts.problems[0].startswith("split train: the data has")


def test_log2_histogram():
    assert log2_histogram(np.array([1, 2, 3, 4, 7, 8, 100])) == {
        "edges": [1, 2, 4, 8, 16, 32, 64, 128],
        "counts": [1, 2, 2, 1, 0, 0, 1],
    }
    assert log2_histogram(np.array([5, 6])) == {"edges": [4, 8], "counts": [2]}
    assert log2_histogram(np.array([], dtype=np.int64)) == {"edges": [], "counts": []}


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_facts_from_a_real_run(run):
    facts = inspect(run / "checkpoints" / "step-00000006")
    assert isinstance(facts, CheckpointFacts) and facts.ok, facts.checks
    assert all(checks(facts).values()) and len(facts.checks) == 6
    assert facts.step == 6 and facts.tokens == 6 * BATCH * CONTEXT
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert facts.loss == records[5]["loss"] and facts.loss_step == 6
    assert facts.config["steps"] == STEPS and facts.state["world"] == 1 and "config" not in facts.state

    from safetensors.torch import load_file

    weights = load_file(run / "checkpoints" / "step-00000006" / "model" / "model.safetensors")
    assert facts.stats["tensors"] == len(weights) == len(facts.tensors)
    assert facts.stats["params"] == facts.model.params["total"] == sum(t.numel() for t in weights.values())
    norm = math.sqrt(sum(float(t.norm()) ** 2 for t in weights.values()))
    assert facts.stats["norm"] == pytest.approx(norm, rel=1e-6)
    assert facts.stats["nan"] == facts.stats["inf"] == 0
    by_name = {t.name: t for t in facts.tensors}
    assert by_name["model.norm.weight"].norm == pytest.approx(float(weights["model.norm.weight"].norm()))
    # the loss at the earlier checkpoint comes from its own step
    assert inspect(run / "checkpoints" / "step-00000003").loss == records[2]["loss"]


def test_truncated_safetensors_fails_the_integrity_check(run, tmp_path):
    cp = copy_checkpoint(run, 6, tmp_path)
    weights = cp / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    facts = inspect(cp)
    assert not facts.ok
    assert checks(facts) == {
        "state/trainer.json": True,
        "state/accelerate": True,
        "model/config.json": True,
        "weights readable": False,
        "shapes match config": False,
        "finite weights": False,  # not checked: it said "no NaN or inf" of weights it could not read
    }
    assert "model.safetensors" in next(c.detail for c in facts.checks if c.name == "weights readable")
    assert (
        next(c.detail for c in facts.checks if c.name == "finite weights") == "not checked: the weights are unreadable"
    )


def test_corrupted_header_fails_the_integrity_check(run, tmp_path):
    cp = copy_checkpoint(run, 6, tmp_path)
    weights = cp / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:24] = b"\xff" * 16  # the JSON header starts at byte 8
    weights.write_bytes(bytes(data))
    assert checks(inspect(cp))["weights readable"] is False


def test_shape_mismatch_with_the_config_is_found(run, tmp_path):
    cp = copy_checkpoint(run, 6, tmp_path)
    config = json.loads((cp / "model" / "config.json").read_text())
    config["intermediate_size"] = 48
    (cp / "model" / "config.json").write_text(json.dumps(config))
    facts = inspect(cp)
    assert not facts.ok and checks(facts)["weights readable"] and not checks(facts)["shapes match config"]
    detail = next(c.detail for c in facts.checks if c.name == "shapes match config")
    assert "model.layers.0.mlp.down_proj.weight is [32, 64], the config says [32, 48]" in detail
    assert "(+2 more)" in detail  # 6 MLP weights differ, 4 named


def test_missing_and_unexpected_tensors_are_found(run, tmp_path):
    from safetensors.torch import load_file, save_file

    cp = copy_checkpoint(run, 6, tmp_path)
    path = cp / "model" / "model.safetensors"
    weights = load_file(path)
    weights["extra.weight"] = weights.pop("model.norm.weight")
    save_file(weights, path, metadata={"format": "pt"})
    detail = next(c.detail for c in inspect(cp).checks if c.name == "shapes match config")
    assert detail == "missing model.norm.weight [32]; unexpected extra.weight [32]"


def test_nan_weights_are_counted(run, tmp_path):
    from safetensors.torch import load_file, save_file

    cp = copy_checkpoint(run, 6, tmp_path)
    path = cp / "model" / "model.safetensors"
    weights = load_file(path)
    w = weights["model.layers.1.self_attn.q_proj.weight"]
    w[0, :3] = float("nan")
    w[1, 0] = float("inf")
    save_file(weights, path, metadata={"format": "pt"})
    facts = inspect(cp)
    assert not facts.ok and not checks(facts)["finite weights"]
    assert facts.stats["nan"] == 3 and facts.stats["inf"] == 1
    bad = next(t for t in facts.tensors if t.nan)
    assert bad.name == "model.layers.1.self_attn.q_proj.weight" and math.isnan(bad.norm)
    assert bad.max_abs == float(w[torch.isfinite(w)].abs().max())
    out = as_dict(facts)
    json.dumps(out, allow_nan=False)  # strict JSON: the NaN norm became null
    assert next(t for t in out["tensors"] if t["nan"])["norm"] is None


@pytest.mark.parametrize("tied", [True, False])
def test_saved_fla_model_matches_its_config(tmp_path, tied):
    """No false alarm on FLA's parameter names, with a tied or an untied LM head."""
    from flame.inspect import _shape_check, tensor_stats
    from tests.prepared import gla_config

    model, _ = models.build_model(gla_config(tmp_path / "gla.json", tie_word_embeddings=tied), seed=0)
    model.save_pretrained(tmp_path / "model")
    meta, _ = models.build_model(tmp_path / "model", meta=True)
    tensors, problems = tensor_stats(tmp_path / "model")
    assert problems == [] and _shape_check(meta, tensors) == []
    assert sum(math.prod(t.shape) for t in tensors) == sum(p.numel() for p in model.parameters())
    assert ("lm_head.weight" in {t.name for t in tensors}) is not tied


def test_missing_training_state_fails_the_integrity_check(run, tmp_path):
    cp = copy_checkpoint(run, 6, tmp_path)
    (cp / "state" / "accelerate" / "random_states_0.pkl").unlink()
    (cp / "state" / "accelerate" / "optimizer.bin").unlink()
    facts = inspect(cp)
    assert not facts.ok and [c.name for c in facts.checks if not c.ok] == ["state/accelerate"]
    assert facts.checks[1].detail == "0 random_states_*.pkl for 1 processes; no optimizer state"


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin", "random_states_0.pkl"])
def test_a_truncated_state_file_fails_the_integrity_check_and_the_resume(run, tmp_path, name):
    from flame import checkpoint as ckpt
    from flame.errors import CheckpointError

    cp = copy_checkpoint(run, 6, tmp_path)
    path = cp / "state" / "accelerate" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    facts = inspect(cp)
    assert not facts.ok and [c.name for c in facts.checks if not c.ok] == ["state/accelerate"]
    assert facts.checks[1].detail.startswith(name)
    # accelerate alone would go on without it (RNG: only a log line); flame refuses before loading anything
    with pytest.raises(CheckpointError, match=f"is damaged: {name}"):
        ckpt.load(None, cp)


def test_incomplete_checkpoint_misses_its_trainer_state(run, tmp_path):
    cp = copy_checkpoint(run, 6, tmp_path)
    tmp = cp.parent / ".step-00000006.tmp"
    cp.rename(tmp)
    (tmp / "state" / "trainer.json").unlink()
    facts = inspect(tmp)
    assert facts.step == 6 and facts.tokens is None and not facts.ok
    assert next(c for c in facts.checks if c.name == "state/trainer.json").detail == "missing: the save did not finish"


# ---------------------------------------------------------------------------------------------------------------
# run dirs


def test_run_summary_from_its_metrics(run):
    facts = inspect(run)
    assert isinstance(facts, RunFacts)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert (facts.step, facts.steps, facts.finished, facts.eta_s) == (STEPS, STEPS, True, 0.0)
    assert facts.tokens == last["tokens"] == STEPS * BATCH * CONTEXT
    assert (facts.loss, facts.lr, facts.tokens_per_s, facts.elapsed_s) == (
        last["loss"],
        last["lr"],
        last["tokens_per_s"],
        last["time"],
    )
    assert [c["step"] for c in facts.checkpoints] == [3, 6] and facts.incomplete == []
    assert facts.curve == {
        "step": [r["step"] for r in records],
        "loss": [r["loss"] for r in records],
        "lr": [r["lr"] for r in records],
        "val_loss": [None, None, records[2]["val_loss"], None, None, last["val_loss"]],
    }
    assert (facts.val_loss, facts.val_loss_step) == (last["val_loss"], STEPS)
    assert facts.model.model_type == "llama" and facts.config["type"] == "llama"


def test_a_runs_memory_estimate_uses_the_runs_own_settings(run, tmp_path):
    """Inspecting a run or one of its checkpoints estimates the memory the way its `flame train` did."""
    assert inspect(run).model.memory["checkpointing"] is False
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = json.loads((copy / "config.json").read_text()) | {"checkpointing": True, "share_casts": True}
    (copy / "config.json").write_text(json.dumps(config))
    memory = inspect(copy).model.memory
    built = models.load_config(copy / "checkpoints" / "step-00000006" / "model")
    # on the CPU `--precision auto` trained in fp32, which the checkpoints record (the config says "auto")
    assert config["precision"] == "auto"
    expected = models.estimate_memory(
        built, BATCH, CONTEXT, precision="fp32", activation_checkpointing=True, shared_casts=True
    )
    assert (memory["checkpointing"], memory["share_casts"], memory["precision"]) == (True, True, "fp32")
    assert memory["total_gib"] == expected["total"]
    # a run saved before --share-casts existed trained without; --share-casts / --no-share-casts override the run's
    (copy / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "share_casts"}))
    assert inspect(copy).model.memory["share_casts"] is False
    assert inspect(copy, InspectOptions(share_casts=True)).model.memory["share_casts"] is True
    config["share_casts"] = True
    (copy / "config.json").write_text(json.dumps(config))
    assert inspect(copy, InspectOptions(share_casts=False)).model.memory["share_casts"] is False


def test_unfinished_run_with_a_cut_last_line(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    # a crash mid-write leaves half a line
    (copy / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])
    (copy / "checkpoints" / ".step-00000006.tmp").mkdir()
    shutil.rmtree(copy / "checkpoints" / "step-00000006")
    facts = inspect(copy)
    fourth = json.loads(lines[3])
    assert (facts.step, facts.steps, facts.finished) == (4, STEPS, False)
    assert facts.eta_s == fourth["eta_s"] and facts.loss == fourth["loss"]
    assert [c["step"] for c in facts.checkpoints] == [3]
    assert facts.incomplete == [str(copy / "checkpoints" / ".step-00000006.tmp")]


def test_run_length_by_epochs_comes_from_the_engine_plan(run, tmp_path):
    from flame import engine
    from flame.config import TrainConfig

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = json.loads((copy / "config.json").read_text()) | {"steps": 0, "epochs": 2.0}
    (copy / "config.json").write_text(json.dumps(config))
    expected = engine.plan(TrainConfig(**config)).steps
    assert expected > STEPS and inspect(copy).steps == expected
    config["cache"] = str(tmp_path / "gone")  # the data moved away: the length is unknown, not wrong
    (copy / "config.json").write_text(json.dumps(config))
    assert inspect(copy).steps is None


def test_what_each_path_in_a_run_is(run):
    assert detect(run / "metrics.jsonl") == ("run", run)
    assert detect(run / "config.json") == ("run", run)
    assert detect(run / "checkpoints") == ("run", run)
    assert detect(run / "checkpoints" / "step-00000003") == ("checkpoint", run / "checkpoints" / "step-00000003")
    assert detect(run / "checkpoints" / "step-00000003" / "model") == (
        "model",
        run / "checkpoints" / "step-00000003" / "model",
    )


# ---------------------------------------------------------------------------------------------------------------
# --plot


def test_plot_draws_the_loss_and_lr_curves(run, tmp_path):
    import matplotlib.image

    png = tmp_path / "curves.png"
    facts = inspect(run, InspectOptions(plot=str(png)))
    assert facts.plot == str(png) and list(tmp_path.iterdir()) == [png]  # no temp file left
    image = matplotlib.image.imread(png)
    assert image.shape == (600, 800, 4) and image[..., :3].std() > 0.05

    fig = plot_run(facts, tmp_path / "again.png")
    loss_ax, lr_ax = fig.axes
    assert list(loss_ax.lines[0].get_xdata()) == facts.curve["step"]
    assert list(loss_ax.lines[0].get_ydata()) == facts.curve["loss"]
    assert list(lr_ax.lines[0].get_ydata()) == facts.curve["lr"]
    assert list(loss_ax.lines[1].get_xdata()) == [3, 6]  # the validation loss, where it was measured
    assert list(loss_ax.lines[1].get_ydata()) == [facts.curve["val_loss"][2], facts.val_loss]
    assert (loss_ax.get_ylabel(), lr_ax.get_ylabel(), lr_ax.get_xlabel()) == ("loss", "learning rate", "step")

    # other curves, another picture
    facts.curve["loss"] = [v * 0.5 for v in facts.curve["loss"]]
    plot_run(facts, tmp_path / "other.png")
    assert not np.array_equal(matplotlib.image.imread(tmp_path / "other.png"), image)
    assert np.array_equal(matplotlib.image.imread(tmp_path / "again.png"), image)


def test_plot_leaves_a_gap_at_a_skipped_update(run, tmp_path):
    facts = inspect(run)
    facts.curve["loss"][2] = None
    ydata = plot_run(facts, tmp_path / "gap.png").axes[0].lines[0].get_ydata()
    assert math.isnan(ydata[2]) and ydata[3] == facts.curve["loss"][3]


def test_plot_needs_a_run_and_a_png(dataset, tmp_path):
    with pytest.raises(ConfigError, match="--plot draws a run's curves but .* is a dataset"):
        inspect(dataset, InspectOptions(plot=str(tmp_path / "x.png")))
    with pytest.raises(ConfigError, match="give a FILE.png"):
        inspect(dataset, InspectOptions(plot=str(tmp_path / "x.pdf")))


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(ConfigError, match=r"nope does not exist: give a model config JSON"):
        inspect(tmp_path / "nope")


def test_path_that_is_none_of_the_kinds(tmp_path):
    with pytest.raises(ConfigError, match="is none of the things flame inspect reads"):
        inspect(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="is not a model config JSON"):
        inspect(tmp_path / "notes.txt")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        inspect(tmp_path / "broken.json")


def test_model_config_with_an_unknown_type(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"model_type": "no_such_model"}))
    with pytest.raises(ModelError, match="unknown model_type 'no_such_model'"):
        inspect(tmp_path / "m.json")


def test_bad_options_are_all_reported_at_once():
    with pytest.raises(ConfigError) as e:
        inspect(REPO / "configs" / "demo_gla.json", InspectOptions(context=0, precision="fp8", zero_stage=4))
    assert str(e.value) == (
        "--context must be >= 1, got 0; --precision must be bf16 or fp32, got fp8; "
        "--zero-stage must be 0, 1, 2 or 3, got 4"
    )
    with pytest.raises(ConfigError, match="--fsdp has no --zero-stage 1: FULL_SHARD is 3, SHARD_GRAD_OP 2, NO_SHARD 0"):
        inspect(REPO / "configs" / "demo_gla.json", InspectOptions(fsdp=True, zero_stage=1))


def test_the_precision_and_update_of_the_estimate_are_those_the_run_trained_with(run, tmp_path):
    """A CPU run trained in fp32 (its `--precision auto` resolved so): its run dir and checkpoints are estimated in
    fp32 and at the run's --update; a checkpoint written before the trainer state said the precision, in bf16; the
    options override both."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    checkpoint = copy / "checkpoints" / "step-00000006"
    built = models.load_config(checkpoint / "model")
    trainer = checkpoint / "state" / "trainer.json"
    state = json.loads(trainer.read_text())
    assert state["precision"] == "fp32"
    trainer.write_text(json.dumps(state | {"update": 3}))
    assert inspect(copy).config["precision"] == "auto"  # the run's configuration is shown as it was given
    for path in (copy, checkpoint):
        memory = inspect(path).model.memory
        expected = models.estimate_memory(built, BATCH, CONTEXT, precision="fp32", accumulation=3)
        assert (memory["precision"], memory["update"], memory["total_gib"]) == ("fp32", 3, expected["total"])
        memory = inspect(path, InspectOptions(precision="bf16", update=1)).model.memory
        shared = json.loads((copy / "config.json").read_text())["share_casts"]
        expected = models.estimate_memory(built, BATCH, CONTEXT, precision="bf16", accumulation=1, shared_casts=shared)
        assert (memory["precision"], memory["update"], memory["total_gib"]) == ("bf16", 1, expected["total"])
    trainer.write_text(json.dumps({k: v for k, v in state.items() if k != "precision"}))
    assert inspect(checkpoint).model.memory["precision"] == "bf16"
