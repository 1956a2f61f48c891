"""Training batches from prepared datasets: documents packed into --context windows, no padding.

    loader = PackedLoader(open_sources("data/x/train"), context=2048, batch=8, seed=42, rank=0, world=1)
    batch = loader.next_batch()          # {"input_ids": LongTensor[batch, context]} (+ "cu_seqlens" with varlen)
    state = loader.state_dict()          # exact position; loader.load_state_dict(state) continues from it

How the stream is defined (pure functions of the seed, so a resumed run sees exactly the same batches):
- Each source's epoch e is its documents in the order `permutation(seed, e)`, concatenated (each document already
  ends with EOS), cut into windows of `context` tokens; the last partial window of an epoch is dropped (< context
  tokens per epoch). Documents cross window boundaries; with --varlen the boundaries are passed as cu_seqlens.
- With several sources, window g of the global stream comes from the source that smooth weighted round-robin picks
  (deterministic, exact proportions at every prefix); each source keeps its own window counter.
- Micro-step k takes global windows [k*B*W, (k+1)*B*W) for batch B and W processes; rank r gets the r-th block of
  B. The position is the global window count, independent of W, so a run resumed on a different number of
  processes neither repeats nor skips a window.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch

from flame.data import MANIFEST, TOKENIZER_DIR, TOKENS_COLUMN
from flame.errors import DataError, first_line, read_json_object


@dataclass
class Source:
    """One prepared dataset split, with its document lengths (the packing needs nothing else up front)."""

    path: str
    weight: float
    column: object  # pyarrow ChunkedArray of token lists (memory-mapped)
    lengths: np.ndarray
    manifest: dict = field(default_factory=dict)
    _chunk_starts: np.ndarray | None = field(default=None, repr=False)
    _chunks: dict = field(default_factory=dict, repr=False)  # chunk index -> (token values, offsets) as numpy

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i: a zero-copy view of the memory-mapped file, whatever the dataset's size.
        (pyarrow's ChunkedArray.take costs time in proportion to the whole column: 0.4 s per batch of 8 x 2048 at 64M
        tokens, measured.)"""
        if self._chunk_starts is None:
            self._chunk_starts = np.cumsum([0] + [len(c) for c in self.column.chunks])
        c = int(np.searchsorted(self._chunk_starts, i, side="right")) - 1
        if c not in self._chunks:
            chunk = self.column.chunk(c)  # offsets index into values, slicing of the chunk included
            self._chunks[c] = (chunk.values.to_numpy(zero_copy_only=False), chunk.offsets.to_numpy())
        values, offsets = self._chunks[c]
        j = i - int(self._chunk_starts[c])
        return values[offsets[j] : offsets[j + 1]]


def open_source(path: str, weight: float = 1.0, split: str = "train") -> Source:
    """Open DIR (a `flame data prepare` output) without reading its tokens into memory."""

    import datasets

    root = Path(path)
    if not root.is_dir():
        raise DataError(f"dataset {path} does not exist", "prepare it with `flame data prepare` or fix --cache")
    try:
        loaded = datasets.load_from_disk(str(root))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{path} is not a prepared dataset ({e})", "give the output dir of `flame data prepare`") from e
    except OSError as e:  # a truncated or damaged .arrow file
        raise DataError(f"{path} is damaged ({first_line(e)})", "prepare it again with `flame data prepare`") from e
    if isinstance(loaded, datasets.DatasetDict) and split not in loaded:
        raise DataError(f"{path} has no '{split}' split", "prepare it again with `flame data prepare`")
    ds = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    if TOKENS_COLUMN not in ds.column_names:
        raise DataError(f"{path} has no '{TOKENS_COLUMN}' column", "give the output dir of `flame data prepare`")
    if len(ds) == 0:
        raise DataError(f"{path} has no documents", "prepare it from a non-empty corpus")
    manifest_path = root / MANIFEST
    manifest = {}
    if manifest_path.is_file():
        manifest = read_json_object(
            manifest_path,
            DataError,
            "prepare the dataset again",
            invalid="is damaged",
            not_object="is not a manifest (a JSON object)",
        )
    column = ds.data.column(TOKENS_COLUMN)
    # int32: a document's length always fits, and every training process holds one entry per document
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    return Source(str(root), weight, column, lengths, manifest)


def open_sources(sources: list[tuple[str, float]]) -> list[Source]:
    return [open_source(path, weight) for path, weight in sources]


