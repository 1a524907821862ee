from __future__ import annotations

import pytest
import yaml

from conftest import REPO, run_cli
from kagglekit.config import Config, describe_fields, load_config
from kagglekit.errors import ConfigError

PRESETS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem  # the default run folder is named after the file


def test_deberta_preset_has_the_seed_settings():
    cfg = load_config(REPO / "configs" / "deberta-v3-base.yaml")
    assert cfg.model.backbone == "microsoft/deberta-v3-base"
    assert cfg.model.max_length == 1280
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.1)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.grad_accum) == (5, 2, 16)
    assert cfg.train.lr == 2e-5 and cfg.train.scheduler == "cosine"
    assert cfg.train.label_smoothing == 0.1 and cfg.train.patience == 3
    assert cfg.seed == 42 and cfg.train.swap_augment is True


def test_overrides_are_yaml_scalars():
    cfg = load_config(None, ["train.lr=1e-4", "lora.enabled=false", "model.backbone=/path/to/model", "train.epochs=2"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.lora.enabled is False
    assert cfg.model.backbone == "/path/to/model"
    assert cfg.train.epochs == 2


def test_tune_override_takes_a_dotted_key():
    cfg = load_config(None, ["tune.train.lr={low: 1.0e-5, high: 1.0e-3, log: true}"])
    assert cfg.tune["train.lr"].log is True


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lerning_rate=1", "train.lerning_rate is not a field (did you mean train.lr?)"),
        ("train.learning_rate=1", "did you mean train.lr?"),
        ("trian.lr=1", "trian is not a field (did you mean train?)"),
        ("model.backbon=x", "did you mean model.backbone?"),
        ("train.lr=abc", "train.lr"),
        ("train.lr=-1", "train.lr: Input should be greater than 0"),
        ("model.truncation=middle", "model.truncation"),
        ("tune.train.lrr={low: 1, high: 2}", "train.lrr is not a field (did you mean train.lr?)"),
        ("tune.train.lr={low: 3, high: 2}", "low 3.0 is above high 2.0"),
        ("no_equals_sign", "expected key.path=value"),
    ],
)
def test_bad_config_names_the_key(override, expected):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert expected in str(exc.value)
    assert str(exc.value).startswith("config error:")


def test_typo_in_file_is_reported_with_file_name(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"c.yaml: train.lerning_rate is not a field \(did you mean train.lr\?\)"):
        load_config(p)


def test_invalid_yaml_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_every_field_is_documented():
    rows = describe_fields()
    assert len(rows) > 30
    undocumented = [k for k, _, doc in rows if not doc]
    assert not undocumented


def test_resolved_config_round_trips():
    cfg = load_config(None, ["train.lr=3e-4", "name=x"])
    again = Config.model_validate(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_cli_config_error_is_one_line(tmp_path):
    r = run_cli("config", "--set", "train.lerning_rate=1")
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines() == ["error: config error: --set train.lerning_rate is not a field (did you mean train.lr?)"]
    assert "Traceback" not in r.output
