"""The three training stages: what model each builds and how a batch becomes a loss.

``visual_ae`` and ``text_ae`` pretrain the autoencoders on every frame of the windows; ``sequence``
trains the story model on top of them (loaded from their runs with ``--init-from``).

Every model variant reaches the models here (``docs/variants.md``): ``model.visual_backbone``,
``backbone_weights``, ``decoder_extra_layers``, ``decoder_skips``/``skip_dropout`` (visual AE),
``model.text_encoder`` (LSTM or frozen MiniLM), ``model.tag_features`` (sequence model input, and
the loader's ``tags``), and the loss terms ``loss.perceptual`` (VGG16 on ``loss.perceptual_weights``),
``loss.gradient`` and ``loss.cross_modal_infonce``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from storymm.config import Config
from storymm.data.loader import PreparedDataset, WindowLoader
from storymm.models import StoryContinuationModel, TextAutoencoder, VisualAutoencoder
from storymm.models.pointer import swap_words
from storymm.models.text import HostLengths
from storymm.training import losses

STAGES = ("visual_ae", "text_ae", "sequence")


@dataclass
class TokenizerInfo:
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    @classmethod
    def from_manifest(cls, manifest: dict) -> TokenizerInfo:
        info = manifest["tokenizer"]
        return cls(info["vocab_size"], info["pad_id"], info["bos_id"], info["eos_id"])


def build_visual(config: Config) -> VisualAutoencoder:
    return VisualAutoencoder(
        latent_dim=config.model.visual_latent,
        image_size=(config.data.image_height, config.data.image_width),
        channels=tuple(config.model.visual_channels),
        backbone=config.model.visual_backbone,
        backbone_weights=config.model.backbone_weights,
        extra_layers=config.model.decoder_extra_layers,
        skips=config.model.decoder_skips,
        skip_dropout=config.model.skip_dropout,
    )


def build_text(config: Config, tokens: TokenizerInfo) -> TextAutoencoder:
    cls = TextAutoencoder
    if config.model.text_encoder == "minilm":
        from storymm.models.minilm import MiniLMTextAutoencoder as cls
    return cls(
        vocab_size=tokens.vocab_size,
        latent_dim=config.model.text_latent,
        embed_dim=config.model.embed_dim,
        hidden_dim=config.model.text_hidden,
        pad_id=tokens.pad_id,
        bos_id=tokens.bos_id,
        eos_id=tokens.eos_id,
    )


def build_model(stage: str, config: Config, tokens: TokenizerInfo) -> torch.nn.Module:
    if stage == "visual_ae":
        return build_visual(config)
    if stage == "text_ae":
        return build_text(config, tokens)
    if stage == "sequence":
        return StoryContinuationModel(
            build_visual(config),
            build_text(config, tokens),
            fusion=config.model.fusion,
            hidden_dim=config.model.sequence_hidden,
            copy_path=config.model.copy_path,
            tag_vocab=config.model.tag_vocab if config.model.tag_features else 0,
            image_head=config.model.image_head,
            context_frames=config.data.context_frames,
            text_head=config.model.text_head,
            pointer_story_gradient=config.model.pointer_story_gradient,
            pointer_generate_loss=config.model.pointer_generate_loss > 0,
        )
    raise ValueError(f"unknown stage {stage!r} (choose from {', '.join(STAGES)})")


def loss_weights(config: Config) -> losses.LossWeights:
    names = {f.name for f in fields(losses.LossWeights)}
    weights = {k: v for k, v in config.loss.model_dump().items() if k in names}
    if config.model.text_head == "pointer":
        weights["generate_text"] = config.model.pointer_generate_loss
    return losses.LossWeights(**weights)


def loader_options(config: Config) -> dict:
    """Extra ``WindowLoader`` arguments the model needs (the tags, with ``model.tag_features``)."""
    if config.model.tag_features:
        return {"tag_vocab": config.model.tag_vocab, "max_tags": config.model.max_tags}
    return {}


def window_loader(
    dataset: PreparedDataset,
    split: str,
    config: Config,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    tags: bool = True,
    **options,
) -> WindowLoader:
    """A loader with the config's data settings (K, tokens per sentence, windows, prefetch) and, with
    ``tags``, the sequence model's tag features; ``options`` say how this use walks the split
    (shuffle, equalize, text, window ids)."""
    return WindowLoader(
        dataset,
        split,
        batch_size=batch_size,
        context_frames=config.data.context_frames,
        max_tokens=config.data.max_tokens,
        windows=config.data.windows,
        rank=rank,
        world_size=world_size,
        prefetch_chunks=config.data.prefetch_chunks,
        **(loader_options(config) if tags else {}),
        **options,
    )


def build_perceptual(config: Config) -> torch.nn.Module | None:
    """The frozen VGG16 perceptual module when ``loss.perceptual > 0`` (a clear error without weights)."""
    if not config.loss.perceptual:
        return None
    path = config.loss.perceptual_weights
    try:
        return losses.VGGPerceptual(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"loss.perceptual = {config.loss.perceptual}: {err}") from None


def forward_sequence(model, batch: dict) -> dict:
    """The sequence model on a loader batch (with its ``tags`` when the loader yields them, its
    sentence lengths, which stay on the host: ``HostLengths``, and the pointer's renamed sentences when
    the training step swapped words); a story being continued by ``storymm predict`` has no targets."""
    extra = {key: batch[key] for key in ("tags", "source_tokens", "text_target_tokens") if key in batch}
    if "token_lengths" in batch:
        extra["input_lengths"] = HostLengths(batch["token_lengths"])
    if "target_lengths" in batch:
        extra["target_lengths"] = HostLengths(batch["target_lengths"])
    return model(batch["frames"], batch["tokens"], batch.get("target_tokens"), batch.get("target_frame"), **extra)


def batch_loss_fn(stage: str, config: Config, tokens: TokenizerInfo) -> Callable:
    """``fn(model, batch) -> (loss, {term: detached 0-d tensor})`` for the stage; batch already on the
    device. Terms stay tensors so a step never waits for the device; the loop reads them when it logs."""
    weights = loss_weights(config)
    perceptual = build_perceptual(config) if stage in ("visual_ae", "sequence") else None
    swap_rate = config.model.pointer_word_swap if config.model.text_head == "pointer" else 0.0

    def _perceptual_on(device):
        if perceptual is not None and perceptual.mean.device != device:
            perceptual.to(device)
        return perceptual

    def visual(model, batch):
        images = torch.cat([batch["frames"].flatten(0, 1), batch["target_frame"]])
        return losses.visual_ae_loss(model(images), images, weights, _perceptual_on(images.device), floats=False)

    def text(model, batch):
        sentences = torch.cat([batch["tokens"].flatten(0, 1), batch["target_tokens"]])
        lengths = None
        if "token_lengths" in batch:  # counted by the loader, on the host
            lengths = HostLengths(torch.cat([batch["token_lengths"].flatten(), batch["target_lengths"]]))
        return losses.text_ae_loss(model(sentences, lengths), sentences, weights, tokens.pad_id, floats=False)

    def sequence(model, batch):
        if swap_rate and model.training:
            batch = dict(batch)
            batch["source_tokens"], batch["text_target_tokens"] = swap_words(
                batch["tokens"],
                batch["target_tokens"],
                swap_rate,
                tokens.vocab_size,
                pad_id=tokens.pad_id,
                eos_id=tokens.eos_id,
                keep=(tokens.bos_id,),
            )
        return losses.sequence_loss(
            forward_sequence(model, batch),
            batch,
            weights,
            tokens.pad_id,
            _perceptual_on(batch["target_frame"].device),
            floats=False,
        )

    return {"visual_ae": visual, "text_ae": text, "sequence": sequence}[stage]


def windows_per_step(stage: str, batch_size: int, context: int) -> int:
    """Samples a step consumes, for throughput: images/sentences for the AEs, windows otherwise."""
    return batch_size * (context + 1) if stage in ("visual_ae", "text_ae") else batch_size


def unused_parameters(stage: str, config: Config, tokens: TokenizerInfo, model: torch.nn.Module) -> list[str]:
    """Trainable parameters this stage's loss never reaches under ``config``, found by one
    forward/backward of a dummy batch on a copy (RNG untouched).

    Nothing in the models branches on data, so the set is the same every step: empty for every
    shipped config (frozen parts have ``requires_grad=False`` and do not count), non-empty when a
    zero loss weight cuts a branch off (``loss.context: 0`` -> the visual context head;
    ``loss.text: 0`` in the sequence stage -> the text decoder). DDP needs
    ``find_unused_parameters`` only then.
    """
    d = config.data
    k, batch_size = d.context_frames, 2
    ids = torch.full((batch_size, k + 1, d.max_tokens), tokens.eos_id, dtype=torch.long)
    ids[..., 0] = tokens.bos_id
    batch = {
        "frames": torch.full((batch_size, k, 3, d.image_height, d.image_width), 0.5),
        "tokens": ids[:, :-1].contiguous(),
        "target_frame": torch.full((batch_size, 3, d.image_height, d.image_width), 0.5),
        "target_tokens": ids[:, -1].contiguous(),
    }
    if stage == "sequence" and config.model.tag_features:
        batch["tags"] = torch.ones((batch_size, k, config.model.max_tags), dtype=torch.long)
    probe = copy.deepcopy(model).cpu().train()
    with torch.random.fork_rng(devices=[]):
        loss, _ = batch_loss_fn(stage, config, tokens)(probe, batch)
        loss.backward()
    return [name for name, p in probe.named_parameters() if p.requires_grad and p.grad is None]
