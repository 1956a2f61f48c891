"""flame.models: every shipped config loads, builds, counts and costs; model dirs load their weights as saved."""

import json
from pathlib import Path

import pytest
import torch

from flame import models
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
from tests.prepared import gla_config

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


def test_model_dir_with_extra_weights_loads_and_names_them(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model, _ = build_model(CONFIGS / "demo_gla.json", seed=0)
    model.save_pretrained(tmp_path / "ckpt")
    weights = load_file(tmp_path / "ckpt" / "model.safetensors")
    weights["model.extra.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    build_model(tmp_path / "ckpt")
    err = capsys.readouterr().err
    assert "holds 1 weights its gla model does not use, left out: model.extra.weight" in err
    assert "LOAD REPORT" not in err  # transformers' own report stays quiet; flame says it once


def test_model_dir_with_truncated_weights_is_refused(tmp_path):
    model, _ = build_model(CONFIGS / "demo_gla.json", seed=0)
    model.save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(ModelError, match="weights in .* are damaged .*: copy or convert the model dir again"):
        build_model(tmp_path / "ckpt")


def test_a_negative_size_is_a_model_error(tmp_path):
    raw = json.loads((CONFIGS / "demo_gla.json").read_text()) | {"intermediate_size": -8}
    (tmp_path / "neg.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="cannot build model_type 'gla'"):
        build_model(tmp_path / "neg.json")


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
    # what a user gives by mistake: a checkpoint folder (the model is inside), a run dir (its config is the run's)
    (tmp_path / "step-00000010" / "model").mkdir(parents=True)
    (tmp_path / "step-00000010" / "model" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(
        ModelError, match=r"step-00000010 is a checkpoint, not a model dir: give its model dir, .*/model"
    ):
        load_config(tmp_path / "step-00000010")
    (tmp_path / "config.json").write_text('{"model": "m.json", "cache": "data", "path": "exp/run", "lr": 0.001}')
    with pytest.raises(ModelError, match=r"is a flame run dir, not a model: .*checkpoints/step-N/model.*flame resume"):
        load_config(tmp_path)


def test_gpt2_linears_count_as_matmul_weights():
    """GPT-2's linears are transformers' Conv1D, not nn.Linear: they once went uncounted (N was the LM head only)."""
    from transformers import GPT2Config

    config = GPT2Config(n_positions=64, n_embd=64, n_layer=2, n_head=4, vocab_size=100)
    per_layer = 64 * 3 * 64 + 64 * 64 + 64 * 256 + 256 * 64  # c_attn, c_proj, c_fc, mlp c_proj
    assert flops_breakdown(config, 64)["n_matmul"] == 2 * per_layer + 100 * 64  # + the (tied) LM head


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
    mem = estimate_memory(config, 8, 2048, accumulation=2)  # grads stay allocated between micro-batches
    assert mem["grads"] == pytest.approx(4 * n / 2**30)
    assert mem["optimizer"] == pytest.approx(8 * n / 2**30)
    # one step per batch: at the start of the backward only the LM head's gradient exists yet
    assert estimate_memory(config, 8, 2048)["grads"] == pytest.approx(4 * 32000 * 1024 / 2**30)
    # DDP's buckets hold every gradient through the backward, captured or not
    assert estimate_memory(config, 8, 2048, world_size=2)["grads"] == pytest.approx(mem["grads"])
    assert mem["total"] == pytest.approx(mem["weights"] + mem["grads"] + mem["optimizer"] + mem["activations"])
    assert estimate_memory(config, 16, 2048)["activations"] == pytest.approx(2 * mem["activations"])
    z3 = estimate_memory(config, 8, 2048, zero_stage=3, world_size=8)
    assert z3["optimizer"] == pytest.approx(mem["optimizer"] / 8)
    assert z3["grads"] == pytest.approx(mem["grads"] / 8)
    assert z3["weights"] == pytest.approx(mem["weights"] / 8)
    z1 = estimate_memory(config, 8, 2048, zero_stage=1, world_size=8)  # ZeRO-1 keeps whole grads
    assert z1["grads"] == pytest.approx(mem["grads"]) and z1["optimizer"] == pytest.approx(mem["optimizer"] / 8)
    ckpt = estimate_memory(config, 8, 2048, accumulation=2, activation_checkpointing=True)
    assert ckpt["activations"] < mem["activations"] / 2


def test_memory_estimate_as_deepspeed_trains():
    """DeepSpeed's bf16 (no autocast): bf16 weights (sharded at stage 3), an fp32 master copy sharded with the
    moments, a bf16 residual stream; at stage 3 the gathered bf16 weights stay alive up to 1e9 of them. Against
    GLA-340M on 2 H200s (benchmarks/RESULTS.md, seventeenth session): within -1.4% to +5.2% of the measured peaks,
    where autocast's accounting erred +3.5% to +19%."""
    config = load_config(CONFIGS / "gla_340M.json")
    n = count_params(config)["total"]
    gib = 2**30
    z2 = estimate_memory(config, 8, 2048, zero_stage=2, world_size=2, shared_casts=True, deepspeed=True)
    assert z2["weights"] == pytest.approx((2 * n + 4 * n / 2) / gib)
    assert (z2["grads"], z2["optimizer"]) == (pytest.approx(4 * n / 2 / gib), pytest.approx(8 * n / 2 / gib))
    bf16_stream = estimate_memory(config, 8, 2048, zero_stage=2, world_size=2, shared_casts=True, bf16_residual=True)
    assert z2["activations"] == bf16_stream["activations"]
    z3 = estimate_memory(config, 8, 2048, zero_stage=3, world_size=2, shared_casts=True, deepspeed=True)
    assert z3["weights"] == pytest.approx((2 * n / 2 + 4 * n / 2 + 2 * n) / gib)  # n < 1e9: all gathered alive
    measured = {(8, 2): 16.19, (8, 3): 17.64, (32, 2): 55.28, (32, 3): 56.91}
    for (batch, stage), peak in measured.items():
        total = estimate_memory(config, batch, 2048, zero_stage=stage, world_size=2, shared_casts=True, deepspeed=True)
        assert -0.015 < total["total"] / peak - 1 < 0.06, (batch, stage, total["total"], peak)
    # ZeRO-1 keeps whole grads; fp32 training is not DeepSpeed's bf16 and is estimated as before
    z1 = estimate_memory(config, 8, 2048, zero_stage=1, world_size=2, deepspeed=True)
    assert z1["grads"] == pytest.approx(4 * n / gib) and z1["weights"] == pytest.approx((2 * n + 4 * n / 2) / gib)
    fp32 = dict(precision="fp32", zero_stage=2, world_size=2)
    assert estimate_memory(config, 8, 2048, **fp32, deepspeed=True) == estimate_memory(config, 8, 2048, **fp32)


def test_memory_estimate_as_fsdp_trains():
    """FSDP's bf16 mixed precision: fp32 weight shards; at full shard the gathered bf16 weights of the root unit
    (embeddings, head, final norm) and two blocks (the one computing, the one prefetched), at shard grad op all of
    them; no gradient alive at the start of the backward but the head's (they are reduce-scattered into shards as
    the backward makes them), all of them unsharded in bf16 under accumulation (no_sync: torch's FSDP leaves the
    gradient autograd made for the gathered bf16 weights in .grad). Against GLA-340M at 8 and 32 x 2048 and GLA-1.3B
    at 8 x 2048 on 2 H200s (benchmarks/RESULTS.md): +3.1% to +3.4%, where autocast's accounting erred +4.7% to
    +12.6%."""
    config = load_config(CONFIGS / "gla_340M.json")
    n = count_params(config)["total"]
    gib = 2**30
    # GLA-340M's block: q, k (1024 x 512), v, g, o (1024 x 1024), the gate's low rank (1024 x 16, 16 x 512 + bias),
    # the output norm (256), 2 block norms, the MLP (3 x 1024 x 2816)
    block = 2 * 1024 * 512 + 3 * 1024 * 1024 + (1024 * 16 + 16 * 512 + 512) + 256 + 2 * 1024 + 3 * 1024 * 2816
    full = estimate_memory(config, 8, 2048, zero_stage=3, world_size=2, shared_casts=True, fsdp=True)
    root = n - 24 * block  # embeddings, head, final norm
    assert full["weights"] == pytest.approx((4 * n / 2 + 2 * (root + 2 * block)) / gib)
    assert full["grads"] == pytest.approx(4 * 32000 * 1024 / gib)  # the head's only
    assert full["optimizer"] == pytest.approx(8 * n / 2 / gib)
    bf16_stream = estimate_memory(config, 8, 2048, shared_casts=True, bf16_residual=True)
    assert full["activations"] == bf16_stream["activations"]
    grad_op = estimate_memory(config, 8, 2048, zero_stage=2, world_size=2, shared_casts=True, fsdp=True)
    assert grad_op["weights"] == pytest.approx((4 * n / 2 + 2 * n) / gib)  # every block stays gathered
    accumulating = estimate_memory(config, 8, 2048, zero_stage=3, world_size=2, accumulation=2, fsdp=True)
    assert accumulating["grads"] == pytest.approx(2 * n / gib)  # no_sync keeps them whole, bf16
    measured = {("gla_340M", 8): 15.46, ("gla_340M", 32): 54.74, ("gla_1B", 8): 32.97}
    for (name, batch), peak in measured.items():
        model = load_config(CONFIGS / f"{name}.json")
        total = estimate_memory(model, batch, 2048, zero_stage=3, world_size=2, shared_casts=True, fsdp=True)["total"]
        assert 0 < total / peak - 1 < 0.04, (name, batch, total, peak)


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


@pytest.mark.parametrize(
    "shared,residual",
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["casts-per-projection", "shared-casts", "bf16-residual", "shared-casts-bf16-residual"],
)
def test_activation_terms_match_what_autograd_saves(shared, residual):
    """The Llama accounting against the tensors autograd really keeps (bf16 autocast on the CPU, whose SDPA
    kernel saves what flash attention saves on a GPU: q, k, v, output, log-sum-exp), with autocast's cast per
    projection, with share_norm_casts, and with the residual stream in bf16 (bf16_residual)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from flame.models import activation_breakdown, bf16_residual, share_norm_casts

    config = LlamaConfig(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=384,
        num_hidden_layers=2,
        vocab_size=500,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    if shared:
        assert share_norm_casts(model) == 4  # each layer's input_layernorm and post_attention_layernorm
    if residual:
        bf16_residual(model)
    tokens = torch.randint(0, 500, (2, 128))
    storages = {}

    def from_weight(fn):  # a weight's bf16 cast or its transpose: counted with the weights, not activations
        if type(fn).__name__ not in ("ToCopyBackward0", "TBackward0"):
            return False
        return any(type(f).__name__ == "AccumulateGrad" or from_weight(f) for f, _ in fn.next_functions)

    def pack(t):
        if not (t.is_leaf and t.requires_grad) and not from_weight(t.grad_fn):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=tokens, labels=tokens)
    measured = sum(storages.values()) / tokens.numel()
    parts = activation_breakdown(model, shared_casts=shared, bf16_residual=residual)
    saved = sum(sum(layer.values()) for layer in parts["layers"]) + parts["head"]["final_norm"]
    saved += parts["head"]["log_probs"]  # the bf16 logits live in the output; the fp32 log-probs are saved
    rope = 2 * 4 * 32 * 128 / tokens.numel()  # cos and sin per position, shared by the batch (not per token)
    assert measured == pytest.approx(saved + rope, rel=0.01)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gla_340M.json"])
def test_memory_estimate_within_15_percent_of_measured(name):
    """The issue's target: GLA-340M at batch 8 x 2048, bf16 autocast, fused AdamW on one GPU."""
    from flame.metrics import measure_training_peak

    model, config = build_model(CONFIGS / name, seed=0, device="cuda")
    measured = measure_training_peak(model, 8, 2048)["peak_gib"]
    estimate = estimate_memory(config, 8, 2048)["total"]
    print(f"{name}: estimate {estimate:.2f} GiB, measured {measured:.2f} GiB, ratio {estimate / measured:.3f}")
    assert estimate == pytest.approx(measured, rel=0.15)


@pytest.mark.gpu
def test_build_on_gpu_is_the_cpu_init():
    cpu, _ = build_model(CONFIGS / "demo_gla.json", seed=3)
    gpu, _ = build_model(CONFIGS / "demo_gla.json", seed=3, device="cuda")
    for (k, a), b in zip(cpu.state_dict().items(), gpu.state_dict().values()):
        assert torch.equal(a, b.cpu()), k


def test_max_context():
    from transformers import GPT2Config

    from flame.models import max_context

    assert max_context(load_config(CONFIGS / "gla_340M.json")) is None  # recurrent: no position table
    assert max_context(load_config(CONFIGS / "transformer_340M.json")) is None  # RoPE: no table
    assert max_context(GPT2Config(n_positions=256, n_embd=64, n_layer=1, n_head=2, vocab_size=100)) == 256
    # an embedding that is no position table (FLA's CAT compresses with one of the vocabulary's size) limits nothing
    from torch import nn

    other = nn.ModuleDict(
        {"embed_tokens": nn.Embedding(100, 8), "compressor": nn.ModuleDict({"wte": nn.Embedding(100, 8)})}
    )
    assert max_context(other) is None


def test_fp32_shares_the_normed_input():
    from flame.models import activation_breakdown

    config = load_config(CONFIGS / "gla_340M.json")
    bf16 = activation_breakdown(config, "bf16")["layers"][0]
    fp32 = activation_breakdown(config, "fp32")["layers"][0]
    assert bf16["input_casts"] == 5 * 2 * 1024  # q, k, v, g and the low-rank gate each cast the fp32 input
    assert fp32["input_casts"] == 4 * 1024
    shared = activation_breakdown(config, "bf16", shared_casts=True)["layers"][0]
    assert shared["input_casts"] == 2 * 1024  # one bf16 copy made by the norm (share_norm_casts)
    assert {k: v for k, v in shared.items() if k != "input_casts"} == {
        k: v for k, v in bf16.items() if k != "input_casts"
    }


def test_kept_gla_states_are_counted_per_token(monkeypatch):
    from flame.kernels.config import settings
    from flame.models import activation_breakdown, estimate_memory

    config = load_config(CONFIGS / "gla_1B.json")
    monkeypatch.setattr(settings, "mode", "auto")
    monkeypatch.setattr(settings, "gla_states", "recompute")
    recomputed = activation_breakdown(config)
    at_8x2048 = estimate_memory(config, 8, 2048)
    monkeypatch.setattr(settings, "gla_states", "keep")
    kept = activation_breakdown(config)
    # --varlen's calls (cu_seqlens) go to FLA's chunk_gla, which keeps nothing
    assert activation_breakdown(config, varlen=True) == recomputed
    assert estimate_memory(config, 8, 2048, varlen=True) == at_8x2048
    assert estimate_memory(config, 8, 2048)["activations"] - at_8x2048["activations"] == pytest.approx(
        16384 * 25 * 8 * 2048 / 2**30
    )
    # 4 heads of 256 x 512 bf16 states per 64 tokens: 16 KiB a token and layer (256 MiB a layer at 8 x 2048)
    assert [layer["chunk_states"] for layer in kept["layers"]] == [16384.0] * 24
    assert [layer["chunk_states"] for layer in recomputed["layers"]] == [0] * 24
    assert kept["total"] - recomputed["total"] == 16384 * 25  # every layer, and the largest once more
    monkeypatch.setattr(settings, "mode", "triton")  # FLA's own kernels recompute them
    assert activation_breakdown(config) == recomputed


def _tiny(model_type: str, tmp_path: Path):
    config = {"model_type": model_type, "hidden_size": 64, "num_hidden_layers": 2, "num_heads": 2, "vocab_size": 128}
    (tmp_path / f"{model_type}.json").write_text(json.dumps(config))
    return build_model(tmp_path / f"{model_type}.json", seed=0)[0]


@pytest.mark.parametrize("model_type,norms", [("gla", 4), ("gated_deltanet", 4), ("rwkv7", 0), ("mamba2", 0)])
def test_shared_casts_change_only_how_gradients_are_summed(tmp_path, model_type, norms):
    """share_norm_casts: under autocast the same forward and, with each projection's gradient summed in bf16,
    gradients as close to fp32's as autocast's own; outside autocast nothing changes at all."""
    from flame.models import share_norm_casts

    tokens = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))

    def run(model, autocast):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model = _tiny(model_type, tmp_path)
    exact, cast = run(model, False), run(model, True)
    assert share_norm_casts(model) == norms  # RWKV's token shift and Mamba2's single in_proj: nothing to share
    assert _same(run(model, False), exact)  # no autocast: not even a bit differs
    shared = run(model, True)
    assert shared[0] == cast[0]  # the forward is the same, bit for bit
    assert _same(shared, cast) == (norms == 0)  # the backward sums the projections' gradients in bf16
    for name, ref in exact[1].items():
        own, theirs = (cast[1][name] - ref).norm(), (shared[1][name] - ref).norm()
        assert theirs <= 1.1 * own + 1e-3 * ref.norm() + 1e-8, name


@pytest.mark.parametrize("model_type", ["gla", "gated_deltanet", "rwkv7", "mamba2"])
def test_bf16_residual_gives_every_block_bf16_under_autocast_only(tmp_path, model_type):
    """bf16_residual: under autocast every block reads (and adds into) a bf16 residual stream and the loss stays
    close to fp32's; outside autocast the stream is fp32 and nothing changes at all."""
    from flame.models import bf16_residual, blocks

    tokens = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    model = _tiny(model_type, tmp_path)
    if model_type == "mamba2":  # Mamba2's config keeps an fp32 residual by default: bf16_residual leaves it so
        assert model.config.residual_in_fp32 and bf16_residual(model) is False
        model.config.residual_in_fp32 = False
        for block in blocks(model):
            block.residual_in_fp32 = False
    seen = []
    for block in blocks(model):
        block.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args or [*kwargs.values()])[0].dtype),
                                        with_kwargs=True)  # fmt: skip

    def run(autocast):
        seen.clear()
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=tokens, labels=tokens)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return (out.loss.item(), grads), list(seen)

    exact, plain = run(False)
    assert plain == [torch.float32] * 2
    (cast_loss, _), autocast_seen = run(True)
    assert autocast_seen == [torch.float32] * 2  # autocast alone keeps the stream fp32
    assert bf16_residual(model) is True
    again, seen_again = run(False)
    assert _same(again, exact) and seen_again == plain
    (loss, grads), residual_seen = run(True)
    assert residual_seen == [torch.bfloat16] * 2
    if model_type == "mamba2":  # the estimate follows the config: an fp32 residual is estimated as one
        from flame.models import activation_breakdown

        model.config.residual_in_fp32 = True
        assert activation_breakdown(model, bf16_residual=True) == activation_breakdown(model)
        model.config.residual_in_fp32 = False
        assert activation_breakdown(model, bf16_residual=True)["total"] < activation_breakdown(model)["total"]
    assert loss == pytest.approx(exact[0], rel=1e-2) and loss != cast_loss
    assert set(grads) == set(exact[1]) and all(torch.isfinite(g).all() for g in grads.values())


