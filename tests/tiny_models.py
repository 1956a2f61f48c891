"""Tiny Llama-family models, tokenizers and converted FLA model dirs for tests (CPU, a few seconds, no hub).

    from tests.tiny_models import converted_model_dir
    model_dir = converted_model_dir(tmp_path)   # a GLA model dir converted from a tiny Llama fit to TEXT

The source models are fit to TEXT for 20 steps, so a model converted from them has a loss on TEXT far below the
ln(vocab) of a random one (more steps and the tiny source leans on the softmax attention the conversion replaces).
"""

import json
from pathlib import Path

import torch

TEXT = (
    "the quick brown fox jumps over the lazy dog. a linear attention model keeps a state of fixed size. "
    "gated linear attention decays that state with a gate that depends on the input. "
    "the delta rule writes to the state what it would have read wrong. "
)

# One geometry for every family: grouped-query attention (4 query heads, 2 kv heads of 16 dims).
GEOMETRY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)

# FLA target configs that fit GEOMETRY (vocab_size is the source's unless a test sets it).
TARGETS = {
    "gla": dict(model_type="gla", num_heads=4, num_kv_heads=2, expand_k=1, expand_v=1),
    "gated_deltanet": dict(model_type="gated_deltanet", num_heads=4, head_dim=16, expand_v=1),
    "delta_net": dict(model_type="delta_net", num_heads=4, expand_k=1, expand_v=1),
    "gsa": dict(model_type="gsa", num_heads=4, num_kv_heads=2, num_slots=8),
    "retnet": dict(model_type="retnet", num_heads=4, expand_k=1, expand_v=1),
}


def make_tokenizer(out: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE trained on TEXT, saved as a transformers tokenizer (tokenizer.json + config)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


def text_ids(model_dir: Path) -> torch.Tensor:
    """TEXT tokenized with the model dir's tokenizer, as a (1, T) batch."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return torch.tensor([tok(TEXT * 2)["input_ids"]])


def make_llama(
    out: Path,
    family: str = "llama",
    fit_steps: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> Path:
    """A tiny Llama/Mistral/Qwen2 model dir with a tokenizer, optionally fit to TEXT and saved in shards."""
    from transformers import AutoConfig, AutoModelForCausalLM

    make_tokenizer(out)
    vocab = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    cfg = AutoConfig.for_model(
        family,
        **GEOMETRY,
        vocab_size=vocab,
        rms_norm_eps=1e-5,
        rope_theta=5000.0,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if fit_steps:
        fit(model, text_ids(out), fit_steps)
    model.to(dtype).save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return out


def fit(model, ids: torch.Tensor, steps: int, lr: float = 1e-2) -> float:
    """A few Adam steps on one batch: enough for a tiny model to learn TEXT. Returns the last loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return loss.item()


def target_config(out: Path, family: str = "gla", **overrides) -> Path:
    """An FLA config JSON for a target family that fits GEOMETRY."""
    cfg = dict(
        hidden_size=GEOMETRY["hidden_size"],
        num_hidden_layers=GEOMETRY["num_hidden_layers"],
        intermediate_size=GEOMETRY["intermediate_size"],
        vocab_size=32000,
        **TARGETS[family],
    )
    cfg.update(overrides)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(cfg, indent=2))
    return out


def converted_model_dir(root: Path, family: str = "gla", source: str = "llama", fit_steps: int = 20) -> Path:
    """A model dir converted with `flame convert from-llama` from a tiny source fit to TEXT: what `flame train
    --model` continues from. Returns root/"converted"; the source is at root/"source"."""
    from flame.convert import ConvertOptions, convert_from_llama

    src = make_llama(root / "source", family=source, fit_steps=fit_steps)
    cfg = target_config(root / f"{family}.json", family)
    convert_from_llama(ConvertOptions(model=str(src), config=cfg, output=root / "converted"))
    return root / "converted"
