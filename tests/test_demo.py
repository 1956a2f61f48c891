"""The demo scripts parse (running them takes minutes: `make demo`)."""

import subprocess
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("script", ["demo.sh", "demo_train.sh"])
def test_demo_script_parses(script):
    result = subprocess.run(["bash", "-n", str(CONFIGS / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_demo_runs_the_training_step():
    assert "bash configs/demo_train.sh" in (CONFIGS / "demo.sh").read_text()
