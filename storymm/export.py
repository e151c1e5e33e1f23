"""``storymm export``: a trained sequence model as a folder that needs nothing else to run.

    <out>/model.safetensors   the weights (safetensors: no pickled code, readable from other tools)
    <out>/config.json         the run's resolved config (a valid ``--config`` file: JSON is YAML)
    <out>/tokenizer.json      the tokenizer the run was trained with
    <out>/README.md           a card: what the model is, its data, its latest report's metrics and floors
    <out>/export.json         what was exported from where, and the sha256 of each file loading reads

``export.json`` is written last, so a folder without it is an unfinished export. :func:`load_export`
checks every file against the hash recorded at export and refuses a folder where one is missing or
different, naming it; the card is documentation and free to edit.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging

import safetensors.torch
import torch
from tokenizers import Tokenizer

import storymm
from storymm import storage
from storymm.config import config_from_dict
from storymm.data.tokenizer import SentenceTokenizer
from storymm.errors import StorymmError
from storymm.evaluation.render import md_cell
from storymm.inference import TrainedModel, inference_model, tokenizer_info
from storymm.training.run import RunFolder

log = logging.getLogger(__name__)

EXPORT_FILE = "export.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
CARD_FILE = "README.md"
#: The files a load reads, each checked against its recorded hash.
MODEL_FILES = (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE)
FORMAT = "storymm-export"
FORMAT_VERSION = 1


class ExportError(StorymmError, RuntimeError):
    """An export folder that cannot be loaded as it is; the message says which file and what to do."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weights_bytes(model: torch.nn.Module) -> bytes:
    """The state dict as safetensors bytes (each tensor copied: safetensors refuses shared storage)."""
    tensors = {name: value.detach().to("cpu").contiguous().clone() for name, value in model.state_dict().items()}
    return safetensors.torch.save(tensors, metadata={"format": "pt"})


def export_model(run_uri: str, out_uri: str, checkpoint: str = "latest") -> dict:
    """Write the run's sequence model (its ``latest`` or ``best`` checkpoint) to ``out_uri``; returns
    the export record. Everything is loaded and checked before the first file is written."""
    trained = TrainedModel.from_run(run_uri, checkpoint, command="export")
    record = RunFolder(run_uri).read_record()
    files = {
        WEIGHTS_FILE: weights_bytes(trained.model),
        CONFIG_FILE: (json.dumps(trained.config.to_dict(), indent=2) + "\n").encode("utf-8"),
        TOKENIZER_FILE: trained.tokenizer.to_json().encode("utf-8"),
    }
    export = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "storymm": storymm.__version__,
        "exported": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "run": trained.origin,
        "checkpoint": checkpoint,
        "step": trained.step,
        "data": storage.redact(str(record.get("data"))),
        "parameters": sum(p.numel() for p in trained.model.parameters()),
        "files": {name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in files.items()},
    }
    card = model_card(export, trained, record, RunFolder(run_uri).latest_report())

    storage.ensure_bucket(out_uri)
    storage.delete(storage.join(out_uri, EXPORT_FILE))  # an earlier export stops being valid first
    for name, data in files.items():
        storage.write_bytes(storage.join(out_uri, name), data)
    storage.write_text(storage.join(out_uri, CARD_FILE), card)
    storage.write_text(storage.join(out_uri, EXPORT_FILE), json.dumps(export, indent=2) + "\n")
    return export


def _dataset_lines(data_uri: str | None) -> list[str]:
    """What the card says about the training data: its URI and, when its manifest is readable, its
    source, sizes and image size."""
    from storymm.data.loader import PreparedDataset

    lines = [f"Trained on the prepared dataset `{md_cell(data_uri)}`."]
    try:
        manifest = PreparedDataset(str(data_uri)).manifest
    except (StorymmError, OSError) as err:
        return lines + [f"(Its manifest could not be read at export: {md_cell(str(err))}.)"]
    kept = manifest.get("kept_stories") or {}
    lines.append(
        f"Source: `{md_cell(manifest.get('source'))}`; stories kept: "
        + ", ".join(f"{split} {count}" for split, count in kept.items())
        + f"; frames {manifest['image_size'][0]}x{manifest['image_size'][1]} (height x width)."
    )
    return lines


def _report_lines(latest: tuple[str, dict] | None, step: int) -> list[str]:
    from storymm.evaluation.report import TABLE_COLUMNS, metrics_rows, render_table, verdict_line

    if latest is None:
        return [
            "No evaluation report of this run was found (`storymm evaluate --run RUN --data DATA --out REPORT` "
            "writes one and notes it in the run)."
        ]
    uri, report = latest
    at = f"step {report.get('step')}" + (" (this export)" if report.get("step") == step else f", not {step}")
    lines = [
        f"From the run's latest report, `{md_cell(uri)}`: {md_cell(report.get('split'))} split, "
        f"{md_cell(report.get('windows'))} windows, {at}, {md_cell(report.get('checkpoint'))} checkpoint.",
        "",
        f"**{md_cell(report.get('verdict') or verdict_line(report))}**",
        "",
    ]
    table, _ = render_table(metrics_rows(report), TABLE_COLUMNS)
    return lines + [table]


