import dataclasses
import json
import os
from collections import Counter

import datasets
import pytest
from transformers import AutoTokenizer

from flame.data import MANIFEST, MANIFEST_FIELDS, TOKENS_COLUMN, sources
from flame.data import prepare as prepare_module
from flame.data.prepare import PrepareConfig, default_output, prepare, val_count, val_indices
from flame.errors import ConfigError, DataError, OutputExistsError
from tests.data.helpers import documents, write_jsonl


def corpus(root, n=90):
    """Three files of different formats: units of several kinds in one source."""
    docs = documents(n, seed=1)
    write_jsonl(root / "a.jsonl", docs[: n // 3])
    write_jsonl(root / "b" / "c.jsonl", docs[n // 3 : 2 * n // 3])
    (root / "d").mkdir()
    for i, doc in enumerate(docs[2 * n // 3 :]):
        (root / "d" / f"{i:03d}.txt").write_text(doc)
    return docs


def rows(path, split):
    return [list(r) for r in datasets.load_from_disk(str(path))[split][TOKENS_COLUMN]]


@pytest.mark.parametrize("num_proc", [1, 2])
def test_round_trip_every_document_once_with_eos(tmp_path, tokenizer_dir, num_proc, monkeypatch):
    monkeypatch.setattr(sources, "GROUP_FILES", 4)  # several units, so two workers share them
    docs = corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    cfg = PrepareConfig(
        dataset=str(tmp_path / "corpus"),
        tokenizer=str(tokenizer_dir),
        output=str(out),
        val_docs=9,
        num_proc=num_proc,
        batch_size=4,
        context_length=512,
    )
    result = prepare(cfg)
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    eos = tok.eos_token_id
    expected = [tok(d)["input_ids"] + [eos] for d in docs]
    train, val = rows(out, "train"), rows(out, "validation")
    # Every document exactly once, whole, EOS appended; train keeps the corpus order.
    assert Counter(map(tuple, train + val)) == Counter(map(tuple, expected))
    held = set(val_indices(len(docs), 9, 42))
    assert train == [e for i, e in enumerate(expected) if i not in held]
    assert val == [e for i, e in enumerate(expected) if i in held]
    ds = datasets.load_from_disk(str(out))
    assert ds["train"].features[TOKENS_COLUMN].feature.dtype == "int32"

    manifest = json.loads((out / MANIFEST).read_text())
    assert tuple(manifest) == MANIFEST_FIELDS and manifest == result.manifest
    assert manifest["splits"] == {
        "train": {"documents": 81, "tokens": sum(map(len, train))},
        "validation": {"documents": 9, "tokens": sum(map(len, val))},
    }
    assert manifest["tokenizer"] == {
        "name_or_path": str(tokenizer_dir),
        "vocab_size": len(tok),
        "eos_token_id": eos,
        "bos_token_id": None,
    }
    assert manifest["context_length"] == 512
    assert manifest["source"]["kind"] == "local" and len(manifest["source"]["files"]) == 32
    assert manifest["settings"]["num_proc"] == num_proc and manifest["settings"]["seed"] == 42
    assert sorted(os.listdir(tmp_path)) == ["corpus", "out"]  # no temp folder left behind


def test_validation_split_is_deterministic(tmp_path, tokenizer_dir):
    corpus(tmp_path / "corpus", n=60)

    def val(name, **kw):
        cfg = PrepareConfig(
            dataset=str(tmp_path / "corpus"),
            tokenizer=str(tokenizer_dir),
            output=str(tmp_path / name),
            num_proc=1,
            **kw,
        )
        prepare(cfg)
        return rows(tmp_path / name, "validation")

    first = val("a", val_docs=0.1)
    assert len(first) == 6
    assert val("b", val_docs=0.1) == first
    assert val("c", val_docs=0.1, seed=7) != first
    cfg = PrepareConfig(
        dataset=str(tmp_path / "corpus"), tokenizer=str(tokenizer_dir), output=str(tmp_path / "d"), val_docs=0
    )
    assert list(prepare(cfg).manifest["splits"]) == ["train"]
    assert list(datasets.load_from_disk(str(tmp_path / "d"))) == ["train"]


def test_val_count_and_indices():
    assert val_count(None, 50) == 0 and val_count(None, 5000) == 50 and val_count(None, 10**7) == 1000
    assert val_count(0.25, 10) == 2 and val_count(3, 10) == 3 and val_count(0, 10) == 0
    assert val_indices(100, 5, 1) == val_indices(100, 5, 1) == sorted(val_indices(100, 5, 1))
    assert len(set(val_indices(100, 5, 1))) == 5


def test_hub_dataset_from_offline_cache(tmp_path, tokenizer_dir, hub_cache):
    for streaming in (False, True):
        out = tmp_path / f"out-{streaming}"
        cfg = PrepareConfig(
            dataset="tester/tiny",
            name="sample",
            tokenizer=str(tokenizer_dir),
            output=str(out),
            val_docs=3,
            streaming=streaming,
            num_proc=1,
        )
        manifest = prepare(cfg).manifest
        assert manifest["source"] == {
            "kind": "hub",
            "dataset": "tester/tiny",
            "name": "sample",
            "split": "train",
            "files": None,
            "column": "text",
            "streaming": streaming,
        }
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        expected = Counter(tuple(tok(d)["input_ids"] + [0]) for d in hub_cache)
        assert Counter(map(tuple, rows(out, "train") + rows(out, "validation"))) == expected


def test_refuses_existing_output_and_overwrite_replaces_only_a_prepared_dataset(tmp_path, tokenizer_dir):
    corpus(tmp_path / "corpus", n=12)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cfg = PrepareConfig(dataset=str(tmp_path / "corpus"), tokenizer=str(tokenizer_dir), output=str(out), num_proc=1)
    with pytest.raises(OutputExistsError, match="exists: pass --overwrite to replace it"):
        prepare(cfg)
    cfg.overwrite = True  # a folder of the user's (no manifest.json) is never replaced
    with pytest.raises(OutputExistsError, match=r"--overwrite: .*out is not a prepared dataset \(no manifest.json"):
        prepare(cfg)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty folder is replaced
    prepare(cfg)
    (out / "stale.txt").write_text("from the earlier run")
    prepare(cfg)  # an earlier prepared dataset is replaced whole
    assert (out / MANIFEST).exists() and not (out / "stale.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["corpus", "out"]


def test_an_output_that_is_holds_or_lies_in_an_input_is_refused_even_with_overwrite(tmp_path, tokenizer_dir):
    corpus(tmp_path / "corpus", n=12)
    before = sorted(p.name for p in (tmp_path / "corpus").iterdir())
    for output in (tmp_path / "corpus", tmp_path, tmp_path / "corpus" / "prepared"):
        cfg = PrepareConfig(
            dataset=str(tmp_path / "corpus"), tokenizer=str(tokenizer_dir), output=str(output), overwrite=True
        )
        with pytest.raises(OutputExistsError, match="is, holds, or lies inside the input"):
            prepare(cfg)
    assert sorted(p.name for p in (tmp_path / "corpus").iterdir()) == before
    (tmp_path / "file").write_text("mine")
    cfg = PrepareConfig(dataset=str(tmp_path / "corpus"), tokenizer=str(tokenizer_dir), output=str(tmp_path / "file"))
    with pytest.raises(OutputExistsError, match="is a file"):
        prepare(dataclasses.replace(cfg, overwrite=True))
    with pytest.raises(OutputExistsError, match=r"--output .*file/sub lies under the file .*file: give a folder"):
        prepare(dataclasses.replace(cfg, output=str(tmp_path / "file" / "sub")))
    assert (tmp_path / "file").read_text() == "mine"


def test_an_output_where_nothing_can_be_written_is_one_error(tmp_path, tokenizer_dir, monkeypatch):
    corpus(tmp_path / "corpus", n=12)
    (tmp_path / "ro").mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith("ro") else real(p, mode))
    cfg = PrepareConfig(
        dataset=str(tmp_path / "corpus"), tokenizer=str(tokenizer_dir), output=str(tmp_path / "ro" / "a" / "b")
    )
    with pytest.raises(OutputExistsError, match=r"cannot write in .*ro \(no permission, or a read-only disk\)"):
        prepare(cfg)
    assert os.listdir(tmp_path / "ro") == []


def test_leftovers_of_killed_runs_are_removed_and_one_being_written_is_named(tmp_path, tokenizer_dir):
    from flame.checkpoint import RunLock

    corpus(tmp_path / "corpus", n=12)
    for i in range(2):
        (tmp_path / f".out.incomplete-{i}" / "parts").mkdir(parents=True)
    writing = RunLock(tmp_path / ".out.incomplete-1")  # another run, still writing (or another machine's, alive)
    assert writing.acquire() is None and writing.held
    cfg = PrepareConfig(
        dataset=str(tmp_path / "corpus"), tokenizer=str(tokenizer_dir), output=str(tmp_path / "out"), num_proc=1
    )
    assert prepare(cfg).notes == [
        f"removed {tmp_path / '.out.incomplete-0'}, left by an interrupted run of this output",
        f"{tmp_path / '.out.incomplete-1'} is left by another run of this output (another machine's, or still "
        "running): remove it if none is",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.incomplete-1", "corpus", "out"]
    writing.release()
    assert prepare(dataclasses.replace(cfg, overwrite=True)).notes == [
        f"removed {tmp_path / '.out.incomplete-1'}, left by an interrupted run of this output"
    ]


def test_an_output_that_is_a_link_is_written_where_it_points(tmp_path, tokenizer_dir):
    corpus(tmp_path / "corpus", n=12)
    (tmp_path / "big-disk").mkdir()
    (tmp_path / "data").symlink_to(tmp_path / "big-disk")
    cfg = PrepareConfig(
        dataset=str(tmp_path / "corpus"), tokenizer=str(tokenizer_dir), output=str(tmp_path / "data" / "ds"), num_proc=1
    )
    prepare(cfg)
    (tmp_path / "big-disk" / "ds-link").symlink_to(tmp_path / "big-disk" / "ds")
    prepare(dataclasses.replace(cfg, output=str(tmp_path / "big-disk" / "ds-link"), overwrite=True))
    assert (tmp_path / "big-disk" / "ds-link").is_symlink() and (tmp_path / "big-disk" / "ds" / MANIFEST).is_file()
    assert sorted(p.name for p in (tmp_path / "big-disk").iterdir()) == ["ds", "ds-link"]  # no .old- folder left


def test_a_full_disk_names_the_output_not_the_input(tmp_path, tokenizer_dir, monkeypatch):
    import errno

    corpus(tmp_path / "corpus", n=12)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prepare_module, "_to_arrow", full)
    cfg = PrepareConfig(
        dataset=str(tmp_path / "corpus"), tokenizer=str(tokenizer_dir), output=str(tmp_path / "out"), num_proc=1
    )
    with pytest.raises(DataError, match=rf"^no space left on the disk of {tmp_path}: free space on that disk"):
        prepare(cfg)  # it said "cannot read corpus/a.jsonl (OSError: ... No space left on device)"
    assert sorted(os.listdir(tmp_path)) == ["corpus"]


def test_a_failed_run_leaves_no_output(tmp_path, tokenizer_dir, monkeypatch):
    corpus(tmp_path / "corpus", n=12)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "_write_splits", interrupted)
    cfg = PrepareConfig(
        dataset=str(tmp_path / "corpus"), tokenizer=str(tokenizer_dir), output=str(tmp_path / "out"), num_proc=1
    )
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    assert sorted(os.listdir(tmp_path)) == ["corpus"]


def test_empty_documents_are_skipped_and_an_empty_dataset_fails(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "c.jsonl", ["one", "", "two"])
    cfg = PrepareConfig(dataset=str(path), tokenizer=str(tokenizer_dir), output=str(tmp_path / "o"), num_proc=1)
    manifest = prepare(cfg).manifest
    assert manifest["splits"]["train"]["documents"] == 2 and manifest["settings"]["skipped_empty"] == 1
    path = write_jsonl(tmp_path / "e.jsonl", ["", ""])
    cfg = PrepareConfig(dataset=str(path), tokenizer=str(tokenizer_dir), output=str(tmp_path / "e"), num_proc=1)
    with pytest.raises(DataError, match="no documents in"):
        prepare(cfg)
    assert not (tmp_path / "e").exists()


def test_bad_text_column_type_and_options(tmp_path, tokenizer_dir):
    path = tmp_path / "n.jsonl"
    path.write_text('{"text": 5}\n')
    cfg = PrepareConfig(dataset=str(path), tokenizer=str(tokenizer_dir), output=str(tmp_path / "o"), num_proc=1)
    with pytest.raises(DataError, match="column 'text' of .*n.jsonl holds int, not text"):
        prepare(cfg)
    cfg = PrepareConfig(dataset=str(path), context_length=0, num_proc=0, val_docs=2.5)
    with pytest.raises(ConfigError, match="--context_length must be positive.*--num-proc.*--val-docs"):
        prepare(cfg)
    for bad in (float("nan"), float("inf")):  # nan failed only after the whole corpus was tokenized, with a traceback
        with pytest.raises(ConfigError, match=f"--val-docs takes a count or a fraction below 1, got {bad}"):
            prepare(PrepareConfig(dataset=str(path), val_docs=bad))
    write_jsonl(tmp_path / "t.jsonl", ["a", "b"])
    cfg = PrepareConfig(
        dataset=str(tmp_path / "t.jsonl"), tokenizer=str(tokenizer_dir), output=str(tmp_path / "v"), val_docs=2
    )
    with pytest.raises(ConfigError, match="holds out 2 of 2 documents"):
        prepare(cfg)


def test_default_output_follows_the_seed():
    assert default_output(PrepareConfig("HuggingFaceFW/fineweb-edu", name="sample-10BT")) == os.path.join(
        "data", "HuggingFaceFW", "fineweb-edu", "sample-10BT", "train"
    )
    assert default_output(PrepareConfig("/x/SlimPajama-627B/train")) == os.path.join(
        "data", "SlimPajama-627B-train", "default", "train"
    )
    assert default_output(PrepareConfig("./corpus/*.jsonl.zst", split="validation")) == os.path.join(
        "data", "corpus", "default", "validation"
    )


def test_a_worker_that_cannot_start_fails_the_run_instead_of_hanging(tmp_path, tokenizer_dir, monkeypatch):
    corpus(tmp_path / "corpus", n=12)
    monkeypatch.setattr(sources, "GROUP_FILES", 2)

    def broken(*args):
        raise RuntimeError("no backend")

    monkeypatch.setattr(prepare_module, "rust_tokenizer", broken)
    cfg = PrepareConfig(
        dataset=str(tmp_path / "corpus"), tokenizer=str(tokenizer_dir), output=str(tmp_path / "out"), num_proc=2
    )
    with pytest.raises(DataError, match="tokenizer failed to load in a worker.*no backend"):
        prepare(cfg)
    assert sorted(os.listdir(tmp_path)) == ["corpus"]


def test_to_arrow_appends_eos_to_each_document():
    column = prepare_module._to_arrow([[5, 6], [], [7]], eos=0)
    assert column.type.value_type.bit_width == 32
    assert column.to_pylist() == [[5, 6, 0], [0], [7, 0]]
    assert prepare_module._to_arrow([], eos=0).to_pylist() == []
