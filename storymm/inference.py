"""A trained sequence model ready to use, and the one function that runs it on windows.

``storymm evaluate`` and ``storymm predict`` both go through :func:`predict_batch`, so a story that
predict continues gets exactly the image and sentence that evaluation scores for the same window. A
:class:`TrainedModel` is the model together with what it takes to feed it (its resolved config and its
tokenizer), loaded from a run's checkpoint (:meth:`TrainedModel.from_run`) or from an export folder
(:func:`storymm.export.load_export`, which needs no run, no data and no network).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch

from storymm import storage
from storymm.config import Config, config_from_dict
from storymm.data.tokenizer import SentenceTokenizer
from storymm.errors import StorymmError
from storymm.training.run import RunFolder, TrainingError
from storymm.training.stages import TokenizerInfo, build_model, forward_sequence

log = logging.getLogger(__name__)

CHECKPOINTS = ("latest", "best")


def require_sequence_run(folder: RunFolder, record: dict, command: str) -> None:
    """Only the sequence stage continues stories; the autoencoder runs are its parts."""
    if record.get("stage") != "sequence":
        raise TrainingError(
            f"{folder.shown} is a {record.get('stage')} run; {command} takes a sequence run "
            "(storymm train --stage sequence, or WORK/runs/sequence-<fusion> of storymm pipeline)"
        )


def checkpoint_state(folder: RunFolder, which: str, purpose: str) -> dict:
    """The ``latest`` checkpoint, or the ``best`` by validation loss; a clear error without one."""
    if which == "best":
        state = folder.load_best(purpose=purpose)
        if state is None:
            raise TrainingError(f"{folder.shown} has no 'best' checkpoint (no validation ran)")
    elif which == "latest":
        state = folder.load_latest(purpose=purpose)
    else:
        raise ValueError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {which!r}")
    if state is None:
        raise TrainingError(f"{folder.shown} has no checkpoint yet: train it first")
    return state


def inference_model(config: Config, tokens: TokenizerInfo, state_dict: dict) -> torch.nn.Module:
    """The sequence model of ``config`` with ``state_dict`` loaded, in eval mode on the CPU.

    Built without ``model.backbone_weights``: the state dict holds every weight, so a ResNet file
    that only started the training is not needed (and need not exist) where the model is used."""
    if config.model.backbone_weights is not None:
        config = config.model_copy(deep=True)
        config.model.backbone_weights = None
    model = build_model("sequence", config, tokens)
    model.load_state_dict(state_dict)
    model.eval()
    return model


def tokenizer_info(tokenizer: SentenceTokenizer) -> TokenizerInfo:
    """The sizes and special ids a model is built with, from the tokenizer itself."""
    return TokenizerInfo(tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)


@dataclass
class TrainedModel:
    """A sequence model with its resolved config and tokenizer; ``origin`` says where it came from
    (a run URI or an export folder, safe to print) and ``checkpoint`` which of its checkpoints."""

    model: torch.nn.Module
    config: Config
    tokenizer: SentenceTokenizer
    step: int
    origin: str
    checkpoint: str
    run: str  # the run it was trained as (for an export: the run it was exported from)

    @property
    def tokens(self) -> TokenizerInfo:
        return tokenizer_info(self.tokenizer)

    @classmethod
    def from_run(cls, run_uri: str, which: str = "latest", command: str = "predict") -> TrainedModel:
        """The run's sequence model from its ``latest`` (or ``best``) checkpoint, and the tokenizer of
        the dataset it was trained on (which is where a run's tokenizer lives)."""
        from storymm.data.loader import PreparedDataset

        folder = RunFolder(run_uri)
        record = folder.read_record()
        require_sequence_run(folder, record, command)
        config = config_from_dict(record["config"], source=f"{folder.shown}/run.json")
        data_uri = record.get("data")
        try:
            dataset = PreparedDataset(data_uri)
            tokenizer = dataset.tokenizer
        except (StorymmError, OSError) as err:
            raise TrainingError(
                f"the tokenizer of {folder.shown} lives with its dataset {storage.redact(str(data_uri))}, which "
                f"cannot be read ({err}); run this where the dataset is, or use an export (storymm export)"
            ) from None
        state = checkpoint_state(folder, which, purpose=f"{command}: loading")
        model = inference_model(config, TokenizerInfo.from_manifest(dataset.manifest), state["model"])
        return cls(model, config, tokenizer, int(state["step"]), folder.shown, which, folder.shown)

    def to(self, device: torch.device | str) -> TrainedModel:
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def default_device() -> torch.device:
    """A GPU when there is one, else the CPU; but GPUs that ``CUDA_VISIBLE_DEVICES`` names and torch
    cannot use stop with one line (``devices.require_cuda``), as training does, not a silent CPU run."""
    from storymm.training.devices import requested_by_environment, require_cuda

    asked = requested_by_environment()
    if asked:
        require_cuda(asked)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Prediction(NamedTuple):
    """One batch of windows through the model: ``outputs`` (everything ``forward`` returned),
    ``image`` (the predicted frames, clamped to [0, 1]), ``tokens`` (the generated sentences,
    ``[B, max_tokens]``) and ``token_details`` (per generated token, what the text head reports
    beside the token; empty for heads that report nothing)."""

    outputs: dict[str, torch.Tensor]
    image: torch.Tensor
    tokens: torch.Tensor
    token_details: dict[str, torch.Tensor]


def generate_sentences(
    model,
    outputs: dict,
    batch: dict,
    max_tokens: int,
    *,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The next sentence of each window, ``[B, max_tokens]`` token ids, and per-token details.

    The one place where evaluation and predict generate text: a text head that can copy input tokens
    reads them from ``batch["tokens"]``; a head whose generation returns a dict gives its token ids as
    ``tokens`` and any other per-token tensors (``[B, T, ...]``: a copy probability, an attention over
    the input tokens) as details, which ``storymm predict`` writes to ``story.json``."""
    generated = model.text.generate(
        outputs["text_latent"], max_tokens, temperature=temperature, top_p=top_p, generator=generator
    )
    if isinstance(generated, dict):
        details = dict(generated)
        return details.pop("tokens"), details
    return generated, {}


@torch.no_grad()
def predict_batch(
    model,
    batch: dict,
    max_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Prediction:
    """The model on a batch of windows (``frames``, ``tokens`` and, for a tag model, ``tags``; with
    ``target_tokens``/``target_frame`` the outputs also hold what evaluation scores against them)."""
    outputs = forward_sequence(model, batch)
    tokens, details = generate_sentences(
        model, outputs, batch, max_tokens, temperature=temperature, top_p=top_p, generator=generator
    )
    return Prediction(outputs, outputs["image"].clamp(0, 1), tokens, details)