def model_card(export: dict, trained: TrainedModel, record: dict, latest: tuple[str, dict] | None) -> str:
    """The README.md of an export: what the model is, how to use it, its data and its latest report."""
    m, d = trained.config.model, trained.config.data
    lines = [
        f"# storymm story-continuation model ({m.fusion} fusion, {m.image_head} image head)",
        "",
        f"Exported by storymm {export['storymm']} on {export['exported']} from run `{md_cell(export['run'])}` "
        f"({export['checkpoint']} checkpoint, step {export['step']}). Given the last {d.context_frames} frames "
        "of a story (images and sentences) it predicts the next frame's image and sentence.",
        "",
        "## Use",
        "",
        "```sh",
        "storymm predict --model THIS_FOLDER --story FOLDER --out OUT [--steps N]",
        "```",
        "",
        "FOLDER holds the story's images (any common format and size, taken in name order) and",
        "`sentences.txt` (one sentence per image, or StoryReasoning's `<gdi imageN>` text).",
        "",
        "## Model",
        "",
        "| setting | value |",
        "|---|---|",
        f"| frames | {d.image_height}x{d.image_width} (height x width), {d.context_frames} input frames |",
        f"| sentences | up to {d.max_tokens} tokens, {trained.tokenizer.vocab_size}-word-piece vocabulary |",
        f"| fusion / copy path / image head | {m.fusion} / {'yes' if m.copy_path else 'no'} / {m.image_head} |",
        f"| latents (visual, text) | {m.visual_latent}, {m.text_latent} |",
        f"| text encoder / tag features | {m.text_encoder} / {'yes' if m.tag_features else 'no'} |",
        f"| parameters | {export['parameters']:,} |",
        "",
        "## Data",
        "",
        *_dataset_lines(record.get("data")),
        "",
        "## Evaluation",
        "",
        *_report_lines(latest, export["step"]),
        "",
        "## Files",
        "",
        "| file | sha256 |",
        "|---|---|",
        *[f"| {name} | `{entry['sha256']}` |" for name, entry in export["files"].items()],
        "",
        f"`{EXPORT_FILE}` records these hashes; loading refuses a folder whose files differ from them.",
        "",
    ]
    return "\n".join(lines)


def _read_checked(folder: str, name: str, expected: dict, shown: str) -> bytes:
    uri = storage.join(folder, name)
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise ExportError(f"export {shown} is incomplete: {name} is missing; re-run storymm export") from None
    if _sha256(data) != expected.get("sha256"):
        raise ExportError(
            f"export {shown}: {name} does not match the hash recorded at export ({len(data)} bytes, "
            f"{expected.get('bytes')} exported): it was changed or damaged; re-run storymm export"
        )
    return data


def load_export(uri: str) -> TrainedModel:
    """The model of an export folder, after checking each file against ``export.json``."""
    shown = storage.redact(uri)
    try:
        export = json.loads(storage.read_text(storage.join(uri, EXPORT_FILE)))
    except FileNotFoundError:
        raise ExportError(
            f"{shown} is not a storymm export (no {EXPORT_FILE}; an export still being written has none yet): "
            "make one with storymm export --run RUN --out DIR"
        ) from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ExportError(f"{shown}/{EXPORT_FILE} is not valid JSON ({err}): re-run storymm export") from None
    if not isinstance(export, dict) or export.get("format") != FORMAT:
        raise ExportError(f"{shown}/{EXPORT_FILE} is not a storymm export record: re-run storymm export")
    if export.get("format_version") != FORMAT_VERSION:
        raise ExportError(
            f"{shown} is export format {export.get('format_version')}, this storymm reads {FORMAT_VERSION}: "
            "re-export the run with this version"
        )
    recorded = export.get("files") or {}
    data = {name: _read_checked(uri, name, recorded.get(name) or {}, shown) for name in MODEL_FILES}
    config = config_from_dict(json.loads(data[CONFIG_FILE]), source=f"{shown}/{CONFIG_FILE}")
    tokenizer = SentenceTokenizer(Tokenizer.from_str(data[TOKENIZER_FILE].decode("utf-8")))
    model = inference_model(config, tokenizer_info(tokenizer), safetensors.torch.load(data[WEIGHTS_FILE]))
    return TrainedModel(model, config, tokenizer, int(export["step"]), shown, export["checkpoint"], export["run"])
