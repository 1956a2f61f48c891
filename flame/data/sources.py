"""Where raw text comes from: a hub dataset (downloaded or streamed) or local files, cut into units of work.

    source = resolve_source("HuggingFaceFW/fineweb-edu", name="sample-10BT", split="train")
    source = resolve_source("/data/SlimPajama-627B/train")        # folder of chunk*/*.jsonl.zst
    for texts, done in read_unit(source, source.units[0], batch_size=1000): ...

A unit is what one tokenizer worker reads start to end: a group of small files, a byte range of a large `.jsonl`,
a parquet row group, a row range of a cached hub dataset, or one shard of a streamed one. Units are numbered in a
fixed order, so the prepared dataset's document order does not depend on which worker finishes first. Readers
yield batches of texts, never a whole file (except a `.json` array, which has to be parsed whole), so memory
stays bounded by the batch, not the corpus.
"""

import glob
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from flame import hub, ui
from flame.errors import DataError, FlameError, first_line

# Longest suffix first: `.jsonl.zst` must win over a plain `.zst` lookup.
EXTENSIONS = (".jsonl.zst", ".jsonl", ".json", ".parquet", ".txt", ".csv")
TEXT_COLUMNS = ("text", "content")
# Size of a unit of local files: a plain .jsonl larger than this is split into byte ranges so several workers
# share it, and small files (one .txt per document) are grouped up to it so a worker tokenizes full batches.
# Aim at several units per core (so the cores stay busy to the end), between these bounds.
MIN_UNIT_BYTES = 1 << 20
MAX_UNIT_BYTES = 64 << 20
GROUP_FILES = 2000
LFS_POINTER = b"version https://git-lfs"  # how a file that `git lfs pull` has not fetched begins
# A batch ends at batch_size documents or at this many characters, whichever comes first: a batch's Encodings
# take ~100 bytes a token, so this keeps a worker near 100 MB whatever the document lengths.
BATCH_CHARS = 1 << 20
# Files a folder of data holds that are not documents, passed over in a folder (a file named on its own is read):
# the hub's and `save_to_disk`'s metadata, flame's manifest, a tokenizer's and a model's files.
NOT_DOCUMENTS = frozenset({
    "dataset_infos.json", "dataset_info.json", "dataset_dict.json", "state.json", "manifest.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "config.json", "generation_config.json",
})  # fmt: skip
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Unit:
    """One piece of work for a tokenizer worker."""

    index: int
    """Position in the source: parts are concatenated in this order."""
    files: tuple[str, ...] = ()
    """Local files read start to end (several for grouped small files, one for a range)."""
    start: int = 0
    """Byte offset (large .jsonl), row group (parquet), row (hub) or shard index (streaming) where the unit starts."""
    stop: int | None = None
    """Where it stops (exclusive), same meaning as start; None for the end of the file."""
    weight: int = 1
    """Progress units this unit is worth: bytes for local files, rows for hub datasets."""


@dataclass
class Source:
    """A resolved source: what to read, which column holds the text, and the units of work."""

    kind: str
    """'local' or 'hub'."""
    dataset: str
    """What the user gave as --dataset."""
    column: str
    """The text column."""
    units: list[Unit]
    name: str | None = None
    split: str = "train"
    streaming: bool = False
    files: list[str] | None = None
    """Local files, sorted (None for a hub dataset)."""
    total: int | None = None
    """Sum of unit weights when known (a streamed dataset without metadata has none)."""
    weight_unit: str = "B"
    """What a unit weight counts: 'B' (bytes) or 'docs'."""
    hub: object = field(default=None, repr=False)
    """The datasets.Dataset or IterableDataset of a hub source."""

    def manifest(self) -> dict:
        return {
            "kind": self.kind,
            "dataset": self.dataset,
            "name": self.name,
            "split": self.split,
            "files": self.files,
            "column": self.column,
            "streaming": self.streaming,
        }


