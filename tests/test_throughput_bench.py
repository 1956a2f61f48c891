"""Plumbing of benchmarks/throughput.py on the CPU: a subprocess per engine, its JSON row back, the table printed.
(The measurement itself is a benchmark for the GPU machine, never a timed test.)"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import throughput  # noqa: E402


def test_tiny_bare_run_returns_a_row_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["--device", "cpu", "--tiny", "--engines", "bare", "--batch", "2", "--context", "64"]
    assert throughput.main(argv + ["--steps", "2", "--warmup", "1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert (row["model"], row["engine"], row["device"]) == ("tiny-gla", "bare", "cpu")
    assert row["tokens_per_s"] > 0 and row["first_s"] > 0 and row["peak_gib"] > 0
    assert row["mfu"] is None and row["mfu_6n"] is None  # no known peak FLOP/s on a CPU
    lines = capsys.readouterr().out.splitlines()
    assert "batch 2 x context 64, 2 timed steps after 1 + 1" in lines
    assert "model      engine   tokens/s    MFU  MFU 6N  peak GiB  first s" in lines
    assert any(ln.startswith("tiny-gla   bare ") for ln in lines)


def test_an_unknown_model_is_refused():
    with pytest.raises(SystemExit) as exc:
        throughput.main(["--models", "gla-9B"])
    assert exc.value.code == 2
