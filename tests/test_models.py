"""flame.models: every shipped config loads, builds, counts and costs; model dirs load their weights as saved."""

import json
from pathlib import Path

import pytest
import torch

from flame.errors import ModelError
from flame.models import (
    CHUNK_SIZE,
    build_model,
    count_params,
    estimate_memory,
    fla_model_types,
    flops_breakdown,
    flops_per_token,
    load_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(p.name for p in CONFIGS.glob("*.json") if "model_type" in json.loads(p.read_text()))
SOFTMAX = {"transformer_340M.json", "transformer_1B.json"}
EXPECTED = {  # the configs the anchors ship, plus the demo
    "gla_340M.json",
    "gla_1B.json",
    "gla_7B.json",
    "gated_deltanet_340M.json",
    "gated_deltanet_1B.json",
    "delta_net_340M.json",
    "delta_net_1B.json",
    "mamba2_340M.json",
    "mamba2_1B.json",
    "transformer_340M.json",
    "transformer_1B.json",
    "demo_gla.json",
}


def test_every_anchor_config_is_shipped():
    assert EXPECTED <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config(name):
    config = load_config(CONFIGS / name)
    assert config.model_type == json.loads((CONFIGS / name).read_text())["model_type"]
    model, built = build_model(CONFIGS / name, meta=True)
    assert next(model.parameters()).device.type == "meta"
    counts = count_params(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["embedding"] + counts["non_embedding"] == counts["total"]
    assert counts == count_params(config)  # from the config alone, the same numbers
    assert counts["embedding"] == config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)

    parts = flops_breakdown(config, 2048)
    assert parts["unknown_mixers"] == []
    assert sum(parts["mixers"].values()) == config.num_hidden_layers
    assert parts["matmul"] > 6 * counts["non_embedding"] * 0.95  # 6N dominates
    f1, f2, f4 = (flops_per_token(config, t) for t in (1024, 2048, 4096))
    assert f1 > 0
    if name in SOFTMAX:  # attention grows linearly in T: equal steps
        assert f1 < f2 < f4
        assert f4 - f2 == pytest.approx(2 * (f2 - f1))
    else:  # chunked linear attention: per-token cost independent of T
        assert f1 == f2 == f4


def test_gla_340m_size_matches_its_name():
    counts = count_params(load_config(CONFIGS / "gla_340M.json"))
    assert 300e6 < counts["non_embedding"] < 340e6


def test_transformer_configs_use_llama():
    # FLA's own `transformer` model needs the flash-attn package even to be constructed; llama builds everywhere
    for name in SOFTMAX:
        assert load_config(CONFIGS / name).model_type == "llama"


def test_seed_determinism():
    a, _ = build_model(CONFIGS / "demo_gla.json", seed=7)
    state = torch.get_rng_state()
    b, _ = build_model(CONFIGS / "demo_gla.json", seed=7)
    c, _ = build_model(CONFIGS / "demo_gla.json", seed=8)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is left alone
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.dtype == torch.float32


def test_model_dir_loads_weights_as_saved(tmp_path):
    model, _ = build_model(CONFIGS / "demo_gla.json", seed=0)
    with torch.no_grad():  # values no initialiser produces, so any re-initialisation shows
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.linspace(-3, 3, p.numel()).reshape(p.shape) + i)
    model.save_pretrained(tmp_path / "ckpt")
    loaded, config = build_model(tmp_path / "ckpt", seed=123)
    saved, got = model.state_dict(), loaded.state_dict()
    assert saved.keys() == got.keys()
    for k in saved:
        assert torch.equal(saved[k], got[k]), k
    assert config.model_type == "gla"
    meta, _ = build_model(tmp_path / "ckpt", meta=True)
    assert count_params(meta) == count_params(loaded)


def test_model_dir_with_missing_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = build_model(CONFIGS / "demo_gla.json", seed=0)
    model.save_pretrained(tmp_path / "ckpt")
    weights = load_file(tmp_path / "ckpt" / "model.safetensors")
    dropped = next(k for k in weights if "q_proj" in k)
    del weights[dropped]
    save_file(weights, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="missing"):
        build_model(tmp_path / "ckpt")


