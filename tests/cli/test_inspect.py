"""`flame inspect`: rendered tables and pictures, --json with the same numbers, --plot, one-line errors."""

import json
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flame import models
from flame.cli.app import app
from flame.cli.inspect import BLOCKS, chart_lines, histogram_lines
from flame.inspect import as_dict, inspect
from tests.inspect_runs import BATCH, CONTEXT, STEPS, copy_checkpoint, trained_run
from tests.prepared import counting_docs, make_prepared

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


def flame(*args):
    return runner.invoke(app, ["inspect", *map(str, args)])


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_config_table_shows_the_counts():
    config = REPO / "configs" / "gla_340M.json"
    result = flame(config)
    assert result.exit_code == 0, result.output
    params = models.count_params(models.load_config(config))
    for n in params.values():
        assert f"{n:,}" in result.output
    assert "gla (GLAForCausalLM, FLA)" in result.output and "24 x 1024" in result.output
    assert "FLOPs/token @ 2048" in result.output and "24 x linear_attention" in result.output
    memory = models.estimate_memory(models.load_config(config), 8, 2048, shared_casts=True)  # flame train's default
    assert f"{memory['total']:.2f}" in result.output
    assert "batch 8 x context 2048, bf16, ZeRO stage 0 over 1 device(s), update 1\n" in result.output
    unshared = flame(config, "--no-share-casts")
    assert unshared.exit_code == 0, unshared.output
    memory = models.estimate_memory(models.load_config(config), 8, 2048, shared_casts=False)
    assert "update 1, --no-share-casts" in unshared.output and f"{memory['total']:.2f}" in unshared.output
    residual = flame(config, "--bf16-residual")
    assert residual.exit_code == 0, residual.output
    memory = models.estimate_memory(models.load_config(config), 8, 2048, shared_casts=True, bf16_residual=True)
    assert "update 1, --bf16-residual" in residual.output and f"{memory['total']:.2f}" in residual.output
    for sharded_by, stage, words in (("deepspeed", 2, "DeepSpeed"), ("fsdp", 3, "FSDP")):
        result = flame(config, f"--{sharded_by}", "--zero-stage", stage, "--world-size", 2)
        assert result.exit_code == 0, result.output
        memory = models.estimate_memory(
            models.load_config(config), 8, 2048, zero_stage=stage, world_size=2, shared_casts=True, **{sharded_by: True}
        )
        assert f"ZeRO stage {stage} over 2 device(s), update 1, as {words} trains" in result.output
        assert f"{memory['total']:.2f}" in result.output
    assert one_error_line(flame(config, "--fsdp", "--deepspeed")) == (
        "error: --deepspeed and --fsdp: a run is sharded by one of them, choose one"
    )


def test_config_json_has_the_same_numbers():
    config = REPO / "configs" / "demo_gla.json"
    result = flame(config, "--json", "--context", 512, "--batch", 2, "--zero-stage", 2, "--world-size", 4)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    built = models.load_config(config)
    assert out["kind"] == "model" and out["params"] == models.count_params(built)
    assert out["context"] == 512 and out["flops_per_token"] == models.flops_per_token(built, 512)
    assert (
        out["memory"]["total_gib"]
        == models.estimate_memory(built, 2, 512, zero_stage=2, world_size=4, shared_casts=True)["total"]
    )
    assert out == as_dict(inspect(config, _options(context=512, batch=2, zero_stage=2, world_size=4)))


def _options(**kw):
    from flame.inspect import InspectOptions

    return InspectOptions(**kw)


def test_dataset_report_and_json(tmp_path):
    ds = make_prepared(tmp_path / "ds", counting_docs(50, 64, min_len=4, max_len=70), 64, counting_docs(5, 64, seed=2))
    manifest = json.loads((ds / "manifest.json").read_text())
    result = flame(ds)
    assert result.exit_code == 0, result.output
    facts = inspect(ds)
    for line in histogram_lines(facts.histogram["edges"], facts.histogram["counts"]):
        assert line in result.output
    assert f"sample: train[0], {facts.sample['tokens']} tokens" in result.output
    assert facts.sample["text"].split()[0] in result.output and "agrees" in result.output

    out = json.loads(flame(ds, "--json").stdout)
    assert out["splits"] == manifest["splits"]
    assert out["documents"] == 55 and out["tokens"] == sum(s["tokens"] for s in manifest["splits"].values())


