import pytest

from tests.data.helpers import cache_hub_dataset, documents, train_tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A 400-token byte-level BPE with EOS, trained once per session."""
    root = tmp_path_factory.mktemp("tokenizer")
    return train_tiny_tokenizer(root / "corpus", root / "bpe")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline datasets cache holding tester/tiny (config 'sample', 30 documents); returns the documents."""
    import datasets

    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    docs = documents(30, seed=5)
    cache_hub_dataset(cache, "tester/tiny", "sample", docs, tmp_path / "src")
    return docs
