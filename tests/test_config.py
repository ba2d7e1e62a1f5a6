import dataclasses

import pytest

from lvm_ray.config import (PAPER_MODEL, Config, ConfigError, load_config, parse_override,
                            to_dict, from_dict)


def test_defaults_round_trip():
    cfg = Config()
    assert from_dict(Config, to_dict(cfg)) == cfg


def test_unknown_keys_are_errors_with_path(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match="train.lrr"):
        load_config(p)


def test_wrong_types_and_values_are_errors():
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(overrides={"train": {"lr": "fast"}})
    with pytest.raises(ConfigError, match="policy"):
        load_config(overrides={"window": {"policy": "random"}})
    with pytest.raises(ConfigError, match="sum to 1"):
        load_config(overrides={"split": {"train": 0.9}})
    with pytest.raises(ConfigError, match="min_context"):
        load_config(overrides={"window": {"context": 4, "min_context": 8}})


def test_presets_and_overrides_apply_in_order(tmp_path):
    cfg = load_config(presets=["small", "phase3"], overrides=parse_override("train.lr=3e-4"))
    assert cfg.window.context == 1000 and cfg.run.name == "phase3"
    assert cfg.train.lr == pytest.approx(3e-4)
    # Presets size the model; its input width comes from the bank it trains on.
    assert load_config(presets=["paper"]).model == dataclasses.replace(PAPER_MODEL, d_in=None)
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(presets=["huge"])


def test_yaml_not_a_mapping(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
