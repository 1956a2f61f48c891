"""Tiny FLA models of every supported family train and generate on CPU through flame.kernels."""

import pytest
import torch

import flame.kernels
from flame.errors import ModelError

VOCAB = 64
CONFIGS = {
    "gla": dict(num_heads=2, use_short_conv=True),
    "gated_deltanet": dict(num_heads=2, head_dim=16),
    "delta_net": dict(num_heads=2),
    "retnet": dict(num_heads=2),
    "hgrn2": dict(num_heads=2, expand_ratio=16),
    "mamba2": dict(num_heads=4, head_dim=16, expand=2, n_groups=1, state_size=16),
    "gsa": dict(num_heads=2, num_kv_heads=1, num_slots=16),  # FLA's Triton kernels need >= 16 (compat)
    "rwkv7": dict(head_dim=16),
}
VARLEN = (
    "gla",
    "gated_deltanet",
    "delta_net",
    "retnet",
    "hgrn2",
    "gsa",
    "rwkv7",
)  # Mamba2's torch path takes no cu_seqlens


def build(model_type):
    import fla.models  # noqa: F401  (registers the FLA configs with transformers)
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type, hidden_size=32, num_hidden_layers=2, vocab_size=VOCAB, **CONFIGS[model_type]
    )
    return AutoModelForCausalLM.from_config(config).eval()


def test_every_supported_family_has_a_config():
    assert set(CONFIGS) == set(flame.kernels.SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_forward_backward_and_cached_generation(model_type):
    model = build(model_type)
    ids = torch.randint(0, VOCAB, (2, 70))  # > 64 tokens: the layers take their chunk (training) path
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    # Greedy generation with the recurrent cache picks the tokens a full forward pass would pick.
    prompt = ids[:1, :12]
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True)
        assert generated.shape == (1, 16)
        logits = model(generated[:, :-1], use_cache=False).logits
    assert torch.equal(logits[0, 11:].argmax(-1), generated[0, 12:])


@pytest.mark.parametrize("model_type", VARLEN)
def test_varlen_batch_equals_documents_run_separately(model_type):
    model = build(model_type)
    docs = [torch.randint(0, VOCAB, (n,)) for n in (70, 9, 30)]
    cu = torch.tensor([0, 70, 79, 109])
    with torch.no_grad():
        packed = model(torch.cat(docs)[None], cu_seqlens=cu).logits
        for i, doc in enumerate(docs):
            alone = model(doc[None]).logits
            torch.testing.assert_close(packed[:, cu[i] : cu[i + 1]], alone, atol=1e-4, rtol=1e-4)


def test_uncovered_family_fails_with_one_model_error_naming_type_and_op():
    from fla.models import RWKV6Config, RWKV6ForCausalLM

    model = RWKV6ForCausalLM(RWKV6Config(hidden_size=64, num_hidden_layers=2, num_heads=2, vocab_size=VOCAB))
    with pytest.raises(ModelError, match=r"model type 'rwkv6' cannot run on CPU: FLA op fla\.ops\.rwkv6\.\S+ has no"):
        model(torch.randint(0, VOCAB, (1, 8)))
    with pytest.raises(ModelError, match="model type 'rwkv6' has no portable torch kernels"):
        flame.kernels.check_model("rwkv6")
    flame.kernels.check_model("gla")


@pytest.mark.parametrize("model_type", ["gla", "gated_deltanet", "rwkv7"])
def test_left_padded_batch_equals_unpadded_sequences(model_type):
    # FLA layers turn an attention mask into cu_seqlens: the padded row must equal the sequence run alone.
    model = build(model_type)
    long, short = torch.randint(3, VOCAB, (20,)), torch.randint(3, VOCAB, (12,))
    ids = torch.stack([long, torch.cat([torch.zeros(8, dtype=torch.long), short])])
    mask = (ids != 0).long()
    mask[0] = 1
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(out[0], model(long[None]).logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1, 8:], model(short[None]).logits[0], atol=1e-5, rtol=1e-5)
