"""Checkpoints: save, find, load and rotate, atomically.

    RUN/checkpoints/step-00001000/
      model/          HF format (config.json, model.safetensors, tokenizer files):
                      AutoModelForCausalLM.from_pretrained(this) works after `import fla`
      state/
        accelerate/   accelerator.save_state: weights (sharded under FSDP / ZeRO), optimizer, the RNG state of
                      every process (random_states_<rank>.pkl)
        trainer.json  step, tokens seen, data position, skipped-update counters, world size, accumulation
                      (what an exact resume needs beyond the tensors)

Everything is written into RUN/checkpoints/.step-00001000.tmp and renamed into place by rank 0 once every
process has finished writing: a folder named step-* is complete by construction, and a crash mid-save leaves
only a .tmp folder, which the next save removes and which is never picked to continue from.
"""

import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

from flame.errors import CheckpointError, first_line, read_json_object

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer.json"
SET_ASIDE = "set-aside"
EARLIER = "go back to an earlier checkpoint of the run: flame resume RUN --checkpoint step-N"
_NAME = re.compile(r"^step-(\d{8,})$")


def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


def complete(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


class RunLock:
    """FOLDER/.lock, held (flock) by the process that writes the folder: a run dir while it trains, so that a second
    launch on the same run dir (a job requeued while the first still runs) stops with one line instead of both
    writing one metrics.jsonl and one checkpoints/ folder; prepare's temp folder, so that a later run can tell a
    killed run's leftover from one still being written. The kernel drops the lock when the process (and any child
    forked while it held it) ends, however it ends. A file system that cannot lock (NFSv3 without lockd, Lustre
    mounted noflock) locks nothing: `unsupported` says why, and the work goes on unguarded."""

    NAME = ".lock"

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / self.NAME
        self._file = None
        self.unsupported: str | None = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> str | None:
        """Take the lock: None once held (or where nothing can be locked), else who holds it ("pid N on HOST")."""
        try:
            import fcntl
        except ImportError:  # not POSIX
            self.unsupported = "no flock on this platform"
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held: by whom, as the holder wrote it
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            return holder
        except OSError as e:  # ENOLCK, ENOSYS, EOPNOTSUPP: the file system does not lock
            f.close()
            self.unsupported = f"{self.path.parent} cannot be locked ({e.strerror or e})"
            return None
        import socket

        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None


def set_aside_after(run_dir: str | os.PathLike, step: int) -> list[Path]:
    """Move the run's checkpoints after `step` to RUN/set-aside/ (a run that went back to an earlier checkpoint
    keeps one history; nothing is deleted). Returns where they went, oldest first."""
    later = [p for p in complete(run_dir) if int(_NAME.match(p.name).group(1)) > step]
    if not later:
        return []
    aside = Path(run_dir) / SET_ASIDE
    aside.mkdir(exist_ok=True)
    moved = []
    for p in later:
        target, n = aside / p.name, 1
        while target.exists():  # set aside twice (went back twice): keep both
            target, n = aside / f"{p.name}.{n}", n + 1
        p.rename(target)
        moved.append(target)
    return moved


def latest(run_dir: str | os.PathLike) -> Path | None:
    found = complete(run_dir)
    return found[-1] if found else None


def save(accelerator, model, run_dir: str | os.PathLike, step: int, trainer_state: dict, extra_files=()) -> Path:
    """Write checkpoint `step` of the run; every process calls this (each saves its own RNG and shards).

    extra_files: files copied into model/ (the tokenizer), so the model dir is usable on its own.
    """
    final = step_dir(run_dir, step)
    tmp = final.parent / f".{final.name}.tmp"
    if accelerator.is_main_process:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(".step-*.tmp"):  # left by a process killed mid-save
            shutil.rmtree(stale)
        tmp.mkdir()
    accelerator.wait_for_everyone()

    # accelerate warns that it stored a tied LM head once; loading re-ties it (the exact-continuation test checks).
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    accelerator.save_state(str(tmp / "state" / "accelerate"))
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP / ZeRO-3 shards; every process must call it
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one tiny shard: a progress bar per save only clutters the log
        unwrapped.save_pretrained(tmp / "model", state_dict=state_dict, safe_serialization=True)
        hf_logging.enable_progress_bar()
        for f in extra_files:
            shutil.copy2(f, tmp / "model" / Path(f).name)
        (tmp / "state" / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
        if final.exists():  # the same step saved again (a re-run): replace it only now that the new one is whole
            old = final.with_name(f".{final.name}.old.tmp")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint so that a kill at any moment leaves it whole or gone: rename it out of the `step-N`
    namespace first (one atomic rename), then delete. A deletion cut short by a kill would otherwise leave a
    `step-N` folder without some of its files, which would look complete."""
    doomed = checkpoint.with_name(f".{checkpoint.name}.tmp")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed)


def rotate(run_dir: str | os.PathLike, limit: int) -> list[Path]:
    """Delete all but the newest `limit` complete checkpoints (0 keeps all); returns what was deleted."""
    found = complete(run_dir)
    doomed = found[:-limit] if limit > 0 else []
    for p in doomed:
        _remove(p)
    return doomed


def read_trainer_state(checkpoint: str | os.PathLike) -> dict:
    path = Path(checkpoint) / "state" / TRAINER_STATE
    if not path.is_file():
        raise CheckpointError(
            f"{checkpoint} is not a complete flame checkpoint (no state/{TRAINER_STATE})",
            "give a RUN/checkpoints/step-N folder written by flame train",
        )
    return read_json_object(
        path, CheckpointError, EARLIER, invalid="is damaged", not_object="is damaged (not a JSON object)"
    )


class NotSafetensors(ValueError):
    """A file named *.safetensors whose first bytes are no safetensors header; `lfs` when they are a git-lfs
    pointer (a clone that did not fetch the file)."""

    def __init__(self, path: Path, lfs: bool):
        super().__init__(f"{path} is not a safetensors file")
        self.lfs = lfs


def safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(the tensor table, name -> {dtype, shape, data_offsets}, without __metadata__; the offset its data starts
    at) of a safetensors file (u64 header length, JSON header, data), reading the header only. NotSafetensors when it
    is none; whether the data is all there is the caller's to check against the file's size."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        try:
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
        except ValueError:  # not JSON, or not UTF-8
            header = None
    if not isinstance(header, dict):
        raise NotSafetensors(path, lfs=head.startswith(b"version "))  # "version https://git-lfs..."
    return {k: v for k, v in header.items() if k != "__metadata__"}, 8 + n


def damaged(path: str | os.PathLike) -> str | None:
    """Why a state file cannot be read whole (truncated, not what its name says), or None. Cheap: reads a
    safetensors header or a torch zip's directory, never the tensors."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if path.suffix == ".safetensors":
            try:
                table, start = safetensors_header(path)
            except NotSafetensors:
                return "not a safetensors file"
            end = start + max((v["data_offsets"][1] for v in table.values()), default=0)
            return None if size == end else f"{size:,} bytes where its header needs {end:,}"
        if path.suffix in (".bin", ".pt", ".pth", ".pkl"):  # torch.save's zip format (accelerate's RNG .pkl too)
            with zipfile.ZipFile(path):
                return None
    except (OSError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    return None


def damaged_files(folder: str | os.PathLike) -> list[str]:
    """'NAME why' for every file under `folder` (a checkpoint's state/accelerate) that `damaged` finds."""
    folder = Path(folder)
    return [f"{f.relative_to(folder)} {why}" for f in sorted(folder.rglob("*")) if f.is_file() and (why := damaged(f))]


def load(accelerator, checkpoint: str | os.PathLike) -> dict:
    """Restore weights, optimizer and every process's RNG from a checkpoint; returns its trainer state."""
    state = read_trainer_state(checkpoint)
    acc = Path(checkpoint) / "state" / "accelerate"
    # accelerate only logs a random_states file it cannot read and goes on with fresh RNG: no exact resume
    problems = damaged_files(acc)
    if problems:
        raise CheckpointError(f"{checkpoint} is damaged: {'; '.join(problems)}", EARLIER)
    try:
        accelerator.load_state(str(acc))
    except (RuntimeError, ValueError, KeyError) as e:  # torch's size mismatch, a missing tensor or optimizer group
        raise CheckpointError(
            f"{checkpoint} does not match this model and optimizer ({first_line(e)})",
            "give the --model config that run was trained with",
        ) from e
    return state
