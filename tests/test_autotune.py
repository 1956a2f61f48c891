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


def _archive(path, members: dict[str, bytes]) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_shipped_results_for_this_gpu_restore_where_triton_finds_them_and_nothing_else(cache, tmp_path):
    def folder(key: str) -> str:  # the cache's folder for a key (Triton names it by an encoding of the key)
        return autotune.Path(triton_cache.get_cache_manager(key).cache_dir).name

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    good = json.dumps({"key": [7], "configs_timings": []}).encode()
    a, b = folder("a" * 64), folder("b" * 64)
    _archive(
        shipped / "h200-340M.tgz",
        {
            f"./{a}/chunk_gla_fwd_kernel_o.autotune.json": good,
            f"./{b}/l2norm_fwd_kernel.autotune.json": good,
            f"./{'c' * 52}/kernel.cubin": b"not tuning",  # not an autotune result
            f"./{'d' * 52}/../../escape.autotune.json": good,  # would leave the cache
            f"./{'e' * 52}/nested/x.autotune.json": good,  # not the cache's layout
        },
    )
    _archive(shipped / "h100-340M.tgz", {f"./{'f' * 52}/other_gpu.autotune.json": good})
    mine = tune("b" * 64, "l2norm_fwd_kernel", 99)  # a result of this machine's own stays

    line = autotune.restore_shipped("NVIDIA H200", shipped=shipped)
    assert line == (
        "reusing 1 kernel autotuning results that flame ships for the NVIDIA H200 (flame/tuning): FLA's kernels skip "
        "benchmarking those shapes"
    )
    found = triton_cache.get_cache_manager("a" * 64).get_file("chunk_gla_fwd_kernel_o.autotune.json")
    assert json.loads(open(found).read())["key"] == [7]
    assert json.loads(open(mine).read())["key"] == [99]
    assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()) == [
        f"{a}/chunk_gla_fwd_kernel_o.autotune.json",
        f"{b}/l2norm_fwd_kernel.autotune.json",
    ]
    assert not (tmp_path / "escape.autotune.json").exists()
    assert autotune.restore_shipped("NVIDIA H200", shipped=shipped) is None  # all there now
    assert autotune.restore_shipped("NVIDIA A100-SXM4-80GB", shipped=shipped) is None  # nothing shipped for it


@pytest.mark.parametrize(
    ("name", "tag"),
    [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-80GB", "a100-sxm4-80gb"), ("", "")],
)
def test_gpu_tag_is_the_model_as_the_archives_name_it(name, tag):
    assert autotune.gpu_tag(name) == tag


def test_every_shipped_member_is_an_autotune_result_in_the_caches_layout(cache):
    """What flame ships all restores: no member is passed over as not the cache's layout (then a fresh H200 would
    tune it again, unseen); each holds Triton's autotuner record."""
    import tarfile

    archives = sorted(autotune.SHIPPED.glob("*.tgz"))
    assert archives and all(a.name.startswith("h200-") for a in archives)
    names = set()
    for archive in archives:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.isdir():
                    continue
                parts = [p for p in autotune.PurePosixPath(member.name).parts if p != "."]
                assert member.isfile() and len(parts) == 2 and parts[1].endswith(".autotune.json"), member.name
                record = json.loads(tar.extractfile(member).read())
                assert set(record) >= {"key", "configs_timings"}
                names.add("/".join(parts))
    line = autotune.restore_shipped("NVIDIA H200")
    assert line.startswith(f"reusing {len(names)} kernel autotuning results that flame ships for the NVIDIA H200 ")
    assert len(list(cache.rglob("*.autotune.json"))) == len(names)


def test_a_cache_that_cannot_take_the_shipped_results_is_said_and_does_not_stop_the_run(tmp_path):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    line = autotune.restore_shipped("NVIDIA H200", cache=blocked)
    assert line.startswith(f"flame's shipped autotuning results were not restored into {blocked} (")
    assert line.endswith("); FLA's kernels tune as usual")
