"""Every accelerate config in configs/accelerate/ parses as accelerate reads it and names a known setup."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "accelerate").glob("*.yaml"))


def test_the_documented_setups_ship():
    assert [p.stem for p in CONFIGS] == ["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp", "multi_node"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads(path):
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type in ("MULTI_GPU", "FSDP", "DEEPSPEED")
    assert config.mixed_precision == "bf16"
    if config.distributed_type == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] in (2, 3)
    if config.distributed_type == "FSDP":
        assert config.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
