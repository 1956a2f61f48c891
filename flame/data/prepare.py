"""`flame data prepare`: raw text -> tokenized documents on disk (the format in flame/data/__init__.py).

    from flame.data.prepare import PrepareConfig, prepare
    result = prepare(PrepareConfig(dataset="HuggingFaceFW/fineweb-edu", name="sample-10BT", split="train"))

How it runs:
1. Resolve the source into numbered units (flame/data/sources.py) and load the tokenizer.
2. A pool of --num-proc workers tokenizes unit after unit in batches with the Rust tokenizer and streams each
   unit's documents into its own Arrow file, so memory is bounded by a batch per worker, never by the corpus.
   The BPE cache is cleared every few batches: it otherwise keeps every long word it has seen and grows with
   the corpus (huggingface/tokenizers#1539).
3. The unit files, memory-mapped in unit order, are split into train and a held-out validation set drawn with
   --seed, and written with `DatasetDict.save_to_disk`, next to the tokenizer and manifest.json.
Everything is written under a hidden `.NAME.incomplete-PID` folder beside the output and renamed into place at
the end; a crash or Ctrl-C leaves no folder that could be taken for a prepared dataset.
"""

import json
import math
import multiprocessing as mp
import os
import queue
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from itertools import chain
from pathlib import Path

from flame import __version__
from flame.checkpoint import RunLock
from flame.data import FORMAT, MANIFEST, TOKENIZER_DIR, TOKENS_COLUMN
from flame.data.sources import Source, Unit, read_unit, resolve_source
from flame.data.tokenizer import DEFAULT_TOKENIZER, load_tokenizer, replace_dir, rust_tokenizer
from flame.errors import ConfigError, DataError, FlameError, check_output_dir, disk_full

# Clear the BPE cache this often (batches per worker): often enough to bound it, rarely enough to keep its speed-up.
CLEAR_CACHE_EVERY = 8
# Default held-out size when --val-docs is not given: 1% of the documents, at most this many.
DEFAULT_VAL_DOCS = 1000


@dataclass
class PrepareConfig:
    """Options of `flame data prepare`, one field each."""

    dataset: str
    """Hub dataset id (e.g. HuggingFaceFW/fineweb-edu) or a local folder, file or glob of .jsonl, .jsonl.zst,
    .json, .parquet, .txt, .csv files (e.g. a git-lfs clone of SlimPajama-627B/train)."""
    name: str | None = None
    """Hub dataset config name (e.g. sample-10BT)."""
    split: str = "train"
    """Hub dataset split to read; for local files, only a label in the default output path."""
    context_length: int = 2048
    """Default training context, recorded in the manifest; packing happens at training time, so any context can
    train on the same prepared dataset."""
    output: str | None = None
    """Where to write; default data/{dataset}/{name}/{split}."""
    tokenizer: str = DEFAULT_TOKENIZER
    """Hub id or local dir of the tokenizer (`flame data tokenizer` builds one offline)."""
    column: str | None = None
    """Text column; found automatically (text, content) when not given."""
    streaming: bool = False
    """Stream a hub dataset instead of downloading it whole first."""
    val_docs: float | None = None
    """Held-out validation documents: a count (1000) or a fraction below 1 (0.01); 0 for none.
    Default: 1% of the documents, at most 1000."""
    num_proc: int | None = None
    """Tokenizer processes; default all cores."""
    overwrite: bool = False
    """Replace an existing output."""
    seed: int = 42
    """Seed of the validation draw."""
    batch_size: int = 1000
    """Documents per tokenizer call."""


@dataclass
class Progress:
    """Running totals handed to the progress callback."""

    docs: int = 0
    tokens: int = 0
    done: int = 0
    """Units of work done (bytes for local files, documents for hub datasets)."""
    total: int | None = None
    unit: str = "B"
    stage: str = "tokenizing"


@dataclass
class PrepareResult:
    output: str
    manifest: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """What the user should know (leftovers of interrupted runs removed or found), one line each."""


