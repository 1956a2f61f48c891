"""Training batches per second from a prepared dataset: flame's loader against reading windows with pyarrow's take.

    python benchmarks/loader.py                       # 16M, 64M and 256M tokens, batch 8 x 2048
    python benchmarks/loader.py --tokens 4M,16M --batches 20

Writes a prepared dataset of random documents (100-1,500 tokens each, 1,000 per Arrow record batch, as
`flame data prepare` writes them), opens it as `flame train` does (memory-mapped) and times `next_batch()` of
flame.data.loader.PackedLoader against the same windows read the straightforward way, `column.take(documents)`
(what flame did until 2026-11-29), side by side in one process. A batch must cost the host nothing next to a GPU
step (about 130 ms for GLA-340M at batch 8 on an H200) whatever the dataset's size.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flame.data import TOKENS_COLUMN  # noqa: E402
from flame.data.loader import PackedLoader, Windows, open_source  # noqa: E402


class TakeWindows(Windows):
    """The same windows, read with pyarrow's ChunkedArray.take over the window's documents."""

    def window(self, i: int):
        epoch, w = divmod(i, self.per_epoch)
        self._order(epoch)
        start, end = w * self.context, (w + 1) * self.context
        first = int(np.searchsorted(self.ends, start, side="right"))
        last = int(np.searchsorted(self.ends, end - 1, side="right"))
        docs = self.order[first : last + 1]
        tokens = self.source.column.take(docs).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        doc_start = int(self.ends[first - 1]) if first > 0 else 0
        starts = [int(e) - start for e in self.ends[first:last] if start < e < end]
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="16M,64M,256M", help="dataset sizes, comma list (K/M/G suffixes)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--batches", type=int, default=5, help="timed batches per loader")
    args = parser.parse_args(argv)
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}
    sizes = [
        int(float(s[:-1]) * scale[s[-1].upper()]) if s[-1].upper() in scale else int(s) for s in args.tokens.split(",")
    ]
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
