"""Tokenizers: load one by hub id or folder, or train a byte-level BPE offline when the hub is out of reach.

tok = load_tokenizer("fla-hub/gla-1.3B-100B")              # hub id (or its offline cache) or a local dir
train_tokenizer(["corpus/"], vocab_size=32000, output="tokenizers/bpe-32k")
tok = load_tokenizer("tokenizers/bpe-32k")                 # AutoTokenizer.from_pretrained works on it too
"""

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

from flame import hub
from flame.errors import ConfigError, DataError, check_output_dir, disk_full, first_line

DEFAULT_TOKENIZER = "fla-hub/gla-1.3B-100B"
EOS_TOKEN = "<|endoftext|>"
OFFLINE_FIX = (
    "pass a local tokenizer dir, or build one offline from your text: "
    "`flame data tokenizer CORPUS --vocab-size 32000 --output tokenizers/bpe` then --tokenizer tokenizers/bpe"
)


def load_tokenizer(name_or_path: str):
    """AutoTokenizer for a hub id or local dir; a fast tokenizer with an EOS token, else a DataError with the fix."""
    from transformers import AutoTokenizer

    if os.path.isdir(name_or_path) or name_or_path.startswith((".", "/", "~")):
        path = os.path.expanduser(name_or_path)
        if not os.path.isdir(path):
            raise DataError(f"tokenizer dir {name_or_path!r} does not exist", OFFLINE_FIX)
        inner = os.path.join(path, "tokenizer")  # a prepared dataset, or a run's checkpoint, keeps it there
        if not os.path.isfile(os.path.join(path, "tokenizer.json")) and os.path.isdir(inner):
            raise DataError(
                f"{name_or_path!r} holds its tokenizer in a subfolder, not at the top", f"give --tokenizer {inner}"
            )
        name_or_path = path
    else:
        hub.offline_unless_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:  # OSError offline/not found, ValueError for a dir without tokenizer files
        raise DataError(f"cannot load tokenizer {name_or_path!r} ({first_line(e)[:200]})", OFFLINE_FIX) from None
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "_tokenizer", None) is None:
        raise DataError(
            f"tokenizer {name_or_path!r} has no fast (Rust) backend",
            "use a tokenizer with tokenizer.json, or build one with `flame data tokenizer`",
        )
    if tokenizer.eos_token_id is None:
        raise DataError(
            f"tokenizer {name_or_path!r} has no EOS token, so document ends cannot be marked",
            "set eos_token in its tokenizer_config.json, or build one with `flame data tokenizer`",
        )
    return tokenizer


def backend(tokenizer):
    """A standalone copy of the Rust tokenizer that encodes exactly like `tokenizer(text)["input_ids"]`.

    transformers turns off truncation and padding and sets encode_special_tokens before each call; the copy is
    configured the same once, so workers can call encode_batch_fast directly and skip the Python wrapper.
    """
    return rust_tokenizer(tokenizer._tokenizer.to_str(), bool(getattr(tokenizer, "split_special_tokens", False)))


def rust_tokenizer(tokenizer_json: str, split_special_tokens: bool = False):
    """backend() from the tokenizer's JSON (what a worker process receives)."""
    from tokenizers import Tokenizer

    rust = Tokenizer.from_str(tokenizer_json)
    rust.no_truncation()
    rust.no_padding()
    rust.encode_special_tokens = split_special_tokens
    return rust


@dataclass
class TokenizerConfig:
    """What `flame data tokenizer` trains."""

    inputs: list[str]
    """Local folders, files or globs of text (same formats as `flame data prepare`)."""
    output: str
    """Folder to write; AutoTokenizer.from_pretrained(output) loads it, and --tokenizer accepts it."""
    vocab_size: int = 32000
    """Vocabulary size, special tokens included."""
    column: str | None = None
    """Text column; found automatically (text, content) when not given."""
    max_docs: int | None = None
    """Train on the first N documents only (BPE training holds word counts in memory)."""
    min_frequency: int = 2
    """Merges need a pair seen at least this often."""
    overwrite: bool = False
    """Replace an existing output folder."""


def train_tokenizer(config: TokenizerConfig, show_progress: bool = False) -> dict:
    """Train a byte-level BPE (GPT-2 style, no unknown tokens) on local text and save it as a transformers dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from flame.data.sources import read_unit, resolve_source

    problems = []
    if config.vocab_size < 300:
        problems.append(f"--vocab-size {config.vocab_size} is below the 256 bytes plus merges; use at least 300")
    if not config.inputs:
        problems.append("no inputs: give one or more folders, files or globs of text")
    if problems:
        raise ConfigError("; ".join(problems))
    output = os.path.realpath(os.path.expanduser(config.output))  # a link is written where it points
    # never: a model dir and a prepared dataset hold a tokenizer too, and are not ours to replace
    check_output_dir(
        output,
        config.inputs,
        overwrite=config.overwrite,
        replaces=("tokenizer.json",),
        what="a tokenizer folder",
        never=("config.json", "manifest.json"),
    )
    sources = [resolve_source(path, column=config.column) for path in config.inputs]

    count = 0

    def texts() -> Iterator[str]:
        nonlocal count
        for source in sources:
            for unit in source.units:
                for batch, _ in read_unit(source, unit, batch_size=1000):
                    for text in batch:
                        if config.max_docs is not None and count >= config.max_docs:
                            return
                        if isinstance(text, str) and text:
                            count += 1
                            yield text

    bpe = Tokenizer(models.BPE())
    # Byte-level: every string is representable, so there is no unknown token (as GPT-2, Llama 3).
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    bpe.train_from_iterator(texts(), trainer=trainer)
    if count == 0:
        raise DataError(f"no documents in {', '.join(config.inputs)}", "give files that hold text")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, model_max_length=1 << 30)

    tmp = f"{output}.incomplete-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            tokenizer.save_pretrained(tmp)
        except Exception as e:  # the Rust tokenizer's write fails as a plain Exception
            if full := disk_full(e, os.path.dirname(tmp)):
                raise full from e
            raise
        replace_dir(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"output": output, "vocab_size": len(tokenizer), "documents": count, "eos_token": EOS_TOKEN}


def replace_dir(tmp: str, output: str) -> None:
    """Move a finished folder into place (a tokenizer, a prepared dataset, a converted model); an existing one is
    moved aside under a hidden name first and removed only afterwards."""
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    old = None
    if os.path.exists(output):
        old = os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.old-{os.getpid()}")
        os.rename(output, old)
    os.rename(tmp, output)
    if old:
        shutil.rmtree(old, ignore_errors=True)