def test_unknown_model_type(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"model_type": "not_a_model", "hidden_size": 64}))
    with pytest.raises(ModelError) as e:
        load_config(path)
    assert "not_a_model" in str(e.value)
    for known in ("gla", "gated_deltanet", "delta_net", "mamba2"):
        assert known in str(e.value)
        assert known in fla_model_types()


@pytest.mark.parametrize(
    "content, match",
    [("{not json", "not valid JSON"), ("[1, 2]", "no JSON object"), ('{"hidden_size": 64}', "no model_type")],
)
def test_bad_config_files(tmp_path, content, match):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(ModelError, match=match):
        load_config(path)


def test_missing_path_and_dir_without_config(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_config(tmp_path / "nope.json")
    with pytest.raises(ModelError, match="no config.json"):
        load_config(tmp_path)


def test_gla_flops_by_hand():
    # one GLA layer: hidden 64, 2 heads, expand_k 0.5 (dk = 16 per head), expand_v 1 (dv = 32), vocab 100,
    # intermediate 128, no conv; projections q (64x32) k (64x32) v (64x64) g (64x64) gk (64x16 + 16x32) o (64x64),
    # MLP 3 x 64 x 128, LM head 64 x 100
    config = _tiny_gla()
    n_matmul = 64 * 32 * 2 + 64 * 64 * 3 + 64 * 16 + 16 * 32 + 3 * 64 * 128 + 64 * 100
    mixer = 2 * 2 * (CHUNK_SIZE * 16 + CHUNK_SIZE * 32 + 2 * 16 * 32)
    parts = flops_breakdown(config, 256)
    assert parts["n_matmul"] == n_matmul
    assert parts["total"] == 6 * n_matmul + 3 * mixer
    assert flops_per_token(config, 4096) == 6 * n_matmul + 3 * mixer


def test_softmax_flops_by_hand():
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        num_hidden_layers=2,
        vocab_size=100,
    )
    n_matmul = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128) + 64 * 100
    # causal: position i attends to i keys, mean (T + 1) / 2; Q K^T and A V, 2 FLOPs per multiply-add
    attention = 2 * 4 * 4 * 16 * (1000 + 1) / 2
    assert flops_per_token(config, 1000) == 6 * n_matmul + 3 * attention


def test_memory_estimate_parts():
    config = load_config(CONFIGS / "gla_340M.json")
    n = count_params(config)["total"]
    mem = estimate_memory(config, 8, 2048)
    assert mem["grads"] == pytest.approx(4 * n / 2**30)
    assert mem["optimizer"] == pytest.approx(8 * n / 2**30)
    assert mem["total"] == pytest.approx(mem["weights"] + mem["grads"] + mem["optimizer"] + mem["activations"])
    assert estimate_memory(config, 16, 2048)["activations"] == pytest.approx(2 * mem["activations"])
    z3 = estimate_memory(config, 8, 2048, zero_stage=3, world_size=8)
    assert z3["optimizer"] == pytest.approx(mem["optimizer"] / 8)
    assert z3["grads"] == pytest.approx(mem["grads"] / 8)
    assert z3["weights"] == pytest.approx(mem["weights"] / 8)
    z1 = estimate_memory(config, 8, 2048, zero_stage=1, world_size=8)
    assert z1["grads"] == pytest.approx(mem["grads"]) and z1["optimizer"] == pytest.approx(mem["optimizer"] / 8)
    ckpt = estimate_memory(config, 8, 2048, activation_checkpointing=True)
    assert ckpt["activations"] < mem["activations"] / 2


def _tiny_gla():
    from transformers import AutoConfig

    load_config(CONFIGS / "demo_gla.json")  # registers FLA's types
    return AutoConfig.for_model(
        "gla",
        hidden_size=64,
        num_heads=2,
        expand_k=0.5,
        expand_v=1,
        intermediate_size=128,
        num_hidden_layers=1,
        vocab_size=100,
        tie_word_embeddings=False,
    )
