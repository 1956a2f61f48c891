import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from flame.data import sources
from flame.data.sources import is_local, local_files, read_unit, resolve_source
from flame.errors import DataError
from tests.data.helpers import documents, write_jsonl


def read_all(source) -> list:
    return [text for unit in source.units for texts, _ in read_unit(source, unit, batch_size=7) for text in texts]


def write_zst(path, docs):
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = "".join(json.dumps({"text": d, "meta": {"redpajama_set_name": "x"}}) + "\n" for d in docs)
    path.write_bytes(zstandard.ZstdCompressor().compress(raw.encode()))


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.zst", "json-array", "json-lines", "parquet", "csv", "txt"])
def test_every_format_reads_every_document_in_order(tmp_path, kind):
    docs = documents(25)
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "c.jsonl", docs)
    elif kind == "jsonl.zst":
        path = tmp_path / "c.jsonl.zst"
        write_zst(path, docs)
    elif kind == "json-array":
        path = tmp_path / "c.json"
        path.write_text(json.dumps([{"text": d, "id": i} for i, d in enumerate(docs)], indent=1))
    elif kind == "json-lines":
        path = write_jsonl(tmp_path / "c.json", docs)
    elif kind == "parquet":
        path = tmp_path / "c.parquet"
        pq.write_table(pa.table({"id": list(range(25)), "text": docs}), path, row_group_size=10)
    elif kind == "csv":
        path = tmp_path / "c.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "text"])
            writer.writerows(enumerate(docs))
    else:
        path = tmp_path / "txt"
        for i, d in enumerate(docs):
            (path / f"{i:03d}.txt").parent.mkdir(exist_ok=True)
            (path / f"{i:03d}.txt").write_text(d)
    source = resolve_source(str(path))
    assert source.kind == "local" and source.column == "text"
    assert read_all(source) == docs
    if kind == "parquet":
        assert len(source.units) == 3  # one unit per row group


def test_slimpajama_tree_is_found_recursively(tmp_path):
    docs = documents(40)
    root = tmp_path / "SlimPajama-627B"
    write_zst(root / "train" / "chunk1" / "example_train_0.jsonl.zst", docs[:10])
    write_zst(root / "train" / "chunk1" / "example_train_1.jsonl.zst", docs[10:20])
    write_zst(root / "train" / "chunk2" / "example_train_0.jsonl.zst", docs[20:])
    (root / "README.md").write_text("not data")
    (root / ".gitattributes").write_text("*.zst filter=lfs")
    source = resolve_source(str(root / "train"))
    assert [f.split("SlimPajama-627B/")[1] for f in source.files] == [
        "train/chunk1/example_train_0.jsonl.zst",
        "train/chunk1/example_train_1.jsonl.zst",
        "train/chunk2/example_train_0.jsonl.zst",
    ]
    assert read_all(source) == docs
    # A folder may hold a README and the hub's metadata (an HF clone's dataset_infos.json); only the data files count.
    (root / "dataset_infos.json").write_text(json.dumps({"default": {"splits": {}}}))
    assert len(resolve_source(str(root)).files) == 3
    assert read_all(resolve_source(str(root))) == docs


def test_glob_and_progress_weights(tmp_path):
    docs = documents(30)
    write_jsonl(tmp_path / "a.jsonl", docs[:15])
    write_jsonl(tmp_path / "b.jsonl", docs[15:])
    write_jsonl(tmp_path / "skip.other", docs)
    source = resolve_source(str(tmp_path / "*.jsonl"))
    assert read_all(source) == docs
    assert source.total == (tmp_path / "a.jsonl").stat().st_size + (tmp_path / "b.jsonl").stat().st_size
    assert sum(u.weight for u in source.units) == source.total
    last = [done for unit in source.units for _, done in read_unit(source, unit, 4)][-1]
    assert last == source.units[-1].weight


def test_large_jsonl_is_split_into_byte_ranges_without_losing_a_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MIN_UNIT_BYTES", 97)  # a range boundary falls inside most lines
    monkeypatch.setattr(sources, "MAX_UNIT_BYTES", 97)
    docs = documents(50)
    source = resolve_source(str(write_jsonl(tmp_path / "big.jsonl", docs)))
    assert len(source.units) > 10
    assert read_all(source) == docs


def test_small_files_are_grouped_into_units(tmp_path, monkeypatch):
    docs = documents(20)
    for i, doc in enumerate(docs):
        (tmp_path / f"{i:02d}.txt").write_text(doc)
    assert len(resolve_source(str(tmp_path)).units) == 1
    monkeypatch.setattr(sources, "GROUP_FILES", 6)
    source = resolve_source(str(tmp_path))
    assert [len(u.files) for u in source.units] == [6, 6, 6, 2]
    assert read_all(source) == docs


