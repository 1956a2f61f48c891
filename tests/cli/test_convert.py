"""`flame convert from-llama` through the CLI: the table on success, one red line and exit 1 on bad input."""

import json

import pytest
from typer.testing import CliRunner

from flame.cli.app import app
from tests.tiny_models import make_llama, target_config

runner = CliRunner()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("src") / "llama", "llama", max_shard_size="40KB")


def convert(*args):
    return runner.invoke(app, ["convert", "from-llama", *map(str, args)])


def test_from_llama_prints_the_table(llama, tmp_path):
    cfg = target_config(tmp_path / "gdn.json", "gated_deltanet")
    result = convert("--model", llama, "--config", cfg, "--output", tmp_path / "out", "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    # 17 copied, the 4 GQA k/v reshaped (2 -> 4 kv heads), 18 Gated DeltaNet tensors newly initialised
    rows = [line.split() for line in lines]  # piped: plain columns
    assert ["copied", "17"] in [r[:2] for r in rows]
    assert ["reshaped", "4"] in [r[:2] for r in rows]
    assert ["newly", "initialised", "18"] in [r[:3] for r in rows]
    assert any(r[:1] == ["total"] and r[-1] == "100.00%" for r in rows)
    assert not set("│─┃━┏┡└") & set(result.output)
    assert "  model.layers.0.attn.k_proj.weight: 2 -> 4 kv heads (repeated)" in lines
    assert "  model.layers.*.attn.A_log (2)" in lines
    assert "verified: 21 written tensors equal their source (read back after saving)" in lines
    assert f"wrote {tmp_path / 'out'}" in lines
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_existing_output_is_one_error_line(llama, tmp_path):
    (tmp_path / "out").mkdir()
    result = convert("--model", llama, "--config", target_config(tmp_path / "c.json"), "--output", tmp_path / "out")
    assert result.exit_code == 1
    fix = "pass --overwrite to replace it, or choose another --output"
    assert result.output.strip() == f"error: --output {tmp_path / 'out'} exists: {fix}"


def test_not_llama_is_one_error_line(tmp_path):
    (tmp_path / "m").mkdir()
    config = {"model_type": "mamba", "architectures": ["MambaForCausalLM"]}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    cfg = target_config(tmp_path / "c.json")
    result = convert("--model", tmp_path / "m", "--config", cfg, "--output", tmp_path / "o")
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "is a MambaForCausalLM model, not Llama-family" in result.output
    assert "Traceback" not in result.output


def test_layer_count_mismatch_is_one_error_line(llama, tmp_path):
    cfg = target_config(tmp_path / "c.json", num_hidden_layers=4)
    result = convert("--model", llama, "--config", cfg, "--output", tmp_path / "o")
    assert result.exit_code == 1
    assert "num_hidden_layers=4 but the source has 2" in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_a_cpu_machine_gets_no_deepspeed_accelerator_warning(llama, tmp_path):
    # a fresh process: DeepSpeed prints "Setting accelerator to CPU ... unable to detect it" when first imported
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    cfg = target_config(tmp_path / "gla.json", "gla")
    args = ["--model", str(llama), "--config", str(cfg), "--output", str(tmp_path / "out")]
    result = subprocess.run(
        [sys.executable, "-m", "flame", "convert", "from-llama", *args], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "accelerator" not in result.stdout + result.stderr
