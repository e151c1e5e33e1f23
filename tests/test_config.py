"""Configs: every shipped file validates; bad keys and values fail naming the key; overrides apply."""

from __future__ import annotations

import glob

import pytest

from storymm.config import ConfigError, load_config


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.yaml")))
def test_shipped_configs_validate(path):
    config = load_config(path)
    assert config.data.image_height > 0


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  image_heigth: 32\n")
    with pytest.raises(ConfigError, match=r"data\.image_heigth: unknown key"):
        load_config(bad)


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"data\.windows"):
        load_config(None, ["data.windows=some"])
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        load_config(None, ["data.batch_size=0"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["data.batch_size"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")


def test_overrides_are_typed():
    config = load_config("configs/tiny.yaml", ["data.batch_size=7", "data.tokenizer=train", "seed=3"])
    assert config.data.batch_size == 7 and config.data.tokenizer == "train" and config.seed == 3