def _same(a, b) -> bool:
    return a[0] == b[0] and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_sliding_window_caps_attention_flops():
    from transformers import MistralConfig

    from flame.models import mean_attended_keys

    assert mean_attended_keys(4) == 2.5  # (1 + 2 + 3 + 4) / 4
    assert mean_attended_keys(4, window=2) == 1.75  # (1 + 2 + 2 + 2) / 4
    config = MistralConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        num_hidden_layers=1,
        vocab_size=100,
        sliding_window=256,
    )
    per_key = flops_per_token(config, 2048) - flops_per_token(config, 1024)
    assert per_key == 3 * 4 * 4 * 16 * (mean_attended_keys(2048, 256) - mean_attended_keys(1024, 256))
    assert mean_attended_keys(10**6, window=256) == pytest.approx(256, rel=1e-3)  # bounded by the window


@pytest.mark.parametrize(
    "model_type, kind",
    [
        ("gla", "linear_attention"),
        ("retnet", "linear_attention"),
        ("hgrn2", "linear_attention"),
        ("rwkv6", "linear_attention"),
        ("gsa", "slot_attention"),
        ("delta_net", "delta_rule"),
        ("gated_deltanet", "delta_rule"),
        ("rwkv7", "delta_rule"),
        ("mamba2", "ssd"),
        ("mamba", "selective_scan"),
    ],
)
def test_fla_families_have_their_mixer_formula(model_type, kind):
    from transformers import AutoConfig

    fla_model_types()  # registers FLA's types
    config = AutoConfig.for_model(model_type, num_hidden_layers=2)
    parts = flops_breakdown(config, 2048)
    assert parts["mixers"] == {kind: 2}
    assert parts["unknown_mixers"] == []
    assert flops_per_token(config, 512) == flops_per_token(config, 16384)  # no softmax term