def tokenizer_dir(source: Source) -> Path | None:
    path = Path(source.path) / TOKENIZER_DIR
    return path if path.is_dir() else None


def vocab_size(source: Source) -> int | None:
    """The tokenizer's vocab size from the manifest, or None when the manifest does not say."""
    return (source.manifest.get("tokenizer") or {}).get("vocab_size")


#: The epoch index keeps the running token count only at the end of every BLOCK-th document; a window's documents
#: are found in it by bisection and their own ends summed from their lengths (a block or two per window).
BLOCK = 256


class Windows:
    """The epoch-by-epoch window stream of one source; window i is a pure function of (seed, i)."""

    def __init__(self, source: Source, context: int, seed: int):
        self.source, self.context, self.seed = source, context, seed
        self.per_epoch = source.tokens // context
        if self.per_epoch == 0:
            raise DataError(
                f"{source.path} has {source.tokens} tokens, fewer than one --context window of {context}",
                "use a smaller --context or more data",
            )
        self._epoch = -1

    def _order(self, epoch: int) -> None:
        if epoch != self._epoch:
            # Seeded by (seed, epoch): any process computes the same order without talking to the others. Shuffling
            # an int32 range draws the same permutation as Generator.permutation(n) (its int64 range), in half the
            # memory. Per document, in every process: a length and an order entry, 4 + 4 bytes (a 600M-document
            # corpus: 4.8 GB), plus 8 bytes per BLOCK documents for the running token count.
            n = len(self.source.lengths)
            self.order = self.block_ends = None  # the last epoch's, freed before the next is built
            self.order = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
            np.random.default_rng([self.seed, epoch]).shuffle(self.order)
            sums = np.empty(-(-n // BLOCK), dtype=np.int64)
            step = BLOCK * 4096  # a bounded slice of the order at a time, not a second array of n
            for lo in range(0, n, step):  # step is whole blocks, so each slice's block sums start at lo // BLOCK
                part = self.source.lengths[self.order[lo : lo + step]].astype(np.int64)
                part_sums = np.add.reduceat(part, range(0, len(part), BLOCK))
                sums[lo // BLOCK : lo // BLOCK + len(part_sums)] = part_sums
            self.block_ends = np.cumsum(sums)
            self._epoch = epoch

    def _span(self, start: int, end: int) -> tuple[int, np.ndarray]:
        """The documents holding tokens [start, end) of the epoch: the position of the first in the epoch's order,
        and the running token count at the end of each of them."""
        b = int(np.searchsorted(self.block_ends, start, side="right"))
        lo = hi = b * BLOCK
        base = int(self.block_ends[b - 1]) if b > 0 else 0  # the running count before document lo
        parts = []
        while not parts or base < end:  # a window may run into the next blocks (documents shorter than it)
            part = base + np.cumsum(self.source.lengths[self.order[hi : hi + BLOCK]].astype(np.int64))
            parts.append(part)
            base, hi = int(part[-1]), hi + len(part)
        ends = np.concatenate(parts)
        first = int(np.searchsorted(ends, start, side="right"))
        last = int(np.searchsorted(ends, end - 1, side="right"))
        return lo + first, ends[first : last + 1]

    def window(self, i: int) -> tuple[np.ndarray, list[int]]:
        """Tokens of window i and the offsets inside it where a document starts (besides 0)."""
        epoch, w = divmod(i, self.per_epoch)
        self._order(epoch)
        start, end = w * self.context, (w + 1) * self.context
        first, ends = self._span(start, end)
        last = first + len(ends) - 1
        # Only the window's own tokens are read: the end of its first document, whole ones, the start of its last.
        skip = start - (int(ends[0]) - int(self.source.lengths[self.order[first]]))
        pieces, need = [], self.context
        for d in self.order[first : last + 1]:
            piece = self.source.document(int(d))[skip : skip + need]
            pieces.append(piece)
            need, skip = need - len(piece), 0
        tokens = np.concatenate(pieces)
        starts = [int(e) - start for e in ends[:-1] if start < e < end]
        return tokens, starts


def collate(rows: list[np.ndarray], starts: list[list[int]], context: int, varlen: bool) -> dict[str, torch.Tensor]:
    """Windows (and where documents start inside them) as a model batch."""
    input_ids = torch.from_numpy(np.stack(rows).astype(np.int64))
    if not varlen:
        return {"input_ids": input_ids}
    # FLA's varlen path takes one flattened row plus cumulative sequence lengths over it.
    cu = [0]
    for b, doc_starts in enumerate(starts):
        cu.extend(b * context + o for o in doc_starts)
        cu.append((b + 1) * context)
    return {"input_ids": input_ids.reshape(1, -1), "cu_seqlens": torch.tensor(cu, dtype=torch.int32)}


class Validation:
    """The fixed validation windows of one process: the first `n` windows of the split (in the --seed order, epoch
    0), n = min(eval_windows, what the split holds) rounded down to a multiple of the process count, process r
    taking windows r, r + world, ... so every process runs the same number of forwards (FSDP needs that)."""

    def __init__(self, source: Source, *, context: int, windows: int, seed: int, rank: int = 0, world: int = 1):
        self.total = self.count(source, context=context, windows=windows, world=world)
        stream = Windows(source, context, seed)
        taken = [stream.window(i) for i in range(rank, self.total, world)]
        self.rows = [t for t, _ in taken]
        self.starts = [s for _, s in taken]
        self.context = context

    @staticmethod
    def count(source: Source, *, context: int, windows: int, world: int = 1) -> int:
        """How many windows an evaluation takes, all processes together, without reading them; refuses a split
        that holds less than one window per process."""
        if source.tokens < context * world:
            raise DataError(
                f"the validation split of {source.path} has {source.tokens} tokens, fewer than one --context window "
                f"of {context} per process",
                "prepare the data with a larger --val-docs, or lower --context, or drop --eval",
            )
        return min(windows, source.tokens // context) // world * world

    def batches(self, batch: int, varlen: bool):
        for i in range(0, len(self.rows), batch):
            yield collate(self.rows[i : i + batch], self.starts[i : i + batch], self.context, varlen)


def open_validation(path: str) -> Source:
    """The validation split of a prepared dataset, with the fix when it has none."""
    try:
        return open_source(path, split="validation")
    except DataError as e:
        if "no 'validation' split" not in e.message:
            raise
        raise DataError(
            f"{path} has no validation split for --eval",
            "prepare the data with --val-docs > 0, or drop --eval",
        ) from e


class PackedLoader:
    """Batches of packed windows for one process. `state_dict` is the exact position (see the module docstring)."""

    def __init__(
        self,
        sources: list[Source],
        *,
        context: int,
        batch: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        varlen: bool = False,
    ):
        self.windows = [Windows(s, context, seed) for s in sources]
        total = sum(s.weight for s in sources)
        self.weights = [s.weight / total for s in sources]
        self.context, self.batch, self.rank, self.world, self.varlen = context, batch, rank, world, varlen
        self.position = 0  # global windows consumed, all processes together
        self.taken = [0] * len(sources)  # windows consumed from each source
        self.credit = [0.0] * len(sources)  # smooth weighted round-robin state

    def _pick(self) -> int:
        """Smooth weighted round-robin (nginx): deterministic, and every prefix is as close to the weights as can be."""
        for i, w in enumerate(self.weights):
            self.credit[i] += w
        best = max(range(len(self.credit)), key=lambda i: self.credit[i])
        self.credit[best] -= 1.0
        return best

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next micro-batch of this process; advances the position by batch x world windows."""
        rows, starts = [], []
        mine = range(self.rank * self.batch, (self.rank + 1) * self.batch)
        for j in range(self.batch * self.world):
            s = self._pick()
            if j in mine:
                tokens, doc_starts = self.windows[s].window(self.taken[s])
                rows.append(tokens)
                starts.append(doc_starts)
            self.taken[s] += 1
        self.position += self.batch * self.world
        return collate(rows, starts, self.context, self.varlen)

    def epoch(self) -> float:
        """Passes over the data so far (of the first source, the one --epochs counts)."""
        return self.taken[0] / self.windows[0].per_epoch

    def state_dict(self) -> dict:
        return {"position": self.position, "taken": list(self.taken), "credit": list(self.credit)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["taken"]) != len(self.windows):
            raise DataError(
                f"the checkpoint was trained on {len(state['taken'])} datasets, this run has {len(self.windows)}",
                "give the same --cache as the run that saved it",
            )
        self.position, self.taken, self.credit = state["position"], list(state["taken"]), list(state["credit"])


def windows_per_epoch(sources: list[Source], context: int) -> int:
    """Windows in one pass over the first source (the reference for --epochs)."""
    return sources[0].tokens // context
