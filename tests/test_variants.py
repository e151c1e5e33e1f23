"""Every model variant of the seed studies and beyond (docs/variants.md) trains on real shards and its
loss falls; the seed configs validate; ``storymm experiment`` runs three configs end to end and
writes the comparison table with every metric and floor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from storymm.cli import main as cli_main
from storymm.config import ConfigError, load_config
from storymm.data.loader import PreparedDataset, WindowLoader, hash_tags
from storymm.evaluation.evaluate import evaluate
from storymm.evaluation.metrics import HIGHER_IS_BETTER
from storymm.experiment import ExperimentError, run_experiment
from storymm.models import VisualAutoencoder
from storymm.training.loop import read_metrics, train
from storymm.training.stages import TokenizerInfo, build_model, build_perceptual

from small import SMALL, small_dataset
from small import small_config as shared_small_config

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "train.visual_ae.warmup_steps=2",
    "train.text_ae.warmup_steps=2",
    "train.sequence.warmup_steps=2",
    "train.visual_ae.log_every=1",
    "train.text_ae.log_every=1",
    "train.sequence.log_every=1",
]


def small_config(*extra: str, base: str = "tiny"):
    return shared_small_config(*FAST, *extra, base=base)


@pytest.fixture(scope="module")
def data_uri(tmp_path_factory):
    return small_dataset(str(tmp_path_factory.mktemp("variants")), 40, seed=5, frames=(6, 10), config=small_config())


@pytest.fixture(scope="module")
def bert_data_uri(tmp_path_factory):
    """Shards tokenized with bert-base-uncased (MiniLM reads those ids directly)."""
    return small_dataset(
        str(tmp_path_factory.mktemp("variants-bert")),
        16,
        seed=6,
        frames=(6, 8),
        config=small_config("data.tokenizer=bert-base-uncased"),
    )


@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory):
    """A random-init VGG16 trunk (features.0-15, what the perceptual loss reads) saved to a file."""
    from torchvision.models import vgg16

    torch.manual_seed(0)
    state = {
        k: v
        for k, v in vgg16(weights=None).state_dict().items()
        if k.startswith("features.") and int(k.split(".")[1]) < 16
    }
    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    torch.save(state, path)
    return str(path)


def _totals(run: str) -> list[float]:
    return [m["total"] for m in read_metrics(run)]


def assert_loss_falls(run: str, term: str = "total") -> dict:
    metrics = read_metrics(run)
    values = [m[term] for m in metrics]
    assert len(values) >= 4, values
    assert min(values[-3:]) < values[0], f"{term} did not fall: {values}"
    return metrics[-1]


# ------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", ["baseline", "gate", "gate_retrained"])
def test_seed_configs_validate_and_say_what_they_are(name):
    config = load_config(ROOT / f"configs/{name}.yaml")
    assert (config.data.image_height, config.data.image_width) == (60, 125)
    if name == "baseline":
        m = config.model
        assert (m.visual_latent, m.text_latent, m.fusion, m.copy_path) == (16, 16, "concat", False)
    if name == "gate_retrained":
        m, loss = config.model, config.loss
        assert (m.visual_backbone, m.visual_latent, m.text_latent, m.fusion) == ("resnet18", 128, 128, "gate")
        assert loss.perceptual > 0 and loss.gradient > 0
    # tiny variants for tests and the latent sweep: overrides reach the variant keys
    tiny = load_config(ROOT / f"configs/{name}.yaml", SMALL + ["model.visual_latent=32", "model.text_latent=64"])
    assert (tiny.model.visual_latent, tiny.model.text_latent) == (32, 64)


def test_variant_keys_validate_with_clear_errors():
    with pytest.raises(ConfigError, match=r"model\.visual_backbone"):
        load_config(None, ["model.visual_backbone=vgg"])
    with pytest.raises(ConfigError, match=r"model\.text_encoder"):
        load_config(None, ["model.text_encoder=bert"])
    with pytest.raises(ConfigError, match=r"model\.decoder_extra_layers"):
        load_config(None, ["model.decoder_extra_layers=-1"])
    with pytest.raises(ConfigError, match="visual_latent .* must equal model.text_latent.*or use fusion gate"):
        load_config(
            None,
            ["loss.cross_modal_infonce=0.5", "model.visual_latent=32", "model.text_latent=64", "model.fusion=concat"],
        )
    # the gate fusion's shared space takes latents of different sizes
    load_config(None, ["loss.cross_modal_infonce=0.5", "model.visual_latent=32", "model.text_latent=64"])


def test_perceptual_without_weights_file_is_a_clear_error(tmp_path):
    config = small_config("loss.perceptual=0.1", f"loss.perceptual_weights={tmp_path / 'nope.pth'}")
    with pytest.raises(FileNotFoundError, match="loss.perceptual .*VGG16 weights"):
        build_perceptual(config)
    torch.save({"classifier.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a VGG16 state_dict"):
        build_perceptual(small_config("loss.perceptual=0.1", f"loss.perceptual_weights={tmp_path / 'bad.pth'}"))


# ------------------------------------------------------------------------------------ models


def test_default_visual_autoencoder_is_unchanged_and_skips_start_as_identity():
    plain = VisualAutoencoder(16, (32, 64), (8, 16, 16))
    assert not any(k.startswith(("refine", "skip_proj")) for k in plain.state_dict())
    torch.manual_seed(0)
    skip = VisualAutoencoder(16, (32, 64), (8, 16, 16), skips=True, extra_layers=1).eval()
    x = torch.rand(3, 3, 32, 64)
    z, maps = skip.encode_with_features(x)
    assert torch.allclose(z, skip.encode(x))
    # zero-initialised projections: with or without skips the fresh decoder gives the same image
    assert torch.allclose(skip.decode(z, maps)["content"], skip.decode(z)["content"])
    # the predicted latent alone decodes (no encoder features exist for the frame to predict)
    assert skip.decode(torch.randn(2, 16))["content"].shape == (2, 3, 32, 64)


def test_resnet18_backbone_reads_local_weights(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(1)
    state = resnet18(weights=None).state_dict()
    torch.save(state, tmp_path / "r18.pth")
    model = VisualAutoencoder(
        16, (32, 64), (8, 16, 16), backbone="resnet18", backbone_weights=str(tmp_path / "r18.pth")
    )
    assert torch.equal(model.backbone.net[0].weight, state["conv1.weight"])


def test_hash_tags_are_stable_and_bounded():
    ids = hash_tags(["red circle"], ["moves left"], ["the meadow"], 64, 5)
    assert ids == hash_tags(["red circle"], ["moves left"], ["the meadow"], 64, 5)
    assert len(ids) == 5 and all(1 <= i < 64 for i in ids)
    assert hash_tags([], [], [], 64, 5) == []


# ------------------------------------------------------------------------------------ training


def test_resnet18_visual_ae_with_perceptual_and_gradient_losses(data_uri, vgg_weights, tmp_path):
    config = small_config(
        "model.visual_backbone=resnet18",
        "model.decoder_extra_layers=2",
        "loss.perceptual=0.1",
        f"loss.perceptual_weights={vgg_weights}",
        "loss.gradient=0.1",
        "train.visual_ae.steps=8",
        "train.visual_ae.lr=0.003",
        "data.batch_size=3",
    )
    run = str(tmp_path / "vis")
    train(config, "visual_ae", data_uri, run, progress=False)
    last = assert_loss_falls(run)
    assert {"perceptual", "gradient", "l1"} <= set(last)
    assert_loss_falls(run, "l1")


def test_skip_decoder_visual_ae_and_sequence(data_uri, vgg_weights, tmp_path):
    config = small_config(
        "model.decoder_skips=true",
        "model.decoder_extra_layers=1",
        "train.visual_ae.steps=8",
        "train.sequence.steps=10",
        "loss.perceptual=0.05",
        f"loss.perceptual_weights={vgg_weights}",
        "data.batch_size=4",
    )
    vis, seq = str(tmp_path / "vis"), str(tmp_path / "seq")
    train(config, "visual_ae", data_uri, vis, progress=False)
    assert_loss_falls(vis)
    train(config, "sequence", data_uri, seq, init_from=[vis], progress=False)
    assert "perceptual" in assert_loss_falls(seq)
    report = evaluate(seq, data_uri, "test", None, progress=False)
    assert report["metrics"]["image_l1"] is not None


@pytest.mark.parametrize("text_latent", [16, 24])  # equal sizes: the latents; unequal: gate's shared space
def test_cross_modal_infonce(data_uri, tmp_path, text_latent):
    config = small_config("loss.cross_modal_infonce=1.0", "train.sequence.steps=12", f"model.text_latent={text_latent}")
    run = str(tmp_path / "seq")
    train(config, "sequence", data_uri, run, progress=False)
    assert_loss_falls(run)
    assert_loss_falls(run, "cross_modal_infonce")


def test_warp_image_head_trains_and_evaluates(data_uri, tmp_path):
    config = small_config("model.image_head=warp", "train.sequence.steps=12")
    run = str(tmp_path / "seq")
    train(config, "sequence", data_uri, run, progress=False)
    assert_loss_falls(run)
    report = evaluate(run, data_uri, "test", None, progress=False)  # rebuilds the warp head from run.json
    assert report["metrics"]["image_l1"] is not None


def test_tag_features_loader_and_sequence(data_uri, tmp_path):
    dataset = PreparedDataset(data_uri)
    loader = WindowLoader(dataset, "train", batch_size=4, context_frames=4, max_tokens=20, tag_vocab=256, max_tags=6)
    batch = next(iter(loader))
    assert batch["tags"].shape == (4, 4, 6) and batch["tags"].dtype == torch.int64
    assert (batch["tags"] > 0).any() and int(batch["tags"].max()) < 256
    plain = next(iter(WindowLoader(dataset, "train", batch_size=4, context_frames=4, max_tokens=20)))
    assert "tags" not in plain and torch.equal(plain["frames"], batch["frames"])  # additive: same windows

    config = small_config(
        "model.tag_features=true", "model.tag_vocab=256", "model.max_tags=6", "train.sequence.steps=12"
    )
    run = str(tmp_path / "seq")
    train(config, "sequence", data_uri, run, progress=False)
    assert_loss_falls(run)
    model = build_model("sequence", config, TokenizerInfo.from_manifest(dataset.manifest))
    with pytest.raises(ValueError, match="tag features"):
        model(batch["frames"], batch["tokens"])
    report = evaluate(run, data_uri, "test", None, progress=False)  # the evaluation passes the tags too
    assert report["metrics"]["image_l1"] is not None


def test_minilm_text_encoder(bert_data_uri, data_uri, tmp_path):
    config = small_config(
        "model.text_encoder=minilm", "train.text_ae.steps=10", "train.sequence.steps=8", "train.text_ae.lr=0.005"
    )
    txt, seq = str(tmp_path / "txt"), str(tmp_path / "seq")
    train(config, "text_ae", bert_data_uri, txt, progress=False)
    assert_loss_falls(txt)
    train(config, "sequence", bert_data_uri, seq, init_from=[txt], progress=False)
    assert_loss_falls(seq)
    state = torch.load(Path(txt) / "checkpoints" / "step-00000010.pt", weights_only=True)
    assert not any("encoder" in k for k in state["model"]), "MiniLM weights must stay out of the checkpoint"
    # a dataset with another tokenizer is refused with a clear error
    with pytest.raises(ValueError, match="bert-base-uncased"):
        train(config, "text_ae", data_uri, str(tmp_path / "bad"), progress=False)


# ------------------------------------------------------------------------------------ experiment


def test_experiment_refuses_mismatched_data_before_training(data_uri, tmp_path):
    with pytest.raises(ExperimentError, match="prepared at 32x64"):
        run_experiment(data_uri, str(tmp_path / "work"), ["baseline"], SMALL, progress=False, say=lambda *_: None)
    assert not (tmp_path / "work" / "runs").exists()
    with pytest.raises(ExperimentError, match="no config named"):
        run_experiment(data_uri, str(tmp_path / "work"), ["nope"], SMALL, progress=False, say=lambda *_: None)


@pytest.mark.slow
def test_experiment_three_seed_configs_end_to_end(data_uri, vgg_weights, tmp_path, capsys):
    work = tmp_path / "work"
    sets = (
        SMALL
        + FAST
        + [
            "data.image_height=32",
            "data.image_width=64",
            "data.max_tokens=20",
            "train.visual_ae.steps=3",
            "train.text_ae.steps=3",
            "train.sequence.steps=3",
            f"loss.perceptual_weights={vgg_weights}",
            "eval.median_windows=64",
            "eval.samples=2",
        ]
    )
    args = ["experiment", "--data", data_uri, "--work", str(work), "--configs", "baseline,gate,gate_retrained"]
    assert cli_main(args + sum((["--set", s] for s in sets), [])) == 0
    table = (work / "reports" / "comparison.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| metric"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == ["baseline", "gate", "gate_retrained"]
    for metric in HIGHER_IS_BETTER:
        assert f"| {metric}" in table, metric
    for floor in ("median_image_l1", "median_image_mse", "copy_last_l1", "copy_last_mse"):
        assert f"floor: {floor}" in table, floor
    for name in ("baseline", "gate", "gate_retrained"):
        report = json.loads((work / "reports" / name / "report.json").read_text())
        assert report["step"] == 3
        for stage in ("visual_ae", "text_ae", "sequence"):
            assert (work / "runs" / name / stage / "checkpoints" / "latest").exists()
    runs = json.loads((work / "runs" / "gate_retrained" / "visual_ae" / "run.json").read_text())
    assert runs["config"]["model"]["visual_backbone"] == "resnet18"
    assert runs["config"]["loss"]["perceptual"] > 0
    summary = json.loads((work / "reports" / "comparison.json").read_text())
    assert set(summary["metrics"]) == {"baseline", "gate", "gate_retrained"}
    assert "comparison:" in capsys.readouterr().out