def file_type(path: str) -> str | None:
    """The supported extension a path ends with, or None."""
    lower = path.lower()
    return next((ext for ext in EXTENSIONS if lower.endswith(ext)), None)


def is_local(dataset: str) -> bool:
    """A local path or glob rather than a hub id: it exists, holds glob characters, or cannot be a hub id."""
    return bool(os.path.exists(dataset) or glob.has_magic(dataset) or not HUB_ID.match(dataset) or file_type(dataset))


def resolve_source(
    dataset: str, name: str | None = None, split: str = "train", column: str | None = None, streaming: bool = False
) -> Source:
    """Find the data behind --dataset (hub id, folder, file or glob) and the text column in it."""
    if is_local(dataset):
        if streaming:
            raise DataError(f"--streaming is for hub datasets, {dataset!r} is a local path", "leave --streaming out")
        return _resolve_local(dataset, name, split, column)
    return _resolve_hub(dataset, name, split, column, streaming)


def local_files(dataset: str) -> list[str]:
    """Every supported file under a folder (recursively), a single file, or a glob; sorted; errors name the fix."""
    path = os.path.expanduser(dataset)
    if os.path.isdir(path):
        found = sorted(
            str(p)
            for p in Path(path).rglob("*")
            if p.is_file() and not p.name.startswith(".") and p.name not in NOT_DOCUMENTS
        )
    elif glob.has_magic(path):
        found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    elif os.path.isfile(path):
        found = [path]
    else:
        raise DataError(
            f"no file or folder matches {dataset!r}",
            "give an existing folder, file or glob (quote globs: 'data/*.jsonl'), or a hub dataset id",
        )
    if not found:
        raise DataError(f"{dataset!r} matches no files", "check the path or glob")
    supported = [p for p in found if file_type(p)]
    if not supported:
        kinds = sorted({Path(p).suffix or Path(p).name for p in found})
        raise DataError(
            f"no supported files in {dataset!r} (found {', '.join(kinds[:8])})",
            f"give files ending in {', '.join(EXTENSIONS)}",
        )
    if os.path.isfile(path) or (glob.has_magic(path) and len(supported) < len(found)):
        # A file or glob the user named explicitly must be readable whole; a folder may hold READMEs and the like.
        unknown = [p for p in found if not file_type(p)]
        if unknown:
            raise DataError(f"unknown file type: {unknown[0]}", f"give files ending in {', '.join(EXTENSIONS)}")
    return supported


def _resolve_local(dataset: str, name: str | None, split: str, column: str | None) -> Source:
    files = local_files(dataset)
    # The columns of the first file that holds a record: an empty file says nothing (every file is checked for the
    # column as it is read).
    first, columns = next(((f, c) for f in files if (c := _first_columns(f))), (None, []))
    if first is None:
        what = files[0] if len(files) == 1 else f"{dataset!r} (all {len(files)} files)"
        raise DataError(f"no records in {what}: the files are empty", "give files that hold documents")
    column = column or _detect_column(columns, first)
    if file_type(first) != ".txt":
        _has_column(first, column, columns)
    return Source(
        kind="local",
        dataset=dataset,
        column=column,
        units=_local_units(files),
        name=name,
        split=split,
        files=[os.path.abspath(f) for f in files],
        total=sum(os.path.getsize(f) for f in files),
        weight_unit="B",
    )