def leftovers(output: str) -> tuple[list[str], list[str]]:
    """Temp folders of earlier runs of this output that were killed (SIGKILL, a node lost) before cleaning up:
    (removed, kept). A run holds its temp folder's lock (checkpoint.RunLock) while it writes: a folder whose lock
    can be taken is a dead run's, and is removed; one whose lock is held, or on a file system that cannot lock, is
    kept and named."""
    import glob

    parent, name = os.path.dirname(output), os.path.basename(output)
    removed, kept = [], []
    for path in sorted(glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.incomplete-*"))):
        probe = RunLock(path)
        probe.acquire()
        if probe.held:
            shutil.rmtree(path, ignore_errors=True)
            probe.release()
            removed.append(path)
        else:
            kept.append(path)
    return removed, kept


def default_output(config: PrepareConfig) -> str:
    """data/{dataset}/{name}/{split} as in the seed; a local path contributes its last folder or file stem."""
    dataset = config.dataset
    if os.path.exists(dataset) or any(c in dataset for c in "*?[") or dataset.startswith((".", "/", "~")):
        parts = [p for p in Path(os.path.abspath(os.path.expanduser(dataset))).parts if not any(c in p for c in "*?[")]
        stem = parts[-1].split(".")[0]
        # `SlimPajama-627B/train` says more than `train`.
        if stem in ("train", "validation", "test", "data") and len(parts) > 2:
            stem = f"{parts[-2]}-{stem}"
        dataset = stem
    return os.path.join("data", dataset, config.name or "default", config.split)


def validate(config: PrepareConfig) -> list[str]:
    """Every problem with the options, each naming the option to fix."""
    problems = []
    if config.context_length < 1:
        problems.append(f"--context_length must be positive, got {config.context_length}")
    if config.num_proc is not None and config.num_proc < 1:
        problems.append(f"--num-proc must be at least 1, got {config.num_proc}")
    if config.val_docs is not None and (
        not math.isfinite(config.val_docs) or config.val_docs < 0 or (config.val_docs >= 1 and config.val_docs % 1)
    ):
        problems.append(f"--val-docs takes a count or a fraction below 1, got {config.val_docs}")
    if config.batch_size < 1:
        problems.append(f"batch_size must be at least 1, got {config.batch_size}")
    return problems


def val_count(val_docs: float | None, documents: int) -> int:
    """How many documents to hold out (pure: --val-docs and the corpus size decide)."""
    if val_docs is None:
        return min(DEFAULT_VAL_DOCS, documents // 100)
    if val_docs < 1:
        return round(val_docs * documents)
    return int(val_docs)


def val_indices(documents: int, count: int, seed: int) -> list[int]:
    """The held-out document indices, sorted; the same for the same corpus, count and seed."""
    return sorted(random.Random(seed).sample(range(documents), count))


def prepare(config: PrepareConfig, on_progress=None) -> PrepareResult:
    """Tokenize config.dataset into a prepared dataset at config.output (or the default path); see module doc."""
    problems = validate(config)
    if problems:
        raise ConfigError("; ".join(problems))
    # realpath: an output that is a link to a bigger disk is written there (the link stays), not replaced by a folder
    output = os.path.realpath(os.path.expanduser(config.output or default_output(config)))
    check_output_dir(
        output, [config.dataset, config.tokenizer], overwrite=config.overwrite, replaces=(MANIFEST,),
        what="a prepared dataset", never=("config.json", "checkpoints"),
    )  # fmt: skip
    tokenizer = load_tokenizer(config.tokenizer)
    tokenizer_name = os.path.abspath(config.tokenizer) if os.path.isdir(config.tokenizer) else config.tokenizer
    source = resolve_source(config.dataset, config.name, config.split, config.column, config.streaming)
    num_proc = max(1, min(config.num_proc or os.cpu_count() or 1, len(source.units)))
    state = Progress(total=source.total, unit=source.weight_unit)

    removed, kept = leftovers(output)
    notes = [f"removed {p}, left by an interrupted run of this output" for p in removed]
    notes += [
        f"{p} is left by another run of this output (another machine's, or still running): remove it if none is"
        for p in kept
    ]
    tmp = os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.incomplete-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "parts"))
    lock = RunLock(tmp)  # held while this run writes tmp: a later run tells a killed run's leftover by it
    lock.acquire()
    try:
        started = time.time()
        parts = _tokenize(source, tokenizer, num_proc, config.batch_size, tmp, state, on_progress)
        tokenize_s = time.time() - started
        if not sum(p["documents"] for p in parts):
            raise DataError(
                f"no documents in {config.dataset}: every text is empty",
                "give files that hold text (for JSON, Parquet or CSV: name the text column with --column)",
            )
        state.stage = "writing"
        if on_progress:
            on_progress(state)
        splits = _write_splits(parts, config, os.path.join(tmp, "dataset"))
        skipped = sum(p["skipped"] for p in parts)
        tokenizer.save_pretrained(os.path.join(tmp, "dataset", TOKENIZER_DIR))
        manifest = {
            "format": FORMAT,
            "source": source.manifest(),
            "tokenizer": {
                "name_or_path": tokenizer_name,
                "vocab_size": len(tokenizer),
                "eos_token_id": tokenizer.eos_token_id,
                "bos_token_id": tokenizer.bos_token_id,
            },
            "splits": splits,
            "context_length": config.context_length,
            "settings": {
                **{k: v for k, v in asdict(config).items() if k not in ("dataset", "name", "split", "output")},
                "num_proc": num_proc,
                "val_docs_resolved": splits.get("validation", {}).get("documents", 0),
                "skipped_empty": skipped,
                "tokenize_seconds": round(tokenize_s, 3),
            },
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "flame_version": __version__,
        }
        # The manifest goes in last: a folder with one is complete.
        with open(os.path.join(tmp, "dataset", MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
        replace_dir(os.path.join(tmp, "dataset"), output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        lock.release()
    return PrepareResult(output=output, manifest=manifest, notes=notes)


def _tokenize(source: Source, tokenizer, num_proc, batch_size, tmp, state: Progress, on_progress) -> list[dict]:
    """Run every unit through a worker; return per-unit results (path, docs, tokens, skipped) in unit order."""
    eos = tokenizer.eos_token_id
    init = (source, tokenizer._tokenizer.to_str(), bool(getattr(tokenizer, "split_special_tokens", False)), eos)
    results: dict[int, dict] = {}

    def absorb(message):
        kind, payload = message
        if kind == "progress":
            docs, tokens, done = payload
            state.docs += docs
            state.tokens += tokens
            state.done += done
        if on_progress:
            on_progress(state)

    if num_proc == 1:
        updates = queue.SimpleQueue()
        _init_worker(*init, updates)
        for unit in source.units:
            result = _tokenize_unit(unit, batch_size, tmp)
            while not updates.empty():
                absorb(updates.get())
            results[unit.index] = _raise_if_error(result)
        return [results[u.index] for u in source.units]

    # fork shares the resolved source (a hub Dataset is memory-mapped) without pickling; elsewhere spawn.
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    # Each worker is one process; the Rust tokenizer's own thread pool on top would oversubscribe the cores.
    # Workers inherit the setting when they start; the caller's environment is restored afterwards.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    updates = ctx.Queue()
    try:
        pool = ctx.Pool(num_proc, initializer=_init_worker, initargs=(*init, updates))
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    try:
        pending = {u.index: pool.apply_async(_tokenize_unit, (u, batch_size, tmp)) for u in source.units}
        while pending:
            try:
                absorb(updates.get(timeout=0.2))
            except queue.Empty:
                pass
            for index in [i for i, r in pending.items() if r.ready()]:
                results[index] = _raise_if_error(pending.pop(index).get())
        while True:  # the last progress messages of finished units
            try:
                absorb(updates.get(timeout=0.05))
            except queue.Empty:
                break
        pool.close()
    finally:
        pool.terminate()
        pool.join()
    return [results[u.index] for u in source.units]


def _raise_if_error(result: dict) -> dict:
    if "error" in result:
        kind, message, fix = result["error"]
        raise {"DataError": DataError, "ConfigError": ConfigError}.get(kind, DataError)(message, fix)
    return result


_WORKER: dict = {}


def _init_worker(source, tokenizer_json, split_special_tokens, eos, updates):
    # An initializer that raises makes multiprocessing.Pool start a new worker forever; keep the error for the
    # first task to report instead.
    try:
        rust = rust_tokenizer(tokenizer_json, split_special_tokens)
    except Exception as e:
        _WORKER.update(error=("DataError", f"tokenizer failed to load in a worker ({type(e).__name__}: {e})", None))
        return
    _WORKER.update(source=source, tokenizer=rust, eos=eos, updates=updates)


def _tokenize_unit(unit: Unit, batch_size: int, tmp: str) -> dict:
    """Tokenize one unit into tmp/parts/part-NNNNNN.arrow; counts, or the error as data (FlameError kwargs do not
    survive pickling back from a pool worker)."""
    import pyarrow as pa

    if "error" in _WORKER:
        return {"error": _WORKER["error"]}
    source, rust, eos, updates = (_WORKER[k] for k in ("source", "tokenizer", "eos", "updates"))
    path = os.path.join(tmp, "parts", f"part-{unit.index:06d}.arrow")
    schema = pa.schema([(TOKENS_COLUMN, pa.list_(pa.int32()))])
    docs = tokens = skipped = reported = 0
    try:
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for n, (texts, done) in enumerate(read_unit(source, unit, batch_size), 1):
                kept = [t for t in texts if isinstance(t, str) and t]
                if len(kept) < len(texts):
                    bad = next((t for t in texts if t is not None and not isinstance(t, str)), None)
                    if bad is not None:
                        where = ", ".join(unit.files[:1]) or source.dataset
                        raise DataError(
                            f"column {source.column!r} of {where} holds {type(bad).__name__}, not text",
                            "pick the text column with --column",
                        )
                    skipped += len(texts) - len(kept)
                encodings = rust.encode_batch_fast(kept, add_special_tokens=True)
                if n % CLEAR_CACHE_EVERY == 0:
                    _clear_cache(rust)
                column = _to_arrow([e.ids for e in encodings], eos)
                batch_tokens = len(column.values)
                writer.write_batch(pa.record_batch([column], schema=schema))
                docs += len(column)
                tokens += batch_tokens
                if not source.streaming:
                    done = min(done, unit.weight)  # a .jsonl range's last line may run past its end
                updates.put(("progress", (len(column), batch_tokens, done - reported)))
                reported = done
    except FlameError as e:
        return {"error": (type(e).__name__, e.message, e.fix)}
    except Exception as e:  # a corrupt file, a missing column deep in a corpus: name the unit
        if full := disk_full(e, os.path.dirname(tmp)):  # writing the tokens, not reading the input, failed
            return {"error": ("DataError", full.message, full.fix)}
        where = ", ".join(unit.files[:2]) or f"{source.dataset} part {unit.index}"
        return {"error": ("DataError", f"cannot read {where} ({type(e).__name__}: {e})", None)}
    if not source.streaming and unit.weight > reported:
        updates.put(("progress", (0, 0, unit.weight - reported)))
    _clear_cache(rust)
    return {"path": path, "documents": docs, "tokens": tokens, "skipped": skipped}


def _to_arrow(ids: list[list[int]], eos: int):
    """Token lists -> Arrow list<int32> with EOS appended to each, via one flat numpy buffer (several times faster
    than pa.array on nested Python lists, which was a third of a worker's time)."""
    import numpy as np
    import pyarrow as pa

    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.full(int(offsets[-1]), eos, dtype=np.int32)
    # Every position but the last of each document gets the document's tokens; the last keeps the EOS.
    mask = np.ones(len(flat), dtype=bool)
    mask[offsets[1:] - 1] = False
    flat[mask] = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(mask.sum()))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def _clear_cache(rust) -> None:
    clear = getattr(rust.model, "_clear_cache", None)
    if clear:
        clear()


def _write_splits(parts: list[dict], config: PrepareConfig, out: str) -> dict:
    """Stream the unit files in order into train and the held-out draw, in `save_to_disk` layout; return the
    manifest's splits.

    Parts are read batch by batch with ordinary reads (not memory-mapped), so resident memory stays at one batch
    however large the corpus; this is also why flame does not go through `Dataset.save_to_disk` here.
    """
    import numpy as np
    import pyarrow as pa

    documents = sum(p["documents"] for p in parts)
    count = val_count(config.val_docs, documents)
    if count >= documents:
        raise ConfigError(
            f"--val-docs {config.val_docs} holds out {count} of {documents} documents, leaving none to train on",
            "lower --val-docs",
        )
    held = val_indices(documents, count, config.seed)
    writers = {"train": _SplitWriter(os.path.join(out, "train"))}
    if count:
        writers["validation"] = _SplitWriter(os.path.join(out, "validation"))
    offset = cursor = 0
    for part in parts:
        if not part["documents"]:
            continue
        with pa.OSFile(part["path"]) as f, pa.ipc.open_stream(f) as reader:
            for batch in reader:
                n = batch.num_rows
                first = cursor
                while cursor < count and held[cursor] < offset + n:
                    cursor += 1
                if cursor > first:
                    local = np.asarray(held[first:cursor]) - offset
                    keep = np.ones(n, dtype=bool)
                    keep[local] = False
                    writers["validation"].write(batch.take(pa.array(local)))
                    batch = batch.filter(pa.array(keep))
                writers["train"].write(batch)
                offset += n
        os.remove(part["path"])  # halves the peak disk use of a large corpus
    for writer in writers.values():
        writer.close()
    with open(os.path.join(out, "dataset_dict.json"), "w") as f:
        json.dump({"splits": list(writers)}, f)
    return {split: {"documents": w.documents, "tokens": w.tokens} for split, w in writers.items()}


class _SplitWriter:
    """One split of a `DatasetDict.save_to_disk` folder: data-NNNNN-of-NNNNN.arrow shards, state.json,
    dataset_info.json, so `datasets.load_from_disk` opens it."""

    SHARD_BYTES = 500 << 20  # datasets' default max_shard_size

    def __init__(self, path: str):
        import datasets

        self.path = path
        self.features = datasets.Features({TOKENS_COLUMN: datasets.List(datasets.Value("int32"))})
        self.schema = self.features.arrow_schema
        self.files: list[str] = []
        self.documents = self.tokens = 0
        self._writer = self._sink = None
        self._bytes = 0
        os.makedirs(path)

    def write(self, batch) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        if not batch.num_rows:
            return
        if self._writer is None or self._bytes >= self.SHARD_BYTES:
            self._close_shard()
            self.files.append(os.path.join(self.path, f"shard-{len(self.files):05d}.tmp"))
            self._sink = pa.OSFile(self.files[-1], "wb")
            self._writer = pa.ipc.new_stream(self._sink, self.schema)
            self._bytes = 0
        self._writer.write_batch(pa.RecordBatch.from_arrays(batch.columns, schema=self.schema))
        self._bytes += batch.nbytes
        self.documents += batch.num_rows
        self.tokens += pc.sum(pc.list_value_length(batch.column(0))).as_py() or 0

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None

    def close(self) -> None:
        import datasets
        from datasets.fingerprint import generate_random_fingerprint

        self._close_shard()
        names = [f"data-{i:05d}-of-{len(self.files):05d}.arrow" for i in range(len(self.files))]
        for tmp, name in zip(self.files, names):
            os.rename(tmp, os.path.join(self.path, name))
        state = {
            "_data_files": [{"filename": name} for name in names],
            "_fingerprint": generate_random_fingerprint(),
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        with open(os.path.join(self.path, "state.json"), "w") as f:
            json.dump(state, f, indent=2)
        datasets.DatasetInfo(features=self.features).write_to_directory(self.path, pretty_print=True)
