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


def test_base_chain_merges_sections_and_replaces_values(tmp_path):
    (tmp_path / "parent.yaml").write_text(
        "data:\n  batch_size: 5\n  image_height: 40\nmodel:\n  visual_channels: [8, 16, 32]\n"
        "train:\n  sequence: {steps: 50, lr: 0.01}\n"
    )
    (tmp_path / "child.yaml").write_text("base: parent\ndata:\n  batch_size: 6\ntrain:\n  sequence: {steps: 70}\n")
    (tmp_path / "grandchild.yaml").write_text("base: child.yaml\nmodel:\n  visual_channels: [4, 8]\n")
    config = load_config(tmp_path / "grandchild.yaml", ["data.image_height=44"])
    assert (config.data.batch_size, config.data.image_height) == (6, 44)  # child over parent; --set over all
    assert config.model.visual_channels == [4, 8]  # lists are replaced, not merged
    assert (config.train.sequence.steps, config.train.sequence.lr) == (70, 0.01)  # nested mappings merge


def test_shipped_seed_configs_state_only_differences_from_gate():
    gate, retrained = load_config("configs/gate.yaml"), load_config("configs/gate_retrained.yaml")
    assert retrained.model.visual_backbone == "resnet18" and retrained.model.visual_latent == 128
    assert retrained.data == gate.data and retrained.train.sequence == gate.train.sequence
    assert len(open("configs/gate_retrained.yaml").read().split("\nbase:")[1].splitlines()) < 20


@pytest.mark.parametrize(
    "files, message",
    [
        ({"a.yaml": "base: missing.yaml\n"}, r"base 'missing.yaml' not found"),
        ({"a.yaml": "base: b\n", "b.yaml": "base: a\n"}, r"base chain loops"),
        ({"a.yaml": "base: [x]\n"}, r"base must name another config file"),
        (
            {"a.yaml": "data:\n  batch_size: [1\n"},
            r"a\.yaml: not valid YAML \(.* at line \d+, column \d+\): fix the file",
        ),
        ({"a.yaml": "base: b\n", "b.yaml": "data: {batch_size: 3\n"}, r"b\.yaml: not valid YAML"),
    ],
)
def test_bad_base_or_yaml_is_one_clear_error(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message) as raised:
        load_config(tmp_path / "a.yaml")
    assert "\n" not in str(raised.value)


def test_every_accepted_key_is_honoured_or_refused():
    with pytest.raises(ConfigError, match=r"train\.visual_ae\.freeze_autoencoders: only the sequence stage"):
        load_config(None, ["train.visual_ae.freeze_autoencoders=true"])
    assert load_config(None, ["train.sequence.freeze_autoencoders=true"]).train.sequence.freeze_autoencoders
    from storymm.training.stages import loss_weights

    assert loss_weights(load_config(None, ["loss.infonce_temperature=0.2"])).infonce_temperature == 0.2


def test_set_and_grid_follow_the_same_rules():
    from storymm.training.tune import parse_grid, trial_config

    grid = parse_grid(["model.visual_latent=16,32", "loss.gradient=0,0.1", "model.fusion=gate,concat"])
    assert grid == {"model.visual_latent": [16, 32], "loss.gradient": [0, 0.1], "model.fusion": ["gate", "concat"]}
    base = load_config("configs/tiny.yaml").to_dict()
    assert trial_config(base, {"model.visual_latent": 32}).model.visual_latent == 32
    for bad, message in [
        ({"model.visual_latnt": 32}, r"model\.visual_latnt: unknown key"),
        ({"seed.x": 1}, r"seed is not a section"),
    ]:
        with pytest.raises(ConfigError, match=message):
            trial_config(base, bad)
        with pytest.raises(ConfigError, match=message):
            load_config("configs/tiny.yaml", [f"{next(iter(bad))}={next(iter(bad.values()))}"])
    with pytest.raises(ConfigError, match=r"--grid loss\.gradient=0,\[: not valid YAML"):
        parse_grid(["loss.gradient=0,["])


def test_fp16_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"train\.mixed_precision: .*gradient scaler.*use bf16"):
        load_config(None, ["train.mixed_precision=fp16"])


def test_warp_image_head_needs_the_copy_path():
    assert load_config(None, ["model.image_head=warp"]).model.image_head == "warp"
    with pytest.raises(ConfigError, match=r"model.*image_head 'warp' warps the frames the copy path attends to"):
        load_config(None, ["model.image_head=warp", "model.copy_path=false"])
    with pytest.raises(ConfigError, match=r"model\.image_head"):
        load_config(None, ["model.image_head=flow"])
    with pytest.raises(ConfigError, match=r"synth\.scene"):
        load_config(None, ["synth.scene=film"])