def test_content_column_and_explicit_column(tmp_path):
    docs = documents(5)
    path = write_jsonl(tmp_path / "code.jsonl", docs, column="content")
    assert resolve_source(str(path)).column == "content"
    path = write_jsonl(tmp_path / "other.jsonl", docs, column="body")
    source = resolve_source(str(path), column="body")
    assert read_all(source) == docs


def test_no_text_column_lists_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", ["a"], column="body", lang="en")
    with pytest.raises(DataError, match=r"no text column in .*x.jsonl \(columns: body, lang\).*--column"):
        resolve_source(str(path))
    with pytest.raises(DataError, match=r"no column 'txt' in .*\(columns: body, lang\)"):
        resolve_source(str(path), column="txt")


def test_a_file_without_the_text_column_is_an_error_not_lost_documents(tmp_path):
    docs = documents(6)
    for i, kind in enumerate(["jsonl", "parquet", "csv"]):
        root = tmp_path / kind
        write_jsonl(root / "a.jsonl", docs[:3])  # the first file decides the column: text
        other = root / f"b.{kind}"
        if kind == "jsonl":
            write_jsonl(other, docs[3:], column="content")
        elif kind == "parquet":
            pq.write_table(pa.table({"content": docs[3:]}), other)
        else:
            with open(other, "w", newline="") as f:
                csv.writer(f).writerows([["content"], *[[d] for d in docs[3:]]])
        source = resolve_source(str(root))
        with pytest.raises(DataError, match=rf"no column 'text' in .*b.{kind} \(columns: content\): pick the one"):
            read_all(source)
    (tmp_path / "nulls.jsonl").write_text('{"text": "a"}\n{"text": null}\n{"text": ""}\n{"id": 7}\n')
    # empty documents, skipped and counted later: a record without the key past a file's first is one too (one odd
    # record hours into a corpus does not stop it)
    assert read_all(resolve_source(str(tmp_path / "nulls.jsonl"))) == ["a", None, "", None]
    (tmp_path / "lists.jsonl").write_text('{"text": "a"}\n["b"]\n')
    with pytest.raises(DataError, match=r"lists.jsonl holds list records, not objects"):
        read_all(resolve_source(str(tmp_path / "lists.jsonl")))


