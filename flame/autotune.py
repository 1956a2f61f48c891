"""FLA's autotuning results travel with the run, so that a resume on a fresh machine skips the benchmarking.

FLA's Triton kernels benchmark every launch config for each new shape on first use and keep the winner as a
small JSON file in Triton's cache (`<cache>/<hash>/<kernel>.autotune.json`; the hash covers Triton's version,
the GPU target, the kernel's source, the tuning key and the config list, so a file is only ever read by the
same kernel on the same kind of GPU and software). A job that resumes on another node starts with an empty
cache and pays the whole tuning again: about 7 minutes before GLA-340M's first step on a fresh H200, against
83 s with earlier machines' results restored by hand, which need not have covered every kernel (measured
2026-11-28/29; what is left is compiling the chosen config of each kernel).

So the engine records which of those files Triton reads or writes during a run (`Recorder`, on the main
process), copies them into RUN/tuning/ (same layout as the cache) after the first step and at every checkpoint,
and on a start or resume with RUN/tuning/ copies them into this machine's cache (`restore`, once per machine).
Nothing in the cache is ever overwritten, and every copy is written whole or not at all.

flame also ships the results for the shapes of its own configs and GPU tests on the GPUs it was measured on
(flame/tuning/<gpu>-*.tgz, what `benchmarks/gpu_machine.sh` brought back from the device machines): on such a GPU,
`restore_shipped` copies them into the cache where it has none, so a first run of those shapes skips the
benchmarking as a resume does. The files are only read where the hash matches (the same kernel, Triton and GPU
target); on other shapes FLA tunes as before.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from flame.firststep import triton_cache_dir

DIR = "tuning"
SUFFIX = ".autotune.json"
SHIPPED = Path(__file__).parent / "tuning"  # flame's own results, <gpu>-<shapes>.tgz


class Recorder:
    """While installed, records the paths of the `*.autotune.json` files Triton's file cache hands out or stores.

    Wraps `FileCacheManager.get_file` (a cache hit) and `.put` (a new result). A custom cache manager
    (TRITON_CACHE_MANAGER) or another Triton layout only turns the record off."""

    def __init__(self):
        self.paths: set[Path] = set()
        self._undo: list = []

    def __enter__(self) -> Recorder:
        return self.install()

    def __exit__(self, *exc) -> bool:
        self.uninstall()
        return False

    def install(self) -> Recorder:
        try:
            from triton.runtime.cache import FileCacheManager
        except Exception:
            return self
        get_file, put = getattr(FileCacheManager, "get_file", None), getattr(FileCacheManager, "put", None)
        if get_file is None or put is None:
            return self
        recorder = self

        def get_file_recorded(manager, filename, *args, **kwargs):
            path = get_file(manager, filename, *args, **kwargs)
            if path and str(filename).endswith(SUFFIX):
                recorder.paths.add(Path(path))
            return path

        def put_recorded(manager, data, filename, *args, **kwargs):
            path = put(manager, data, filename, *args, **kwargs)
            if path and str(filename).endswith(SUFFIX):
                recorder.paths.add(Path(path))
            return path

        FileCacheManager.get_file, FileCacheManager.put = get_file_recorded, put_recorded

        def undo():
            FileCacheManager.get_file, FileCacheManager.put = get_file, put

        self._undo.append(undo)
        return self

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()


def _copy_whole(src: Path | bytes, dest: Path) -> bool:
    """Copy src (a file, or its bytes) to dest unless dest exists; a temporary file renamed into place, so dest is
    whole or absent."""
    if dest.exists():
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".flame-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            if isinstance(src, bytes):
                out.write(src)
            else:
                with open(src, "rb") as inp:
                    shutil.copyfileobj(inp, out)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def save(paths, run_dir: str | os.PathLike, cache: Path | None = None) -> int:
    """Copy the recorded autotune files that lie in Triton's cache into RUN/tuning/; returns how many are new.
    A file that vanished from the cache (cleared by hand) is passed over."""
    cache = Path(cache or triton_cache_dir()).resolve()
    target, saved = Path(run_dir) / DIR, 0
    for path in sorted(paths):
        try:
            rel = Path(path).resolve().relative_to(cache)
        except ValueError:  # outside the cache (a dump/override dir): not something to restore later
            continue
        try:
            saved += _copy_whole(Path(path), target / rel)
        except FileNotFoundError:
            continue
    return saved


def restore(run_dir: str | os.PathLike, cache: Path | None = None) -> int:
    """Copy RUN/tuning/'s autotune files into Triton's cache where the cache has none; returns how many."""
    source = Path(run_dir) / DIR
    if not source.is_dir():
        return 0
    cache, restored = Path(cache or triton_cache_dir()), 0
    for path in sorted(source.rglob("*" + SUFFIX)):
        restored += _copy_whole(path, cache / path.relative_to(source))
    return restored


def restore_run(run_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> str | None:
    """Restore the results kept with a run and, for `--checkpoint RUN2/checkpoints/step-N`, with RUN2; returns
    the line to print, or None when nothing was restored."""
    runs = dict.fromkeys([Path(run_dir)] + ([Path(checkpoint).parent.parent] if checkpoint else []))
    restored = {run / DIR: restore(run) for run in runs}
    if not sum(restored.values()):
        return None
    where = ", ".join(str(d) for d, n in restored.items() if n)
    count = sum(restored.values())
    return f"reusing {count} kernel autotuning results kept in {where}: FLA's kernels skip benchmarking them"


def gpu_tag(name: str) -> str:
    """The prefix of flame's shipped archives for a GPU: its model, as in 'NVIDIA H200' -> 'h200'."""
    words = name.lower().replace("nvidia", " ").split()
    return words[0] if words else ""


def restore_shipped(gpu_name: str, cache: Path | None = None, shipped: Path = SHIPPED) -> str | None:
    """Copy flame's shipped results for this GPU (`shipped`/<gpu_tag>-*.tgz) into Triton's cache where the cache
    has none; returns the line to print, or None when nothing was new. Only `<hash>/<kernel>.autotune.json` members
    are read, never a path that leaves the cache."""
    tag = gpu_tag(gpu_name)
    cache, restored = Path(cache or triton_cache_dir()), 0
    try:
        for archive in sorted(shipped.glob(f"{tag}-*.tgz")) if tag else []:
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():
                    parts = [p for p in PurePosixPath(member.name).parts if p != "."]
                    if not member.isfile() or len(parts) != 2 or not parts[1].endswith(SUFFIX) or ".." in parts:
                        continue
                    restored += _copy_whole(tar.extractfile(member).read(), cache / parts[0] / parts[1])
    except (OSError, tarfile.TarError) as e:  # a help, never a reason to stop a run
        return f"flame's shipped autotuning results were not restored into {cache} ({e}); FLA's kernels tune as usual"
    if not restored:
        return None
    return (
        f"reusing {restored} kernel autotuning results that flame ships for the {gpu_name} (flame/tuning): FLA's "
        "kernels skip benchmarking those shapes"
    )
