"""Training batches per second from a prepared dataset: flame's loader against reading windows with pyarrow's take.

    python benchmarks/loader.py                       # 16M, 64M and 256M tokens, batch 8 x 2048
    python benchmarks/loader.py --tokens 4M,16M --batches 20
    python benchmarks/loader.py --index-docs 100M     # only the per-epoch document index, 100M documents

Writes a prepared dataset of random documents (100-1,500 tokens each, 1,000 per Arrow record batch, as
`flame data prepare` writes them), opens it as `flame train` does (memory-mapped) and times `next_batch()` of
flame.data.loader.PackedLoader against the same windows read the straightforward way, `column.take(documents)`
(what flame did until 2026-11-29), side by side in one process. A batch must cost the host nothing next to a GPU
step (about 130 ms for GLA-340M at batch 8 on an H200) whatever the dataset's size.

--index-docs N builds the index every training process keeps for an epoch of N documents (their order and where
each window's documents are), flame's Windows._order against the way flame built it until 2026-11-29
(Generator.permutation, cast to int32, and a running int64 token count per document), timing each and its peak
memory (tracemalloc).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flame.data import TOKENS_COLUMN  # noqa: E402
from flame.data.loader import PackedLoader, Source, Windows, open_source  # noqa: E402


class TakeWindows(Windows):
    """The same windows, read with pyarrow's ChunkedArray.take over the window's documents."""

    def window(self, i: int):
        epoch, w = divmod(i, self.per_epoch)
        self._order(epoch)
        start, end = w * self.context, (w + 1) * self.context
        first, ends = self._span(start, end)
        docs = self.order[first : first + len(ends)]
        tokens = self.source.column.take(docs).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        doc_start = int(ends[0]) - int(self.source.lengths[docs[0]])
        starts = [int(e) - start for e in ends[:-1] if start < e < end]
        return tokens[start - doc_start : end - doc_start], starts


def write_dataset(path: Path, tokens: int, seed: int = 0) -> None:
    import datasets
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    lengths = rng.integers(100, 1500, size=tokens // 800 + 1)
    lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), tokens)) + 1]
    batches = []
    for lo in range(0, len(lengths), 1000):
        n = lengths[lo : lo + 1000]
        offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int32)
        values = pa.array(rng.integers(3, 32000, size=int(offsets[-1]), dtype=np.int32))
        batches.append(pa.record_batch([pa.ListArray.from_arrays(pa.array(offsets), values)], names=[TOKENS_COLUMN]))
    datasets.Dataset(pa.Table.from_batches(batches)).save_to_disk(str(path))


def per_batch_ms(loader: PackedLoader, batches: int) -> float:
    loader.next_batch()  # the epoch's order is computed once, at its first window
    t = time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    return 1000 * (time.perf_counter() - t) / batches


def earlier_index(lengths: np.ndarray, seed: int, epoch: int):
    """flame's index until 2026-11-29: Generator.permutation (int64) cast to int32, and the running token count at
    every document's end (int64)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    order = order.astype(np.int32) if len(order) < 2**31 else order
    return order, np.cumsum(lengths[order], dtype=np.int64)


def index_cost(docs: int) -> None:
    import tracemalloc

    lengths = np.random.default_rng(0).integers(100, 1500, size=docs).astype(np.int32)
    source = Source("index", 1.0, None, lengths)
    rows = []
    for name, build in (
        ("until 2026-11-29", lambda: earlier_index(lengths, 0, 0)),
        ("flame", lambda: Windows(source, 2048, 0)._order(0)),
    ):
        tracemalloc.start()
        t = time.perf_counter()
        kept = build()
        seconds = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del kept
        rows.append((name, seconds, peak))
    print(f"epoch index of {docs / 1e6:.0f}M documents (the lengths, {lengths.nbytes / 2**30:.2f} GiB, not counted)")
    print(f"{'':>16} {'seconds':>8} {'peak GiB':>9} {'bytes/doc':>10}")
    for name, seconds, peak in rows:
        print(f"{name:>16} {seconds:>8.2f} {peak / 2**30:>9.2f} {peak / docs:>10.1f}")
    w = Windows(source, 2048, 0)
    w._order(0)
    kept = w.order.nbytes + w.block_ends.nbytes
    print(
        f"kept after the build, besides the lengths: flame {kept / 2**30:.2f} GiB ({kept / docs:.2f} bytes/doc), "
        f"until 2026-11-29 {(4 + 8) * docs / 2**30:.2f} GiB (12 bytes/doc)"
    )
    order, ends = earlier_index(lengths, 0, 0)
    assert np.array_equal(order, w.order), "the two ways order the documents differently"
    assert int(ends[-1]) == int(w.block_ends[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="16M,64M,256M", help="dataset sizes, comma list (K/M/G suffixes)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--batches", type=int, default=5, help="timed batches per loader")
    parser.add_argument("--index-docs", help="only build the per-epoch document index of this many documents (K/M/G)")
    args = parser.parse_args(argv)
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}

    def count(s: str) -> int:
        return int(float(s[:-1]) * scale[s[-1].upper()]) if s[-1].upper() in scale else int(s)

    if args.index_docs:
        index_cost(count(args.index_docs))
        print(f"date: {time.strftime('%Y-%m-%d', time.gmtime())}")
        return 0
    sizes = [count(s) for s in args.tokens.split(",")]
    print(f"batch {args.batch} x {args.context}, {args.batches} batches timed per loader")
    print(f"{'tokens':>8} {'chunks':>7} {'flame ms/batch':>15} {'take ms/batch':>14} {'take/flame':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            path = Path(tmp) / f"ds-{size}"
            write_dataset(path, size)
            source = open_source(str(path))
            kw = dict(context=args.context, batch=args.batch, seed=0)
            flame_ms = per_batch_ms(PackedLoader([source], **kw), args.batches)
            take = PackedLoader([source], **kw)
            take.windows = [TakeWindows(source, args.context, 0)]
            same = PackedLoader([source], **kw).next_batch()["input_ids"].equal(take.next_batch()["input_ids"])
            assert same, "the two ways read different windows"
            take_ms = per_batch_ms(take, args.batches)
            print(
                f"{source.tokens / 1e6:>7.0f}M {source.column.num_chunks:>7} {flame_ms:>15.2f} {take_ms:>14.1f} "
                f"{take_ms / flame_ms:>10.0f}x"
            )
    print(f"date: {time.strftime('%Y-%m-%d', time.gmtime())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
