"""The data-position rule across a changed world size or batch: one global window stream, none repeated or skipped."""

import torch

from flame.data.loader import PackedLoader, open_source
from tests.prepared import counting_docs, make_prepared


def _rows(batches) -> list[list[int]]:
    return [row.tolist() for b in batches for row in b["input_ids"]]


def test_world_and_batch_change_continue_the_global_stream(tmp_path):
    a = open_source(str(make_prepared(tmp_path / "a", counting_docs(15, 64, seed=1), 64)), weight=2.0)
    b = open_source(str(make_prepared(tmp_path / "b", counting_docs(30, 64, seed=2), 64)), weight=1.0)
    kw = dict(context=16, seed=0)
    per_epoch = a.tokens // 16
    # Reference: one process, one window per batch; long enough to wrap into a second epoch of source a.
    total = 3 * 4 + 5 * 2 * 2 + 3 * 5
    ref = PackedLoader([a, b], batch=1, **kw)
    reference = _rows(ref.next_batch() for _ in range(total))
    assert ref.epoch() > 1.0 and per_epoch > 0

    # 1 process x batch 3 for 4 updates ...
    one = PackedLoader([a, b], batch=3, **kw)
    seen = _rows(one.next_batch() for _ in range(4))
    state = one.state_dict()
    # ... then 2 processes x batch 2 for 5 updates: each step consumes the next 4 global windows, rank r the r-th pair
    ranks = [PackedLoader([a, b], batch=2, rank=r, world=2, **kw) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(state)
    for _ in range(5):
        seen += _rows([ranks[0].next_batch(), ranks[1].next_batch()])
    assert ranks[0].state_dict() == ranks[1].state_dict()
    # ... then back to 1 process x batch 5 for 3 updates.
    back = PackedLoader([a, b], batch=5, **kw)
    back.load_state_dict(ranks[0].state_dict())
    seen += _rows(back.next_batch() for _ in range(3))

    assert seen == reference  # every window exactly once, in the one-process order
    assert back.state_dict() == ref.state_dict()
    assert torch.tensor(seen).shape == (total, 16)
