"""benchmarks/distributed.py on the CPU: one process and DDP on 2 gloo processes give a row each; what needs GPUs
is refused before anything runs."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import distributed  # noqa: E402


def test_one_process_and_ddp_each_give_a_row(tmp_path, capsys):
    out = tmp_path / "rows.json"
    args = ["--device", "cpu", "--tiny", "--setups", "one,ddp", "--batch", "2", "--context", "64", "--steps", "3",
            "--warmup", "1", "--json", str(out)]  # fmt: skip
    assert distributed.main(args) == 0
    rows = json.loads(out.read_text())
    assert [(r["setup"], r["processes"]) for r in rows] == [("one", 1), ("ddp", 2)]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["per_process"] == pytest.approx(r["tokens_per_s"] / r["processes"])
        assert len(r["losses"]) == 4  # logged at step 1, every 1 + warm-up = 2 steps (2, 4) and at the last (5)
    printed = capsys.readouterr().out
    assert "tiny GLA, 2 x 64 per process, 2 processes, cpu, 3 timed steps after 2" in printed
    assert printed.splitlines()[-2].split()[:2] == ["one", "1"] and printed.splitlines()[-1].split()[:2] == [
        "ddp",
        "2",
    ]


def test_train_options_reach_every_run_after_the_benchmarks_own(tmp_path, capsys):
    out = tmp_path / "rows.json"
    args = ["--device", "cpu", "--tiny", "--setups", "one", "--batch", "2", "--context", "64", "--steps", "3",
            "--warmup", "1", "--train-options=--logging 1", "--json", str(out)]  # fmt: skip
    assert distributed.main(args) == 0
    assert len(json.loads(out.read_text())[0]["losses"]) == 5  # every step logged, not every 2
    assert "3 timed steps after 2, with --logging 1" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("setups", "said"),
    [("one,fsdp", "fsdp need GPUs"), ("ddp,zero9", "unknown setup(s) zero9")],
)
def test_what_cannot_run_is_refused_first(capsys, setups, said):
    with pytest.raises(SystemExit) as e:
        distributed.main(["--device", "cpu", "--tiny", "--setups", setups])
    assert e.value.code == 2 and said in capsys.readouterr().err
