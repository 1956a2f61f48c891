"""Build prepared-dataset folders (the format of flame/data/__init__.py) directly, so engine tests do not depend on
`flame data prepare`, plus tiny model configs."""

import contextlib
import json
from pathlib import Path

import numpy as np

from flame.data import FORMAT, MANIFEST, TOKENIZER_DIR

EOS, BOS = 2, 1


def counting_docs(n: int, vocab: int, seed: int = 0, min_len: int = 8, max_len: int = 40) -> list[list[int]]:
    """Documents that count upwards modulo the vocab from a random start, then EOS: next token = this + 1, a
    pattern a tiny model learns in a few dozen updates."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        start, length = int(rng.integers(3, vocab)), int(rng.integers(min_len, max_len))
        docs.append([3 + (start - 3 + i) % (vocab - 3) for i in range(length)] + [EOS])
    return docs


def random_prepared(path: Path, vocab: int, windows: int, context: int, seed: int = 0) -> Path:
    """A prepared dataset of random-token documents of 4 windows each, enough for `windows` windows of `context`
    with a margin (the benchmarks' data: no pattern to learn, every window full)."""
    docs = np.random.default_rng(seed).integers(3, vocab, (windows // 4 + 8, 4 * context)).tolist()
    return make_prepared(path, docs, vocab)


def write_tokenizer(path: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": BOS, "</s>": EOS} | {f"t{i}": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(path))


def make_prepared(path: Path, docs: list[list[int]], vocab: int, val_docs: list[list[int]] | None = None) -> Path:
    """A folder `datasets.load_from_disk` opens, with manifest.json and tokenizer/ (vocab_size = `vocab`)."""
    import datasets

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    splits = {"train": datasets.Dataset.from_dict({"input_ids": docs}, features=features)}
    if val_docs:
        splits["validation"] = datasets.Dataset.from_dict({"input_ids": val_docs}, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(path))
    write_tokenizer(path / TOKENIZER_DIR, vocab)
    manifest = {
        "format": FORMAT,
        "source": {
            "kind": "local",
            "dataset": "test",
            "name": None,
            "split": "train",
            "files": None,
            "column": "text",
            "streaming": False,
        },
        "tokenizer": {"name_or_path": "test", "vocab_size": vocab, "eos_token_id": EOS, "bos_token_id": BOS},
        "splits": {k: {"documents": len(v), "tokens": sum(map(len, v["input_ids"]))} for k, v in splits.items()},
        "context_length": 64,
        "settings": {},
        "created": "2026-01-01T00:00:00",
        "flame_version": "0.1.0",
    }
    (path / MANIFEST).write_text(json.dumps(manifest))
    return path


def llama_config(path: Path, vocab: int = 64, **overrides) -> Path:
    """A tiny transformers Llama config JSON (2 layers, width 32)."""
    config = {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "tie_word_embeddings": True,
    } | overrides
    path.write_text(json.dumps(config))
    return path


def gla_config(path: Path, vocab: int = 64, **overrides) -> Path:
    """A tiny FLA GLA config JSON (2 layers, width 32, 2 heads)."""
    config = {
        "model_type": "gla",
        "vocab_size": vocab,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_heads": 2,
        "expand_k": 0.5,
        "expand_v": 1,
        "attn_mode": "chunk",
        "use_short_conv": False,
        "fuse_norm": False,
        "fuse_swiglu": False,
        "fuse_cross_entropy": False,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "tie_word_embeddings": True,
    } | overrides
    path.write_text(json.dumps(config))
    return path


@contextlib.contextmanager
def own_precision():
    """A run with a precision of its own: accelerate keeps one per process, and most tests train in fp32."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def gla_340m_layers(root: Path, layers: int = 2) -> Path:
    """For the GPU tests: GLA-340M's config (configs/gla_340M.json) with `layers` layers, so FLA's kernels see the
    340M model's shapes (a Triton cache of either serves both), as root/gla.json, and a prepared dataset of 600
    documents of 200-2000 tokens with a 60-document validation split as root/ds. Returns root."""
    repo = Path(__file__).resolve().parents[1]
    config = json.loads((repo / "configs" / "gla_340M.json").read_text()) | {"num_hidden_layers": layers}
    (root / "gla.json").write_text(json.dumps(config))
    vocab = config["vocab_size"]
    docs = counting_docs(600, vocab, seed=0, min_len=200, max_len=2000)
    make_prepared(root / "ds", docs, vocab, val_docs=counting_docs(60, vocab, seed=1, min_len=200, max_len=2000))
    return root
