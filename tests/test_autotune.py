"""FLA's autotuning results travel with the run (flame.autotune), through Triton's real file cache manager."""

import json

import pytest

from flame import autotune

triton_cache = pytest.importorskip("triton.runtime.cache")


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def tune(key: str, kernel: str, best: int) -> str:
    """What Triton's autotuner stores after benchmarking (Autotuner.check_disk_cache)."""
    manager = triton_cache.get_cache_manager(key)
    return manager.put(json.dumps({"key": [best], "configs_timings": []}), f"{kernel}.autotune.json", binary=False)


def test_the_recorder_sees_the_autotune_files_triton_stores_and_reads_and_nothing_else(cache):
    old = tune("a" * 64, "chunk_fwd_kernel_h", 1)  # tuned before the run: a cache hit during it
    with autotune.Recorder() as recorder:
        new = tune("b" * 64, "swiglu_fwd_kernel", 2)
        hit = triton_cache.get_cache_manager("a" * 64).get_file("chunk_fwd_kernel_h.autotune.json")
        triton_cache.get_cache_manager("c" * 64).put(b"cubin", "kernel.cubin")  # a compiled kernel: not recorded
        assert triton_cache.get_cache_manager("d" * 64).get_file("missing.autotune.json") is None
    assert hit == old
    assert recorder.paths == {autotune.Path(old), autotune.Path(new)}
    tune("e" * 64, "after", 3)  # uninstalled: Triton's own methods again
    assert len(recorder.paths) == 2
    assert triton_cache.FileCacheManager.put.__name__ == "put"


def test_saved_results_restore_into_a_fresh_cache_where_triton_finds_them(cache, tmp_path, monkeypatch):
    run = tmp_path / "run"
    with autotune.Recorder() as recorder:
        a = tune("a" * 64, "chunk_gla_fwd_kernel_o", 4)
        b = tune("b" * 64, "l2norm_fwd_kernel", 5)
    assert autotune.save(recorder.paths, run) == 2
    assert autotune.save(recorder.paths, run) == 0  # already there
    # the cache's own layout (Triton names the folders by the key's hash)
    assert sorted(p.relative_to(run / "tuning") for p in run.rglob("*.json")) == sorted(
        autotune.Path(x).relative_to(cache) for x in (a, b)
    )

    # Another machine: an empty cache, where one result of its own already exists and must stay.
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "fresh"))
    mine = tune("b" * 64, "l2norm_fwd_kernel", 99)
    assert autotune.restore(run) == 1
    found = triton_cache.get_cache_manager("a" * 64).get_file("chunk_gla_fwd_kernel_o.autotune.json")
    assert json.loads(open(found).read())["key"] == [4]
    assert json.loads(open(mine).read())["key"] == [99]  # never overwritten
    assert autotune.restore(run) == 0
    assert not list((tmp_path / "fresh").rglob("*.tmp"))


def test_files_outside_the_cache_or_gone_are_passed_over(cache, tmp_path):
    elsewhere = tmp_path / "dump" / "x.autotune.json"
    elsewhere.parent.mkdir()
    elsewhere.write_text("{}")
    gone = cache / ("f" * 64) / "gone.autotune.json"
    assert autotune.save({elsewhere, gone}, tmp_path / "run") == 0
    assert autotune.restore(tmp_path / "run") == 0  # no RUN/tuning


def test_a_continued_checkpoint_brings_its_runs_results_too(cache, tmp_path, monkeypatch):
    with autotune.Recorder() as recorder:
        tune("a" * 64, "chunk_gla_fwd_kernel_o", 4)
    old, new = tmp_path / "old", tmp_path / "new"
    autotune.save(recorder.paths, old)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "other"))  # another machine
    line = autotune.restore_run(new, old / "checkpoints" / "step-00000004")
    assert line == (
        f"reusing 1 kernel autotuning results kept in {old / 'tuning'}: FLA's kernels skip benchmarking them"
    )
    assert autotune.restore_run(new, old / "checkpoints" / "step-00000004") is None  # all there now
    assert autotune.restore_run(new) is None