def test_dataset_disagreeing_with_its_manifest_exits_1(tmp_path):
    ds = make_prepared(tmp_path / "ds", counting_docs(20, 64), 64)
    manifest = json.loads((ds / "manifest.json").read_text())
    manifest["splits"]["train"]["documents"] = 21
    (ds / "manifest.json").write_text(json.dumps(manifest))
    result = flame(ds)
    line = one_error_line(result)
    assert line.startswith(f"error: dataset {ds}: split train: the data has {{'documents': 20")
    assert "splits" in result.output  # the report came first
    assert result.output.count("the data has") == 1  # named once, in the error line


def test_checkpoint_report(run):
    result = flame(run / "checkpoints" / "step-00000006")
    assert result.exit_code == 0, result.output
    facts = inspect(run / "checkpoints" / "step-00000006")
    assert f"{facts.loss:.4f} (logged at step 6)" in result.output
    assert "integrity" in result.output and "FAILED" not in result.output
    for check in facts.checks:
        assert check.name in result.output
    assert f"global L2 norm {facts.stats['norm']:.4f}" in result.output
    assert "x update 1 x 1 process(es) (one process), " in result.output  # the launcher setup it was saved by
    m = facts.model.memory  # estimated for the run's own batch and context
    assert (m["batch"], m["context"]) == (BATCH, CONTEXT)
    assert f"estimated peak training memory per device: batch {BATCH} x context {CONTEXT}," in result.output
    assert f"total (peak) {m['total_gib']:.2f}" in " ".join(result.output.split())
    out = json.loads(flame(run / "checkpoints" / "step-00000006", "--json").stdout)
    assert out["ok"] is True and out["step"] == 6 and out["loss"] == facts.loss
    assert out["stats"] == as_dict(facts)["stats"] and len(out["tensors"]) == facts.stats["tensors"]


def test_truncated_checkpoint_reports_and_exits_1(run, tmp_path):
    cp = copy_checkpoint(run, 3, tmp_path)
    weights = cp / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    result = flame(cp)
    line = one_error_line(result)
    assert line.startswith(f"error: checkpoint {cp} failed its integrity check (weights readable: model.safetensors")
    assert "FAILED" in result.output
    out = json.loads(flame(cp, "--json").stdout)
    assert out["ok"] is False


def test_run_report_with_the_loss_chart(run):
    result = flame(run)
    assert result.exit_code == 0, result.output
    facts = inspect(run)
    assert f"step {STEPS} of {STEPS} (100.0%), finished" in result.output
    assert f"{facts.loss:.4f}" in result.output and "checkpoints/step-00000003" in result.output
    text = " ".join(result.output.split())  # piped: plain columns, no box-drawing characters
    assert not set("│─┃━┏┡└") & set(result.output)
    assert f"validation loss {facts.val_loss:.4f} (step {STEPS})" in text
    for line in chart_lines(facts.curve["step"], facts.curve["loss"]):
        assert line in result.output
    out = json.loads(flame(run, "--json").stdout)
    assert out["step"] == STEPS and out["loss"] == facts.loss and out["curve"] == facts.curve
    assert [c["step"] for c in out["checkpoints"]] == [3, 6]
    assert f"first step {facts.first_step['seconds']:.1f} s (not in tokens/s)" in text
    assert out["first_step"] == facts.first_step


