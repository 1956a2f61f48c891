import numpy as np
import pyarrow as pa
import pytest
import torch

from flame.data import loader as loader_module
from flame.data.loader import PackedLoader, Source, Windows, open_source
from flame.errors import DataError
from tests.prepared import counting_docs, make_prepared


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    docs = counting_docs(50, 64, seed=1)
    return make_prepared(root / "a", docs, 64), docs


def _stream(source, context, seed, n_batches, **kw):
    loader = PackedLoader([source], context=context, batch=2, seed=seed, **kw)
    return [loader.next_batch() for _ in range(n_batches)], loader


def test_one_epoch_is_every_document_once_without_padding(prepared):
    path, docs = prepared
    source = open_source(str(path))
    context = 16
    per_epoch = sum(map(len, docs)) // context
    loader = PackedLoader([source], context=context, batch=1, seed=0)
    tokens = torch.cat([loader.next_batch()["input_ids"][0] for _ in range(per_epoch)]).tolist()
    order = np.random.default_rng([0, 0]).permutation(len(docs))
    expected = [t for i in order for t in docs[i]][: per_epoch * context]
    assert tokens == expected
    # the next window starts epoch 1, in a new order
    loader.next_batch()
    assert loader.epoch() == pytest.approx((per_epoch + 1) / per_epoch)


def test_windows_read_across_chunks_slices_and_long_documents():
    """Prepared datasets are memory-mapped Arrow files cut into record batches (chunks, possibly sliced); a window
    reads only its own documents from them and gets exactly the tokens of the concatenated epoch."""
    import pyarrow as pa

    docs = counting_docs(40, 1000, seed=4, min_len=1, max_len=30)
    docs[7] = list(range(3, 200))  # a document longer than several windows
    whole = pa.array(docs, type=pa.list_(pa.int32()))
    cuts = [0, 1, 9, 10, 23, 40]  # chunks of 1, 8, 1, 13 and 17 documents, each a slice of one array
    column = pa.chunked_array([whole.slice(a, b - a) for a, b in zip(cuts, cuts[1:])])
    source = Source("mem", 1.0, column, np.array([len(d) for d in docs]))
    assert [source.document(i).tolist() for i in range(len(docs))] == docs
    context = 16
    per_epoch = sum(map(len, docs)) // context
    loader = PackedLoader([source], context=context, batch=1, seed=2)
    tokens = torch.cat([loader.next_batch()["input_ids"][0] for _ in range(per_epoch)]).tolist()
    order = np.random.default_rng([2, 0]).permutation(len(docs))
    assert tokens == [t for i in order for t in docs[i]][: per_epoch * context]


def test_the_index_of_a_corpus_over_2g_tokens_does_not_overflow_and_costs_8_bytes_a_document(prepared):
    """Every process keeps a length and an order entry per document (int32, int32) and a running token count per
    loader.BLOCK documents (int64)."""
    lengths = np.full(5, 2**30, dtype=np.int32)  # 5G tokens: past int32 in the sums, not in any one document
    source = Source("big", 1.0, None, lengths)
    windows = Windows(source, 2048, seed=0)
    windows._order(0)
    assert source.tokens == 5 * 2**30 and windows.per_epoch == 5 * 2**30 // 2048
    first, ends = windows._span(0, 5 * 2**30)
    assert (first, ends.tolist(), windows.block_ends.tolist()) == (0, [k * 2**30 for k in range(1, 6)], [5 * 2**30])
    assert [windows._span(t, t + 1)[0] for t in (0, 2**30 - 1, 2**30, 5 * 2**30 - 1)] == [0, 0, 1, 4]
    opened = open_source(str(prepared[0]))
    assert (opened.lengths.dtype, windows.order.dtype, windows.block_ends.dtype) == (np.int32, np.int32, np.int64)


