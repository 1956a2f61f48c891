"""Small corpora and a tiny tokenizer made on the spot: tests never reach the hub."""

import json
import random
from pathlib import Path

WORDS = "the of linear attention gate state decay kernel chunk token model train data flash recurrent".split()


def documents(n: int, seed: int = 0) -> list[str]:
    """n distinct documents of varied length, with newlines, quotes, commas and non-ASCII text."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 60))]
        extra = rng.choice(["", "\nsecond line", ', "quoted", comma', " caf\u00e9 \u65e5\u672c"])
        docs.append(f"doc {i}: {' '.join(words)}{extra}")
    return docs


def write_jsonl(path: Path, docs: list[str], column: str = "text", **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for doc in docs:
            f.write(json.dumps({column: doc, **extra}) + "\n")
    return path


def train_tiny_tokenizer(corpus_dir: Path, output: Path, vocab_size: int = 400) -> Path:
    from flame.data.tokenizer import TokenizerConfig, train_tokenizer

    write_jsonl(corpus_dir / "tok.jsonl", documents(200, seed=99))
    train_tokenizer(TokenizerConfig(inputs=[str(corpus_dir)], output=str(output), vocab_size=vocab_size))
    return output


def cache_hub_dataset(cache: Path, repo_id: str, config: str, docs: list[str], tmp: Path) -> None:
    """Put `repo_id` (config `config`, split train) in a datasets cache exactly where a past online
    `load_dataset(repo_id, config)` leaves it, so that with HF_HUB_OFFLINE=1 datasets serves it from there."""
    import glob
    import shutil

    from datasets.packaged_modules.json.json import Json

    source = write_jsonl(tmp / f"{config}.jsonl", docs)
    name = repo_id.split("/")[-1]
    builder = Json(
        cache_dir=str(tmp / "build"), dataset_name=name, config_name=config, data_files={"train": [str(source)]}
    )
    builder.download_and_prepare()
    built = glob.glob(str(tmp / "build" / name / "*" / "0.0.0"))[0]
    # datasets' layout: {namespace}___{name}/{config}/{version}/{hash}/ (see datasets.load.CachedDatasetModuleFactory)
    target = cache / repo_id.replace("/", "___") / config / "0.0.0" / "0123456789abcdef"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(built, target)