def test_a_gpu_runs_first_step_shows_what_its_autotuning_cost(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    records = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    # as the H200 wrote it for GLA-340M (2026-11-28), trimmed to the totals
    tuning = {"kernels_tuned": 18, "configs_benchmarked": 400, "tuning_s": 416.4, "compile_s": 365.8, "tuned": []}
    records[0] |= {"first_step_s": 418.6, "first_step_tuning": tuning}
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = flame(copy)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # the row wraps at the test console's width
    assert "first step 418.6 s (autotuned 18 kernel/shape pairs, 400 configs, 366 s compiling; not in tokens/s)" in text
    assert inspect(copy).first_step == {
        "step": 1, "seconds": 418.6, "kernels_tuned": 18, "configs_benchmarked": 400, "compile_s": 365.8,
    }  # fmt: skip
    assert "kernel tuning" not in text  # a CPU run keeps none


def test_a_gpu_runs_kept_autotune_results_are_counted(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for folder, kernel in (("AB", "chunk_fwd_kernel_h"), ("CD", "swiglu_fwd_kernel"), ("CD", "l2norm_fwd_kernel")):
        (copy / "tuning" / folder).mkdir(parents=True, exist_ok=True)
        (copy / "tuning" / folder / f"{kernel}.autotune.json").write_text("{}")
    result = flame(copy)
    text = " ".join(result.output.split())
    assert "kernel tuning 3 FLA autotune results in tuning/ (a resume elsewhere reuses them)" in text
    assert json.loads(flame(copy, "--json").stdout)["tuning_results"] == 3


def test_plot_writes_a_png(run, tmp_path):
    import matplotlib.image

    png = tmp_path / "loss.png"
    result = flame(run, "--plot", png)
    assert result.exit_code == 0, result.output
    assert f"wrote loss and learning-rate curves to {png}" in result.output
    assert matplotlib.image.imread(png).shape == (600, 800, 4)


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing"], "does not exist: give a model config JSON"),
        (["."], "is none of the things flame inspect reads"),
        ([REPO / "configs" / "demo_gla.json", "--precision", "fp8"], "--precision must be bf16 or fp32, got fp8"),
        ([REPO / "configs" / "demo_gla.json", "--plot", "x.png"], "--plot draws a run's curves"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    args = [tmp_path / "empty" if a == "." else tmp_path / a if a == "missing" else a for a in args]
    assert message in one_error_line(flame(*args))


def test_plot_into_a_missing_folder(run, tmp_path):
    assert "folder" in one_error_line(flame(run, "--plot", tmp_path / "no" / "x.png"))


def test_plot_onto_a_folder_is_one_error_and_leaves_nothing(run, tmp_path):
    (tmp_path / "d.png").mkdir()
    assert f"--plot {tmp_path / 'd.png'} is a folder" in one_error_line(flame(run, "--plot", tmp_path / "d.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png"]


# ---------------------------------------------------------------------------------------------------------------
# the terminal pictures


def test_histogram_lines():
    assert histogram_lines([8, 16, 32, 64], [4, 8, 1], width=4) == [
        " 8-15  4  " + BLOCKS[8] * 2,
        "16-31  8  " + BLOCKS[8] * 4,
        "32-63  1  " + BLOCKS[4],
    ]
    assert histogram_lines([1, 2, 4], [0, 1000], width=2)[0] == "1-1     0  "
    assert histogram_lines([1, 2, 4], [1, 1000], width=2)[0] == "1-1     1  " + BLOCKS[1]  # any document shows


def test_chart_lines_one_column_per_point():
    lines = chart_lines([1, 2, 3], [3.0, 2.0, 1.0], height=2)
    # levels 1..16: 3.0 -> 16 (full, full), 2.0 -> 1 + round(0.5 * 15) = 9 (full, 1/8), 1.0 -> 1 (-, 1/8)
    assert lines == [
        "3 |" + BLOCKS[8] + BLOCKS[1] + " ",
        "1 |" + BLOCKS[8] + BLOCKS[8] + BLOCKS[1],
        "   step 1 3",
    ]


def test_chart_lines_bins_many_points_and_skips_gaps():
    xs = list(range(1, 101))
    ys = [None if x == 50 else float(x) for x in xs]
    lines = chart_lines(xs, ys, width=10, height=4)
    assert len(lines) == 5 and all(len(line) == len(lines[0]) for line in lines[:4])
    columns = [line.split("|")[1] for line in lines[:4]]
    assert columns[-1][0] == BLOCKS[1] and columns[0][-1] == BLOCKS[8]  # lowest column first, highest last
    assert chart_lines([1, 2], [None, math.nan]) == []
    flat = chart_lines([1, 2, 3], [2.0, 2.0, 2.0], height=2)
    assert flat[0] == "2 |   " and flat[1] == "2 |" + BLOCKS[8] * 3  # a flat curve at half height


def test_tables_are_ruled_on_a_terminal_only(monkeypatch):
    from rich.console import Console

    from flame import ui

    for terminal, ruled in ((True, True), (False, False)):
        monkeypatch.setattr(ui, "console", Console(force_terminal=terminal, width=60, markup=False))
        table = ui.table(title="t")
        table.add_column("a")
        table.add_row("x")
        with ui.console.capture() as out:
            ui.console.print(table)
        assert ("│" in out.get()) is ruled, out.get()


def test_a_run_says_where_else_its_records_went(run, tmp_path):
    assert "logged to metrics.jsonl" in " ".join(flame(run).output.split())
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "wandb-id").write_text("abc123def456\n")  # as --project and --tensorboard leave the run dir
    (copy / "tensorboard").mkdir()
    text = " ".join(flame(copy).output.split())  # the long path wraps at the test console's width: checked in JSON
    assert "logged to metrics.jsonl, wandb (run id abc123def456), TensorBoard (tensorboard --logdir /" in text
    assert json.loads(flame(copy, "--json").stdout)["logged_to"] == {
        "wandb": "abc123def456", "tensorboard": str(copy / "tensorboard"),
    }  # fmt: skip


def test_counts_read_once_below_a_thousand():
    from flame.cli.inspect import _count

    assert (_count(100), _count(999), _count(1_234_567), _count(None)) == ("100", "999", "1.23M (1,234,567)", "-")