def test_a_truncated_zst_is_an_error_not_a_short_file(tmp_path):
    docs = documents(300)
    write_zst(tmp_path / "good" / "a.jsonl.zst", docs)
    whole = (tmp_path / "good" / "a.jsonl.zst").read_bytes()
    assert read_all(resolve_source(str(tmp_path / "good"))) == docs
    (tmp_path / "two").mkdir()  # two frames in one file read as one
    half = len(docs) // 2
    frames = [(json.dumps({"text": d}) + "\n").encode() for d in docs]
    compress = zstandard.ZstdCompressor().compress
    two = compress(b"".join(frames[:half])) + compress(b"".join(frames[half:]))
    (tmp_path / "two" / "a.jsonl.zst").write_bytes(two)
    assert read_all(resolve_source(str(tmp_path / "two"))) == docs
    for cut in (len(whole) // 3, len(whole) - 5):  # an interrupted download
        (tmp_path / "good" / "b.jsonl.zst").write_bytes(whole[:cut])
        with pytest.raises(DataError, match=r"b.jsonl.zst is truncated: its zstd data ends inside a frame: download"):
            read_all(resolve_source(str(tmp_path / "good")))


def test_empty_files_are_passed_over_and_only_empty_files_are_an_error(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl").write_text("\n\n")
    write_jsonl(tmp_path / "c" / "b.jsonl", ["x", "y"], column="content")
    source = resolve_source(str(tmp_path / "c"))
    assert source.column == "content" and read_all(source) == ["x", "y"]
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "a.jsonl").write_text("")
    (tmp_path / "e" / "b.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"no records in .*e' \(all 2 files\): the files are empty: give files"):
        resolve_source(str(tmp_path / "e"))
    with pytest.raises(DataError, match=r"no records in .*a.jsonl: the files are empty"):
        resolve_source(str(tmp_path / "e" / "a.jsonl"))


def test_what_is_not_json_lines_names_the_format(tmp_path):
    (tmp_path / "pretty.json").write_text(json.dumps({"data": [{"text": "a"}]}, indent=2))
    with pytest.raises(DataError, match=r"pretty.json: line 1 is not JSON .*; a .json file holds an array of objects"):
        resolve_source(str(tmp_path / "pretty.json"))
    (tmp_path / "u16.jsonl").write_bytes('{"text": "a"}\n'.encode("utf-16"))
    with pytest.raises(DataError, match=r"u16.jsonl: line 1 is not UTF-8 text: save the file as UTF-8"):
        resolve_source(str(tmp_path / "u16.jsonl"))
    (tmp_path / "bom.txt").write_bytes("\ufeffhello".encode())
    assert read_all(resolve_source(str(tmp_path / "bom.txt"))) == ["hello"]


def test_paths_that_match_nothing(tmp_path):
    with pytest.raises(DataError, match="no file or folder matches"):
        resolve_source(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="matches no files"):
        resolve_source(str(tmp_path / "*.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="matches no files"):
        local_files(str(tmp_path / "empty"))


def test_unreadable_files_are_one_data_error_naming_the_file(tmp_path):
    # what a SlimPajama clone holds before `git lfs pull`
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:ab12\nsize 123\n"
    (tmp_path / "lfs").mkdir()
    (tmp_path / "lfs" / "chunk_0.jsonl.zst").write_bytes(pointer)
    with pytest.raises(DataError, match=r"chunk_0.jsonl.zst is a git-lfs pointer, not data: run `git lfs pull`"):
        resolve_source(str(tmp_path / "lfs"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"cannot read .*a.parquet \(ArrowInvalid: .*\): check the file"):
        resolve_source(str(tmp_path / "bad"))
    (tmp_path / "zst").mkdir()
    (tmp_path / "zst" / "b.jsonl.zst").write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match=r"cannot read .*b.jsonl.zst \(ZstdError: "):
        resolve_source(str(tmp_path / "zst"))


def test_unknown_file_types(tmp_path):
    (tmp_path / "corpus.xml").write_text("<doc/>")
    with pytest.raises(DataError, match=r"no supported files .*\(found \.xml\).*\.jsonl\.zst"):
        resolve_source(str(tmp_path / "corpus.xml"))
    write_jsonl(tmp_path / "a.jsonl", ["x"])
    with pytest.raises(DataError, match=r"unknown file type: .*corpus.xml"):
        resolve_source(str(tmp_path / "*"))


def test_streaming_is_for_hub_datasets(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ["x"])
    with pytest.raises(DataError, match="--streaming is for hub datasets"):
        resolve_source(str(path), streaming=True)


def test_hub_id_or_local_path(tmp_path):
    assert not is_local("HuggingFaceFW/fineweb-edu")
    assert not is_local("wikitext")
    assert is_local("corpus/*.jsonl")
    assert is_local("/no/such/path/SlimPajama-627B/train")
    assert is_local("part.parquet")
    assert is_local(str(tmp_path))


def test_hub_dataset_from_the_offline_cache(hub_cache):
    source = resolve_source("tester/tiny", name="sample", split="train")
    assert (source.kind, source.column, source.total, source.weight_unit) == ("hub", "text", 30, "docs")
    assert read_all(source) == hub_cache
    assert source.manifest()["name"] == "sample"


def test_hub_dataset_without_a_name_says_which_configuration_it_read(hub_cache, capsys):
    # offline, datasets serves the cached configuration when none is named: flame says which, and records it
    source = resolve_source("tester/tiny", split="train")
    assert source.name == "sample" and source.manifest()["name"] == "sample"
    assert read_all(source) == hub_cache
    assert "dataset 'tester/tiny': no --name given, so its configuration 'sample' is used (--name sample)" in (
        " ".join(capsys.readouterr().err.split())
    )


def test_hub_dataset_streamed_from_the_offline_cache(hub_cache):
    source = resolve_source("tester/tiny", name="sample", split="train", streaming=True)
    assert source.streaming and source.units
    assert read_all(source) == hub_cache


def test_hub_dataset_not_cached_offline_says_how_to_get_it(hub_cache):
    with pytest.raises(
        DataError, match=r"'tester/absent' is not in the offline cache.*hf download --repo-type dataset"
    ):
        resolve_source("tester/absent", split="train")
    with pytest.raises(DataError, match=r"tester/tiny.*'other'.*check --name and --split"):
        resolve_source("tester/tiny", name="other", split="train")
    with pytest.raises(DataError, match=r"Unknown split \"test\".*check --name and --split"):
        resolve_source("tester/tiny", name="sample", split="test")
