"""A real tiny run for the inspect tests: flame.engine trains a 2-layer Llama for 6 updates (checkpoints at 3 and 6)
on a counting dataset; made once per test session and shared by tests/test_inspect.py and tests/cli/test_inspect.py."""

import shutil
from pathlib import Path

from tests.prepared import counting_docs, llama_config, make_prepared

STEPS, SAVE, BATCH, CONTEXT = 6, 3, 4, 32
_made: dict[str, Path] = {}


def trained_run(tmp_path_factory) -> Path:
    """RUN/ with config.json, metrics.jsonl (one record per update, val_loss at 3 and 6) and
    checkpoints/step-0000000{3,6}."""
    if "run" not in _made:
        from flame import engine
        from flame.config import TrainConfig

        root = tmp_path_factory.mktemp("inspect-run")
        make_prepared(root / "ds", counting_docs(200, 64), 64, counting_docs(8, 64, seed=1))
        llama_config(root / "llama.json")
        cfg = TrainConfig(
            model=str(root / "llama.json"),
            cache=str(root / "ds"),
            path=str(root / "run"),
            context=CONTEXT,
            batch=BATCH,
            lr=3e-3,
            warmup=2,
            seed=0,
            logging=1,
            save=SAVE,
            steps=STEPS,
            limit=0,
            eval=SAVE,
            eval_windows=4,
        )
        engine.train(cfg)
        _made["run"] = root / "run"
    return _made["run"]


def copy_checkpoint(run: Path, step: int, dest: Path) -> Path:
    """A copy of checkpoint `step` at dest/checkpoints/step-N (so tests may damage it)."""
    name = f"step-{step:08d}"
    target = dest / "checkpoints" / name
    shutil.copytree(run / "checkpoints" / name, target)
    return target