@pytest.mark.parametrize("block", [1, 3, 1024])
def test_windows_across_index_blocks_are_the_documents_in_permutation_order(monkeypatch, block):
    """The stream's definition: epoch e is the documents in the order Generator.permutation(n) of (seed, e),
    concatenated and cut into windows; the document starts inside each window are where its documents begin. Many
    documents shorter than a window, so windows span index blocks of every size tried."""
    monkeypatch.setattr(loader_module, "BLOCK", block)
    rng = np.random.default_rng(7)
    docs = [rng.integers(3, 100, int(n)).tolist() for n in rng.integers(1, 12, 300)]
    source = Source(
        "mem",
        1.0,
        pa.chunked_array([pa.array(docs, type=pa.list_(pa.int32()))]),
        np.array([len(d) for d in docs], dtype=np.int32),
    )
    context = 16
    windows = Windows(source, context, seed=5)
    for epoch in (0, 1):
        order = np.random.default_rng([5, epoch]).permutation(len(docs))
        flat = [t for i in order for t in docs[i]]
        begins = set(np.cumsum([len(docs[i]) for i in order]).tolist())
        for w in range(windows.per_epoch):
            tokens, starts = windows.window(epoch * windows.per_epoch + w)
            lo = w * context
            assert tokens.tolist() == flat[lo : lo + context]
            assert starts == [b - lo for b in sorted(begins) if lo < b < lo + context]


def test_same_seed_same_batches_other_seed_differs(prepared):
    source = open_source(str(prepared[0]))
    a, _ = _stream(source, 16, 3, 4)
    b, _ = _stream(source, 16, 3, 4)
    c, _ = _stream(source, 16, 4, 4)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c, strict=True))


def test_resume_from_state_continues_exactly(prepared):
    source = open_source(str(prepared[0]))
    full, _ = _stream(source, 16, 0, 40)  # crosses several epochs
    first, loader = _stream(source, 16, 0, 17)
    resumed = PackedLoader([source], context=16, batch=2, seed=0)
    resumed.load_state_dict(loader.state_dict())
    rest = [resumed.next_batch() for _ in range(23)]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(full, first + rest, strict=True))


def test_processes_split_the_single_process_stream(prepared):
    source = open_source(str(prepared[0]))
    single = PackedLoader([source], context=16, batch=4, seed=0)
    ranks = [PackedLoader([source], context=16, batch=2, seed=0, rank=r, world=2) for r in range(2)]
    for _ in range(5):
        whole = single.next_batch()["input_ids"]
        parts = torch.cat([r.next_batch()["input_ids"] for r in ranks])
        assert torch.equal(whole, parts)
    assert single.state_dict() == ranks[0].state_dict() == ranks[1].state_dict()


def test_varlen_cu_seqlens_mark_document_starts(prepared):
    source = open_source(str(prepared[0]))
    loader = PackedLoader([source], context=16, batch=3, seed=0, varlen=True)
    for _ in range(5):
        batch = loader.next_batch()
        ids, cu = batch["input_ids"][0].tolist(), batch["cu_seqlens"].tolist()
        assert batch["input_ids"].shape == (1, 48) and cu[0] == 0 and cu[-1] == 48
        assert cu == sorted(set(cu))
        # a document starts right after each EOS (2) and at every window start
        starts = {0} | {i + 1 for i, t in enumerate(ids[:-1]) if t == 2} | {16, 32}
        assert set(cu[:-1]) == starts


def test_mixing_follows_weights(tmp_path):
    a = open_source(str(make_prepared(tmp_path / "a", counting_docs(30, 64, seed=1), 64)), weight=3)
    b = open_source(str(make_prepared(tmp_path / "b", counting_docs(30, 64, seed=2), 64)), weight=1)
    loader = PackedLoader([a, b], context=8, batch=4, seed=0)
    for _ in range(10):
        loader.next_batch()
    assert loader.state_dict()["taken"] == [30, 10]


def test_missing_and_too_small_datasets(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_source(str(tmp_path / "nope"))
    small = open_source(str(make_prepared(tmp_path / "s", [[3, 4, 2]], 64)))
    with pytest.raises(DataError, match="fewer than one --context window"):
        PackedLoader([small], context=16, batch=1, seed=0)


def test_a_damaged_dataset_is_one_data_error(tmp_path):
    import shutil

    good = make_prepared(tmp_path / "good", counting_docs(50, 64, seed=1), 64)
    torn = shutil.copytree(good, tmp_path / "torn")
    arrow = max(torn.rglob("*.arrow"), key=lambda p: p.stat().st_size)
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    with pytest.raises(DataError, match=f"{torn} is damaged .*: prepare it again"):
        open_source(str(torn))
    bad_manifest = shutil.copytree(good, tmp_path / "manifest")
    (bad_manifest / "manifest.json").write_text("{torn")
    with pytest.raises(DataError, match="manifest.json is damaged"):
        open_source(str(bad_manifest))
