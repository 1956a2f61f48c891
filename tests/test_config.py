import dataclasses
import json
import math

import pytest

from flame import config as run_config
from flame.config import TrainConfig, field_docs, load, parse_cache, resolve, save
from flame.errors import ConfigError


def test_every_field_has_a_docstring():
    assert set(field_docs()) == {f.name for f in dataclasses.fields(TrainConfig)}


def test_seed_train_sh_keys_are_fields():
    seed_keys = (
        "type lr steps batch update warmup context path project model data name cache checkpoint "
        "save limit logging seed varlen scheduler decay beta1 beta2 norm epochs"
    ).split()
    assert set(seed_keys) <= {f.name for f in dataclasses.fields(TrainConfig)}


def test_parse_cache_weights():
    assert parse_cache("a") == [("a", 1.0)]
    assert parse_cache("a:0.7, b/c:0.3") == [("a", 0.7), ("b/c", 0.3)]
    assert parse_cache("x:y") == [("x:y", 1.0)]


def test_a_weight_that_is_no_number_is_named(tmp_path):
    (tmp_path / "m.json").write_text("{}")
    (tmp_path / "data").mkdir()
    cfg = TrainConfig(model=str(tmp_path / "m.json"), cache=f"{tmp_path / 'data'}:abc")
    with pytest.raises(ConfigError, match=r"--cache .*data:abc: the weight after the colon, 'abc', is not a number"):
        resolve(cfg)


def test_validate_collects_every_problem(tmp_path):
    cfg = TrainConfig(model=str(tmp_path / "nope.json"), cache="", lr=-1, batch=0, scheduler="step", context=1)
    with pytest.raises(ConfigError) as e:
        resolve(cfg)
    msg = str(e.value)
    for part in ("--model", "--cache is required", "--lr must be > 0", "--batch must be >= 1", "--scheduler"):
        assert part in msg
    assert "--context must be >= 2 (a token and the next one to predict), got 1" in msg  # every update was NaN
    cfg = TrainConfig(model=str(tmp_path / "nope.json"), cache="x", steps=10, epochs=-1)
    with pytest.raises(ConfigError, match="--epochs must be >= 0, got -1"):
        resolve(cfg)


def test_resolve_fills_defaults(tmp_path):
    (tmp_path / "m.json").write_text("{}")
    data = tmp_path / "data" / "org" / "ds" / "sub" / "train"
    data.mkdir(parents=True)
    cfg = TrainConfig(model=str(tmp_path / "m.json"), data="org/ds", name="sub", scheduler="cosine_with_min_lr")
    import os

    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        cfg = resolve(cfg, model_type="gla")
    finally:
        os.chdir(old)
    assert cfg.cache == str(data)  # absolute: `flame resume` works from any directory
    assert cfg.type == "gla"
    assert cfg.path == "exp/gla"
    assert cfg.scheduler == "cosine"


def test_save_and_load_round_trip(tmp_path):
    cfg = TrainConfig(model="m.json", cache="d", lr=1e-3, varlen=True, bf16_residual=True)
    path = run_config.save(cfg, tmp_path)
    assert path == tmp_path / "config.json"
    assert run_config.load(tmp_path) == cfg


def test_a_run_saved_before_share_casts_existed_resumes_without_them(tmp_path):
    """--share-casts is on by default now; a run whose config.json predates it trained with autocast's own casts."""
    saved = run_config.save(TrainConfig(model="m.json", cache="d"), tmp_path)
    old = {k: v for k, v in json.loads(saved.read_text()).items() if k not in ("share_casts", "bf16_residual")}
    saved.write_text(json.dumps(old))
    assert TrainConfig().share_casts is True
    assert run_config.load(tmp_path) == TrainConfig(model="m.json", cache="d", share_casts=False)


def test_a_run_saved_before_grouped_projections_existed_resumes_without_them(tmp_path):
    """Projections are grouped by default now (None: wherever it applies); a run saved before trained them one by
    one, and resumes so, as it trained."""
    saved = run_config.save(TrainConfig(model="m.json", cache="d"), tmp_path)
    old = {k: v for k, v in json.loads(saved.read_text()).items() if k != "group_projections"}
    saved.write_text(json.dumps(old))
    assert TrainConfig().group_projections is None
    assert run_config.load(tmp_path).group_projections is False
    assert json.loads(saved.read_text()) == old  # read, never rewritten
    fresh = run_config.save(TrainConfig(model="m.json", cache="d"), tmp_path / "new")
    assert run_config.load(fresh.parent).group_projections is None  # a run saved today keeps the default


def test_load_refuses_unknown_keys(tmp_path):
    (tmp_path / "config.json").write_text('{"lr": 1.0, "bogus": 2}')
    with pytest.raises(ConfigError, match="unknown keys bogus"):
        run_config.load(tmp_path)


@pytest.mark.parametrize("option", ["lr", "decay", "norm", "eps", "epochs", "min_lr"])
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_non_finite_numbers_are_refused_by_name(tmp_path, option, value):
    (tmp_path / "m.json").write_text("{}")
    (tmp_path / "d").mkdir()
    cfg = TrainConfig(model=str(tmp_path / "m.json"), cache=str(tmp_path / "d"), **{option: value})
    with pytest.raises(ConfigError, match=f"--{option.replace('_', '-')} must be a finite number, got {value}"):
        resolve(cfg)


def test_cache_weights_must_be_finite_and_the_cache_must_name_a_dataset(tmp_path):
    (tmp_path / "m.json").write_text("{}")
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match="--cache weight of .* must be a number > 0, got nan"):
        resolve(TrainConfig(model=str(tmp_path / "m.json"), cache=f"{tmp_path / 'd'}:nan"))
    with pytest.raises(ConfigError, match="names no dataset"):
        resolve(TrainConfig(model=str(tmp_path / "m.json"), cache=","))


@pytest.mark.parametrize(
    "text, problem",
    [("{not json", "is not valid JSON"), ("", "is not valid JSON"), ("[1]", "is not a flame run config"),
     ('{"batch": "x"}', "values of the wrong type: batch = 'x' \\(want int\\)"),
     ('{"cuda_graphs": "yes"}', "values of the wrong type: cuda_graphs = 'yes' \\(want bool or null\\)")],
)  # fmt: skip
def test_a_damaged_run_config_is_one_clear_error(tmp_path, text, problem):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=problem):
        load(tmp_path)


@pytest.mark.parametrize("value", [None, True, False])
def test_cuda_graphs_is_saved_and_read_back_as_default_on_or_off(tmp_path, value):
    save(TrainConfig(cuda_graphs=value), tmp_path)
    assert load(tmp_path).cuda_graphs is value


def test_a_file_where_a_folder_belongs_is_named_as_a_file(tmp_path):
    (tmp_path / "m.json").write_text("{}")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "manifest.json").write_text("{}")
    cfg = TrainConfig(model=str(tmp_path / "m.json"), cache=str(tmp_path / "d" / "manifest.json"))
    with pytest.raises(ConfigError, match="--cache .*manifest.json is a file; give the folder"):
        resolve(cfg)
    cfg = TrainConfig(model=str(tmp_path / "m.json"), cache=str(tmp_path / "d"), checkpoint=str(tmp_path / "m.json"))
    with pytest.raises(ConfigError, match="--checkpoint .*m.json is a file; give a RUN/checkpoints/step-N folder"):
        resolve(cfg)