def test_linear_mixer_named_attention_is_not_softmax():
    # MomAttention is a linear (mixture-of-memories) layer: never the T-growing softmax term (fla-org/flame#7)
    from transformers import AutoConfig

    fla_model_types()
    config = AutoConfig.for_model("mom", num_hidden_layers=1)
    parts = flops_breakdown(config, 2048)
    assert "softmax_attention" not in parts["mixers"]
    assert flops_per_token(config, 512) == flops_per_token(config, 16384)


def test_checkpointing_recomputes_every_block_and_changes_no_gradient(tmp_path):
    """checkpointing: each decoder block's forward runs again in the backward (non-reentrant), and the gradients are
    those of the plain model, bit for bit; a model type without support is left as it is."""
    from flame.models import blocks, checkpointing

    tokens = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))

    def run(model):
        calls = []
        for block in blocks(model):
            block.attn.register_forward_pre_hook(lambda m, args, kwargs: calls.append(m), with_kwargs=True)
        model(input_ids=tokens, labels=tokens).loss.backward()
        return len(calls), {n: p.grad for n, p in model.named_parameters()}

    def checkpointed(model):
        return [block.gradient_checkpointing for block in blocks(model)]

    plain_calls, plain = run(_tiny("gla", tmp_path).train())
    model = _tiny("gla", tmp_path).train()
    assert checkpointing(model) is True and checkpointed(model) == [True, True]
    calls, grads = run(model)
    assert (plain_calls, calls) == (2, 4)  # 2 blocks, each one's attention once more during the backward
    assert plain.keys() == grads.keys() and all(torch.equal(plain[n], grads[n]) for n in plain)

    unsupported = _tiny("gla", tmp_path)
    unsupported.supports_gradient_checkpointing = False
    assert checkpointing(unsupported) is False and checkpointed(unsupported) == [False, False]


def test_models_are_built_whole_while_a_zero3_config_is_registered(tmp_path):
    """accelerate registers deepspeed_zero3.yaml's config with transformers, which then builds every model under
    DeepSpeed's zero.Init (empty shards; on a CPU it fails outright): flame builds them whole, as elsewhere."""
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    path = gla_config(tmp_path / "gla.json")
    alone, _ = models.build_model(path, seed=0)
    counts = models.count_params(models.load_config(path)), models.flops_per_token(models.load_config(path), 64)
    models._meta_model_cached.cache_clear()
    registered = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        under_zero3, _ = models.build_model(path, seed=0)
        config = models.load_config(path)
        assert (models.count_params(config), models.flops_per_token(config, 64)) == counts
        assert is_deepspeed_zero3_enabled()  # put back for accelerate's prepare()
    finally:
        unset_hf_deepspeed_config()
        del registered
        models._meta_model_cached.cache_clear()
    assert under_zero3.state_dict().keys() == alone.state_dict().keys()
    for name, tensor in alone.state_dict().items():
        assert torch.equal(under_zero3.state_dict()[name], tensor), name