def unit_bytes(total: int) -> int:
    return max(MIN_UNIT_BYTES, min(MAX_UNIT_BYTES, total // (4 * (os.cpu_count() or 1))))


def _local_units(files: list[str]) -> list[Unit]:
    target = unit_bytes(sum(os.path.getsize(f) for f in files))
    units: list[Unit] = []
    group: list[str] = []
    group_bytes = 0

    def close_group():
        nonlocal group, group_bytes
        if group:
            units.append(Unit(len(units), tuple(group), weight=group_bytes))
            group, group_bytes = [], 0

    for path in files:
        size = os.path.getsize(path)
        kind = file_type(path)
        if kind == ".jsonl" and size > target:
            close_group()
            for start in range(0, size, target):
                stop = min(start + target, size)
                units.append(Unit(len(units), (path,), start, stop, stop - start))
        elif kind == ".parquet":
            close_group()
            import pyarrow.parquet as pq

            with _reading(path):
                groups = pq.ParquetFile(path).num_row_groups
            for rg in range(groups):
                # Weight each row group by its share of the file, so progress stays in bytes.
                lo, hi = size * rg // groups, size * (rg + 1) // groups
                units.append(Unit(len(units), (path,), rg, rg + 1, hi - lo))
        else:
            if group and (group_bytes + size > target or len(group) >= GROUP_FILES):
                close_group()
            group.append(path)
            group_bytes += size
    close_group()
    return units


def _first_columns(path: str) -> list[str]:
    """Column names of a local file, from its first record (or its schema)."""
    with _reading(path):
        return _columns_of(path)


def _columns_of(path: str) -> list[str]:
    kind = file_type(path)
    if kind == ".txt":
        return ["text"]
    if kind == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(path).schema_arrow.names)
    if kind == ".csv":
        import pyarrow.csv as pcsv

        try:
            with pcsv.open_csv(path) as reader:
                return list(reader.schema.names)
        except Exception as e:
            raise DataError(f"cannot read {path} as CSV ({e})", "check the file") from None
    for record in _json_records(path, 0, None):
        if not isinstance(record, dict):
            raise DataError(f"{path} holds {type(record).__name__} records, not objects", "give one JSON object a line")
        return list(record)
    return []


def _has_column(path: str, column: str, columns: list[str]) -> None:
    """Every file of a source must hold the text column: documents without it would be lost without a word."""
    if column not in columns:
        raise DataError(
            f"no column {column!r} in {path} (columns: {', '.join(map(str, columns)) or 'none'})",
            "pick the one holding the text with --column, or give files that all hold it",
        )


def _detect_column(columns: list[str], where: str) -> str:
    for candidate in TEXT_COLUMNS:
        if candidate in columns:
            return candidate
    raise DataError(
        f"no text column in {where} (columns: {', '.join(map(str, columns)) or 'none'})",
        "name the one holding the text with --column",
    )


def _resolve_hub(dataset: str, name: str | None, split: str, column: str | None, streaming: bool) -> Source:
    import datasets

    hub.offline_unless_reachable()
    try:
        ds = datasets.load_dataset(dataset, name, split=split, streaming=streaming)
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or datasets.config.HF_HUB_OFFLINE
        where = "is not in the offline cache" if offline else "cannot be reached on the hub"
        raise DataError(
            f"dataset {dataset!r} {where} and is no local path ({type(e).__name__}: {first_line(e)})",
            "load it once with network (the HF cache then serves it offline), or download it with "
            f"`hf download --repo-type dataset {dataset} --local-dir DIR` and give DIR instead",
        ) from None
    except ValueError as e:
        # Unknown config or split: datasets lists the valid ones in the message.
        raise DataError(f"dataset {dataset!r}: {first_line(e)}", "check --name and --split") from None
    if streaming:
        columns = list(ds.column_names or [])
        if not columns:
            columns = list(next(iter(ds), {}))
        split_info = (ds.info.splits or {}).get(split) if ds.info else None
        total = split_info.num_examples if split_info and split_info.num_examples else None
        units = [Unit(i, start=i, stop=i + 1, weight=0) for i in range(ds.n_shards)]
    else:
        columns = list(ds.column_names)
        total = len(ds)
        # Enough units to keep every worker busy and the progress moving, not so many that scheduling dominates.
        rows = max(1000, min(100_000, total // (8 * (os.cpu_count() or 1)) or 1))
        units = [
            Unit(i, start=a, stop=min(a + rows, total), weight=min(a + rows, total) - a)
            for i, a in enumerate(range(0, total, rows))
        ]
    column = column or _detect_column(columns, dataset)
    if column not in columns:
        raise DataError(
            f"no column {column!r} in {dataset} (columns: {', '.join(columns) or 'none'})", "pick one with --column"
        )
    chosen = getattr(ds, "config_name", None) or (ds.info.config_name if ds.info else None)
    if name is None and chosen and chosen != "default":
        # Offline, datasets serves whichever configuration its cache holds when none is named (its log says so in
        # passing): the dataset's manifest names it, and so does this line.
        ui.warn(f"dataset {dataset!r}: no --name given, so its configuration {chosen!r} is used (--name {chosen})")
        name = chosen
    return Source(
        kind="hub",
        dataset=dataset,
        column=column,
        units=units,
        name=name,
        split=split,
        streaming=streaming,
        total=total,
        weight_unit="docs",
        hub=ds,
    )


@contextmanager
def _reading(path: str):
    """A local file that cannot be read (damaged, truncated, a git-lfs pointer) is one DataError naming it."""
    try:
        yield
    except FlameError:
        raise
    except Exception as e:
        with open(path, "rb") as f:
            lfs = f.read(len(LFS_POINTER)) == LFS_POINTER
        if lfs:
            raise DataError(f"{path} is a git-lfs pointer, not data", "run `git lfs pull` in that clone") from e
        raise DataError(
            f"cannot read {path} ({type(e).__name__}: {first_line(e)})", "check the file, or download it again"
        ) from e


def read_unit(source: Source, unit: Unit, batch_size: int) -> Iterator[tuple[list, int]]:
    """Yield (texts, progress done so far within the unit) batch by batch; texts may hold None for empty rows."""
    if source.kind == "hub":
        yield from _read_hub(source, unit, batch_size)
        return
    done = 0
    for path in unit.files:
        kind = file_type(path)
        if kind == ".txt":
            with open(path, encoding="utf-8-sig", errors="replace") as f:  # -sig: a byte-order mark is no text
                texts = [f.read()]
            done += os.path.getsize(path)
            yield texts, done
            continue
        base = done
        with _reading(path):
            for texts, pos in _read_file(path, kind, unit, source.column, batch_size):
                yield texts, base + pos
        done = base + (unit.weight if unit.stop is not None else os.path.getsize(path))


def _read_file(path: str, kind: str, unit: Unit, column: str, batch_size: int) -> Iterator[tuple[list, int]]:
    if kind == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        _has_column(path, column, list(pf.schema_arrow.names))
        groups = list(range(unit.start, unit.stop if unit.stop is not None else pf.num_row_groups))
        rows = sum(pf.metadata.row_group(g).num_rows for g in groups) or 1
        seen = 0
        for batch in pf.iter_batches(batch_size=batch_size, row_groups=groups, columns=[column]):
            texts = batch.column(0).to_pylist()
            seen += len(texts)
            yield texts, unit.weight * seen // rows
        return
    if kind == ".csv":
        import pyarrow as pa
        import pyarrow.csv as pcsv

        _has_column(path, column, _columns_of(path))
        size = os.path.getsize(path) or 1
        convert = pcsv.ConvertOptions(include_columns=[column], column_types={column: pa.string()})
        with open(path, "rb") as raw, pcsv.open_csv(raw, convert_options=convert) as reader:
            for batch in reader:
                yield batch.column(0).to_pylist(), min(raw.tell(), size)
        return
    texts: list = []
    chars = 0
    first = True
    for record, pos in _json_records_with_pos(path, unit.start, unit.stop):
        if not isinstance(record, dict):
            raise DataError(f"{path} holds {type(record).__name__} records, not objects", "give one JSON object a line")
        if first:  # a file (or its part) whose first record lacks the column holds another: its documents go nowhere
            _has_column(path, column, list(record))
            first = False
        text = record.get(column)  # further on, a record without it is an empty document, skipped and counted
        texts.append(text)
        chars += len(text) if isinstance(text, str) else 0
        # Long documents (books) make a batch of batch_size large; cap its size too.
        if len(texts) >= batch_size or chars >= BATCH_CHARS:
            yield texts, pos
            texts, chars = [], 0
    if texts:
        yield texts, pos


def _json_records(path: str, start: int, stop: int | None) -> Iterator:
    for record, _ in _json_records_with_pos(path, start, stop):
        yield record


def _json_records_with_pos(path: str, start: int, stop: int | None) -> Iterator[tuple[object, int]]:
    """Records of a .jsonl/.jsonl.zst/.json file with the bytes consumed (relative to start) after each."""
    kind = file_type(path)
    with open(path, "rb") as raw:
        if kind == ".json":
            head = raw.read(4096).lstrip()
            raw.seek(0)
            if head.startswith(b"["):
                # A JSON array has to be parsed whole; a .json of one object a line is read like .jsonl below.
                try:
                    records = json.load(raw)
                except ValueError as e:
                    raise DataError(f"cannot parse {path} as JSON ({e})", "check the file") from None
                size = os.path.getsize(path)
                for i, record in enumerate(records):
                    yield record, size * (i + 1) // len(records)
                return
        if kind == ".jsonl.zst":
            for n, line in enumerate(_zst_lines(raw, path), 1):
                if line.strip():
                    yield _parse_line(line, path, n), raw.tell()
            return
        if start:
            # The line that straddles `start` belongs to the previous range.
            raw.seek(start - 1)
            raw.readline()
        n = 0
        while stop is None or raw.tell() < stop:
            line = raw.readline()
            if not line:
                break
            n += 1
            if line.strip():
                yield _parse_line(line, path, n), raw.tell() - start


def _zst_lines(raw, path: str) -> Iterator[bytes]:
    """The lines of a zstd file, frame after frame; a file that ends inside a frame (an interrupted download) is a
    DataError, where zstandard's stream reader would stop there silently and lose the rest."""
    import zstandard

    # max_window_size: SlimPajama-style files are written with long-distance windows.
    decompressor = zstandard.ZstdDecompressor(max_window_size=2**31)
    frame, inside, pending = decompressor.decompressobj(), False, b""
    while chunk := raw.read(1 << 20):
        while chunk:
            lines = frame.decompress(chunk).split(b"\n")
            last = lines.pop()  # a line may run across chunks and frames
            if lines:
                lines[0], pending = pending + lines[0], last
                yield from lines
            else:
                pending += last
            inside, chunk = True, b""
            if frame.eof:  # the next frame, if any, starts in what this one left
                chunk, frame, inside = frame.unused_data, decompressor.decompressobj(), False
    if inside:
        raise DataError(f"{path} is truncated: its zstd data ends inside a frame", "download it again")
    if pending:
        yield pending


def _parse_line(line: bytes, path: str, n: int):
    try:
        return json.loads(line)
    except UnicodeDecodeError:
        raise DataError(f"{path}: line {n} is not UTF-8 text", "save the file as UTF-8") from None
    except ValueError as e:
        if file_type(path) == ".json":  # a pretty-printed object, most often
            raise DataError(
                f"{path}: line {n} is not JSON ({e}); a .json file holds an array of objects or one object a line",
                "write it as JSON Lines (one document object a line) or as one array of objects",
            ) from None
        raise DataError(f"{path}: line {n} is not JSON ({e})", "give one JSON object a line") from None


def _read_hub(source: Source, unit: Unit, batch_size: int) -> Iterator[tuple[list, int]]:
    ds = source.hub
    if source.streaming:
        shard = ds.shard(num_shards=ds.n_shards, index=unit.start).select_columns([source.column])
        texts: list = []
        for done, row in enumerate(shard, 1):
            texts.append(row[source.column])
            if len(texts) >= batch_size:
                yield texts, done
                texts = []
        if texts:
            yield texts, done
        return
    part = ds.select(range(unit.start, unit.stop)).select_columns([source.column])
    done = 0
    for batch in part.iter(batch_size=batch_size):
        texts = batch[source.column]
        done += len(texts)
        yield texts, done
