"""Where the training metrics go: rich live display, metrics.jsonl, wandb. Rank 0 only.

    with RunLogger(cfg, run_dir, total_steps=1000, start_step=0, enabled=accelerator.is_main_process) as log:
        log.record({"step": 1, "loss": 10.4, ...})

- Console: a rich progress bar with loss, lr, tokens/s, MFU and ETA on a terminal; one plain line per record
  otherwise (CI logs, `| tee`, FLAME_QUIET=1).
- RUN/metrics.jsonl: one JSON object per record (step, loss, lr, grad_norm, tokens, tokens_per_s, mfu,
  memory_gib, time, and a few more). A resumed run first drops records past its checkpoint, so the file reads as
  one uninterrupted run.
- wandb, only with --project: run name = --type, the run id is kept in RUN/wandb-id so a resumed run continues the
  same wandb run. WANDB_MODE=offline logs locally.
- TensorBoard, only with --tensorboard: RUN/tensorboard/, each record's numbers as scalars under their
  metrics.jsonl names at their step. A resumed run purges (hides) the events past its checkpoint, as it drops the
  records of metrics.jsonl.
"""

import importlib.util
import json
import os
import sys
import uuid
from pathlib import Path

from flame import ui
from flame.config import TrainConfig
from flame.errors import ConfigError

METRICS = "metrics.jsonl"
WANDB_ID = "wandb-id"
TENSORBOARD = "tensorboard"


def tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def _parse(line: str) -> dict | None:
    """One metrics.jsonl record, or None for a blank or torn line (the process was killed mid-write)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    ok = isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record["step"], bool)
    return record if ok else None


def _fmt(record: dict) -> str:
    def num(key, spec):
        v = record.get(key)
        return "-" if v is None else format(v, spec)

    mfu = record.get("mfu")
    val = f"val {num('val_loss', '.4f')}  " if "val_loss" in record else ""
    return (
        f"step {record['step']}  loss {num('loss', '.4f')}  {val}"
        f"lr {num('lr', '.2e')}  grad {num('grad_norm', '.3f')}  "
        f"tokens {ui.human(record['tokens'])}  {ui.human(record['tokens_per_s'])} tok/s  "
        f"mfu {'-' if mfu is None else f'{100 * mfu:.1f}%'}  mem {num('memory_gib', '.2f')} GiB"
    )


class RunLogger:
    def __init__(self, cfg: TrainConfig, run_dir: Path, *, total_steps: int, start_step: int, enabled: bool):
        self.cfg, self.run_dir, self.enabled = cfg, Path(run_dir), enabled
        self.total_steps, self.start_step = total_steps, start_step
        self.wandb_run, self.wandb_id, self.progress, self.file, self.tensorboard = None, None, None, None, None
        self.last: dict | None = None

    def __enter__(self):
        if not self.enabled:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS
        self._truncate(path)
        self.file = path.open("a")
        try:
            if self.cfg.project:
                self._start_wandb()
            if self.cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: events from it on, which the interrupted run logged after its checkpoint, are hidden
                self.tensorboard = SummaryWriter(
                    str(self.run_dir / TENSORBOARD), purge_step=self.start_step + 1 if self.start_step else None
                )
        except BaseException:
            self.__exit__(*sys.exc_info())  # what was opened is closed (wandb told the run failed)
            raise
        if ui.interactive():
            # The bar (steps, elapsed, ETA) stays at the bottom; each logged step prints a line above it, so the
            # history stays on screen and a narrow terminal cuts nothing.
            self.progress = ui.progress()
            self.progress.start()
            self.task = self.progress.add_task(
                f"train {self.cfg.type}", total=self.total_steps, completed=self.start_step
            )
        return self

    def _truncate(self, path: Path) -> None:
        """Drop records past the step we continue from (logged after the checkpoint by the interrupted run)."""
        if not path.is_file():
            return
        lines = path.read_text().splitlines()
        keep = [ln for ln in lines if (r := _parse(ln)) is not None and r["step"] <= self.start_step]
        if len(keep) != len(lines):
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, path)

    def _start_wandb(self) -> None:
        import wandb

        id_file = self.run_dir / WANDB_ID
        if not id_file.is_file() or not id_file.read_text().strip():
            # Temp file and rename: a kill mid-write must not leave an empty id (a new wandb run on resume).
            tmp = id_file.with_suffix(".tmp")
            tmp.write_text(uuid.uuid4().hex[:12] + "\n")  # wandb run ids: short, lowercase alphanumeric
            os.replace(tmp, id_file)
        self.wandb_id = id_file.read_text().strip()
        try:
            self.wandb_run = wandb.init(
                project=self.cfg.project,
                name=self.cfg.type,
                id=self.wandb_id,
                resume="allow",
                dir=str(self.run_dir),
                config=self.cfg.to_dict(),
            )
        except wandb.errors.UsageError as e:  # e.g. no API key; nothing was trained yet
            raise ConfigError(
                f"--project {self.cfg.project}: wandb cannot start ({e})",
                "run `wandb login` (or set WANDB_API_KEY), set WANDB_MODE=offline to log locally, or drop --project",
            ) from e

    def record(self, record: dict) -> None:
        self.last = record
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])
        if self.tensorboard is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tensorboard.add_scalar(k, v, record["step"])
            self.tensorboard.flush()  # a killed run keeps what it logged, as metrics.jsonl does
        if self.progress is not None:
            self.progress.update(self.task, completed=record["step"])
        ui.print0(_fmt(record))
        ui.flush()

    def warn(self, message: str) -> None:
        ui.warn(message)

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        if self.progress is not None:
            self.progress.stop()
        if self.file is not None:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if exc[0] else 0)
        return False
