"""``storymm predict``: continue a user's story with a trained model, frame by frame.

A story is a folder of images (any format Pillow reads, any size, taken in name order, numbers in
names compared as numbers) with ``sentences.txt`` (one sentence per image: a line each, or
StoryReasoning's ``<gdi imageN> … </gdi>`` text), or ``parquet:URI#story_id``, one row of a
StoryReasoning-format source (a ``.parquet`` file or a folder in one of the layouts ``prepare`` reads).
Each image is decoded, converted and resized by prepare's own :func:`~storymm.data.prepare.decode_frame`,
each sentence cleaned by the same tag parser (``<gdo>/<gda>/<gdl>`` spans become the tag features a
tag model reads), tokenized with the model's tokenizer and padded by the loader's own functions, and
the window goes through :func:`storymm.inference.predict_batch`, as in evaluation. So the images and
sentences prepare read for a test story give exactly the prediction ``storymm evaluate`` scores.

The last K frames are the input. With ``steps > 1`` each predicted frame is fed back as the newest
input, as its PNG holds it (8-bit) with its generated sentence re-read as text (and no tags), so a
folder holding those files continues the same way.

Everything is read, checked and predicted before anything is written; ``story.json`` is written last.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

import storymm
from storymm import storage
from storymm.data.gdi import FrameText, StoryParseError, clean_text, frame_texts, parse_story
from storymm.data.loader import pad_token_ids, sentence_lengths, tag_array
from storymm.data.prepare import decode_frame
from storymm.data.sources import find_parquet_files
from storymm.data.transfer import to_device
from storymm.errors import StorymmError, UsageError
from storymm.evaluation.render import CSS, fmt, image_uint8
from storymm.inference import Prediction, TrainedModel, default_device, predict_batch

log = logging.getLogger(__name__)

SENTENCES_FILE = "sentences.txt"
STORY_FILE = "story.json"
PAGE_FILE = "index.html"
PARQUET_PREFIX = "parquet:"
_PREDICTED_NAME = re.compile(r"next-\d+\.png")

#: What the explanation fields the current models return mean (``story.json`` ``fields``); a field a
#: newer model returns is written all the same, without a note.
FIELD_NOTES = {
    "attention": "the sequence model's pooling attention over the input frames (oldest first)",
    "copy_weights": "which input frame the image copy path took (after warping, with the warp head), oldest first",
    "copy_gate": "per pixel, the weight of the copied frame against the generated image (1 = all copied)",
    "warp_params": "per input frame (oldest first), the predicted warp (tx, ty, log_zoom) in affine_grid's "
    "normalised coordinates",
    "text_copy_weights": "which input sentence's latent the text copy path took, oldest first",
    "text_copy_gate": "the weight of the copied sentence latent against the generated one (1 = all copied)",
    "pointer_copy_probability": "pointer text head, per generated token: the probability that it was copied from "
    "an input sentence rather than generated (0 at the start token)",
    "pointer_attention": "pointer text head, per generated token: the attention over the input sentences' tokens "
    "(sentence oldest first, then token position)",
}

#: ``forward`` outputs that are the prediction itself or its latents, not an explanation of it.
_NOT_EXPLANATION = frozenset(
    {
        "image",
        "context",
        "visual_latent",
        "text_latent",
        "generated_image",
        "copied_image",
        "text_logits",
        "generate_text_logits",
    }
)


class StoryError(StorymmError, ValueError):
    """A story that cannot be continued as given; the message names the file and what to do."""


@dataclass
class StoryFrame:
    """One frame as the model reads it: ``pixels`` ``[H,W,3]`` uint8 at the model's size."""

    name: str
    pixels: np.ndarray
    text: FrameText


@dataclass
class Story:
    frames: list[StoryFrame]
    description: str


@dataclass
class PredictedFrame:
    name: str
    image: torch.Tensor  # [3,H,W] float in [0,1], as the model made it
    pixels: np.ndarray  # [H,W,3] uint8: what the PNG holds and what the next step reads
    sentence: str
    tokens: list[str]  # the generated word pieces, [CLS] to [SEP]
    inputs: list[str]  # names of the frames it was predicted from, oldest first
    explanation: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------- reading


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _suffix(name: str) -> str:
    return "." + name.rsplit(".", 1)[1].lower() if "." in name else ""


def _image_suffixes() -> frozenset[str]:
    Image.init()
    return frozenset(suffix.lower() for suffix in Image.registered_extensions())


def _decoded(image: Any, name: str, height: int, width: int) -> np.ndarray:
    try:
        raw = decode_frame(image, width, height)
    except ValueError as err:
        raise StoryError(f"{name} is not a readable image ({err}): replace or remove it") from None
    return np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)


def _texts(story_text: str, count: int, where: str, exact: bool) -> list[FrameText]:
    """One text per image: StoryReasoning ``<gdi>`` blocks, or one sentence per non-empty line.
    ``exact``: text for an image that is not there is an error too (a user's folder; a source row
    is read as prepare reads it, where extra blocks are ignored)."""
    if "<gdi" in story_text.lower():
        try:
            texts = frame_texts(story_text, count)
        except StoryParseError as err:
            if err.reason == "fewer_sentences_than_frames":
                raise StoryError(
                    f"{where}: fewer sentences than images ({err}): give every image its <gdi imageN> text"
                ) from None
            raise StoryError(f"{where}: {err} (StoryReasoning <gdi imageN> … </gdi> text expected)") from None
        extra = sorted(number for number in parse_story(story_text) if number > count)
        if exact and extra:
            raise StoryError(
                f"{where} has text for image(s) {extra[:5]} of only {count} images (more sentences than images): "
                "give one sentence per image"
            )
        return texts
    lines = [clean_text(line) for line in story_text.splitlines() if line.strip()]
    if len(lines) != count:
        fewer = "fewer" if len(lines) < count else "more"
        raise StoryError(
            f"{where} has {len(lines)} sentences for {count} images ({fewer} sentences than images): "
            "give one sentence per image, a line each, in the images' name order"
        )
    return [FrameText(sentence=line) for line in lines]


def _folder_story(folder: str, height: int, width: int, context: int) -> Story:
    shown = storage.redact(folder)
    suffixes = _image_suffixes()
    files = [uri for uri in storage.list_files(folder) if _suffix(storage.basename(uri)) in suffixes]
    if not files and not storage.exists(folder):
        raise StoryError(f"story folder {shown} does not exist")
    files.sort(key=lambda uri: _natural_key(storage.basename(uri)))
    if len(files) < context:
        raise StoryError(
            f"story {shown} has {len(files)} image(s); the model reads the last {context}: give at least {context}"
        )
    try:
        text = storage.read_text(storage.join(folder, SENTENCES_FILE))
    except FileNotFoundError:
        raise StoryError(
            f"story {shown} has no {SENTENCES_FILE}: write one sentence per image (a line each, in name order)"
        ) from None
    except UnicodeDecodeError:
        raise StoryError(f"{shown}/{SENTENCES_FILE} is not UTF-8 text") from None
    texts = _texts(text, len(files), f"{shown}/{SENTENCES_FILE}", exact=True)
    frames = []
    for uri, frame_text in zip(files, texts):
        name = storage.basename(uri)
        frames.append(StoryFrame(name, _decoded(storage.read_bytes(uri), f"{shown}/{name}", height, width), frame_text))
    return Story(frames, shown)


def _source_row(uri: str, story_id: str) -> dict:
    """The row of ``story_id`` in a parquet file, or in any file of a source folder's layouts."""
    files = [uri] if storage.is_file(uri) else [f for split in find_parquet_files(uri).values() for f in split]
    for file_uri in files:
        parquet = pq.ParquetFile(storage.open_input_file(file_uri))
        if "story_id" not in parquet.schema_arrow.names:
            raise StoryError(f"{storage.redact(file_uri)} has no story_id column: not a StoryReasoning-format file")
        ids = parquet.read(columns=["story_id"]).column("story_id").to_pylist()
        if story_id not in ids:
            continue
        index = ids.index(story_id)
        for group in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if index < rows:
                return parquet.read_row_group(group).slice(index, 1).to_pylist()[0]
            index -= rows
    raise StoryError(f"no story {story_id!r} in {storage.redact(uri)} ({len(files)} parquet file(s) searched)")


def _parquet_story(spec: str, height: int, width: int, context: int) -> Story:
    uri, hash_sign, story_id = spec[len(PARQUET_PREFIX) :].rpartition("#")
    if not hash_sign or not uri or not story_id:
        raise UsageError(f"--story {spec!r}: write a source row as parquet:URI#story_id")
    row = _source_row(uri, story_id)
    images = row.get("images") or []
    where = f"story {story_id!r} of {storage.redact(uri)}"
    if len(images) < context:
        raise StoryError(f"{where} has {len(images)} image(s); the model reads the last {context}")
    texts = _texts(row.get("story") or "", len(images), where, exact=False)
    frames = [
        StoryFrame(f"image {i}", _decoded(image, f"{where}, image {i}", height, width), text)
        for i, (image, text) in enumerate(zip(images, texts), start=1)
    ]
    return Story(frames, f"{storage.redact(uri)}#{story_id}")


def read_story(spec: str, height: int, width: int, context: int) -> Story:
    """Every frame of the story ``spec`` at ``height`` x ``width``, checked (see the module docstring)."""
    if spec.startswith(PARQUET_PREFIX):
        return _parquet_story(spec, height, width, context)
    if storage.is_file(spec):
        raise StoryError(
            f"--story {storage.redact(spec)} is a file: give a folder of images with {SENTENCES_FILE}, "
            "or parquet:URI#story_id"
        )
    return _folder_story(spec, height, width, context)


# -------------------------------------------------------------------------------- predicting


def window_batch(frames: list[StoryFrame], trained: TrainedModel) -> dict:
    """One window as a batch of one on the host, built as the loader builds its batches (uint8 pixels,
    made floats on the device by ``transfer.to_device``; sentence lengths that stay on the host)."""
    data, model = trained.config.data, trained.config.model
    tokenizer = trained.tokenizer
    ids = tokenizer.encode_batch([frame.text.sentence for frame in frames])
    tokens = torch.from_numpy(pad_token_ids(ids, data.max_tokens, tokenizer.pad_id, tokenizer.eos_id))
    batch = {
        "frames": torch.from_numpy(np.stack([frame.pixels for frame in frames])).permute(0, 3, 1, 2)[None],
        "tokens": tokens[None],
        "token_lengths": sentence_lengths(tokens, tokenizer.pad_id)[None],
    }
    if model.tag_features:
        spans = [(f.text.objects, f.text.actions, f.text.locations) for f in frames]
        batch["tags"] = torch.from_numpy(tag_array(spans, model.tag_vocab, model.max_tags))[None]
    return batch


def _values(tensor: torch.Tensor) -> Any:
    """A tensor as JSON numbers (6 decimals: far below what the model resolves)."""
    return np.round(tensor.detach().to("cpu", torch.float64).numpy(), 6).tolist()


def explanation(prediction: Prediction, index: int, generated_length: int) -> dict[str, Any]:
    """Everything the model returned for window ``index`` besides the prediction itself: the copy
    weights and gates, the warp, the attention, and whatever per-token details the text head gives
    (cut to the ``generated_length`` tokens it generated)."""
    fields = {}
    for name, value in prediction.outputs.items():
        if name in _NOT_EXPLANATION or name.startswith(("shared_", "target_")) or not torch.is_tensor(value):
            continue
        fields[name] = _values(value[index])
    for name, value in prediction.token_details.items():
        fields[name] = _values(value[index][:generated_length])
    return fields


def continue_story(
    trained: TrainedModel, story: Story, steps: int = 1, temperature: float = 0.0, top_p: float = 1.0
) -> tuple[list[StoryFrame], list[PredictedFrame]]:
    """Predict ``steps`` frames after the last K of ``story``: the inputs used and the predictions."""
    k = trained.config.data.context_frames
    window = list(story.frames[-k:])
    inputs = list(window)
    tokenizer = trained.tokenizer
    device = trained.device
    generator = torch.Generator(device=device).manual_seed(trained.config.seed)
    predicted: list[PredictedFrame] = []
    for step in range(1, steps + 1):
        batch = to_device(window_batch(window, trained), device)
        result = predict_batch(
            trained.model,
            batch,
            trained.config.data.max_tokens,
            temperature=temperature,
            top_p=top_p,
            generator=generator,
        )
        ids = result.tokens[0].tolist()
        length = ids.index(tokenizer.eos_id) + 1 if tokenizer.eos_id in ids else len(ids)
        image = result.image[0].detach().cpu()
        frame = PredictedFrame(
            name=f"next-{step}.png",
            image=image,
            pixels=image_uint8(image),
            sentence=tokenizer.decode(ids),
            tokens=[tokenizer.tokenizer.id_to_token(i) for i in ids[:length]],
            inputs=[f.name for f in window],
            explanation=explanation(result, 0, length),
        )
        predicted.append(frame)
        log.info("predicted %s: %s", frame.name, frame.sentence)
        window = window[1:] + [StoryFrame(frame.name, frame.pixels, FrameText(sentence=clean_text(frame.sentence)))]
    return inputs, predicted


# ---------------------------------------------------------------------------------- writing


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _summary(value: Any) -> str:
    """An explanation field in a few characters: small ones in full, maps as mean/min/max."""
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 0:
        return fmt(float(array))
    if array.size <= 16:
        rows = array.reshape(array.shape[0], -1) if array.ndim > 1 else array[None]
        return "; ".join(" ".join(fmt(float(x)) for x in row) for row in rows)
    return f"mean {fmt(float(array.mean()))}, min {fmt(float(array.min()))}, max {fmt(float(array.max()))}"


def _figure(pixels: np.ndarray, title: str, sentence: str, predicted: bool) -> str:
    b64 = base64.b64encode(png_bytes(pixels)).decode("ascii")
    kind = "predicted" if predicted else "input"
    return (
        f'<figure class="{kind}"><img alt="{html.escape(title)}" src="data:image/png;base64,{b64}">'
        f"<figcaption><strong>{html.escape(title)}</strong>{' (predicted)' if predicted else ''}<br>"
        f"{html.escape(sentence)}</figcaption></figure>"
    )


PAGE_CSS = """
.strip { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; margin: 1em 0; }
.strip figure { margin: 0; width: 200px; }
.strip img { width: 100%; image-rendering: pixelated; }
.strip figure.predicted img { border: 3px solid #c0392b; }
.strip figcaption { font-size: 0.9em; margin-top: 4px; }
.arrow { align-self: center; font-size: 2em; color: #888; }
"""


def story_page(record: dict, inputs: list[StoryFrame], predicted: list[PredictedFrame]) -> str:
    """``index.html``: the strip (inputs, then predictions, with their sentences) and the explanation
    of each prediction; self-contained (images embedded), every text from the user escaped."""
    model = record["model"]
    figures = [_figure(f.pixels, f.name, f.text.sentence, False) for f in inputs]
    figures.append('<div class="arrow">&rarr;</div>')
    figures += [_figure(f.pixels, f.name, f.sentence, True) for f in predicted]
    names = list(dict.fromkeys(name for frame in predicted for name in frame.explanation))
    head = "".join(f"<th>{html.escape(f.name)}</th>" for f in predicted)
    rows = "\n".join(
        f"<tr><td><code>{html.escape(name)}</code></td><td>{html.escape(FIELD_NOTES.get(name, ''))}</td>"
        + "".join(
            f"<td>{html.escape(_summary(f.explanation[name])) if name in f.explanation else '—'}</td>"
            for f in predicted
        )
        + "</tr>"
        for name in names
    )
    size = f"{model['image_size'][0]}x{model['image_size'][1]}"
    title = "storymm: a story continued"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{title}</title>",
            f"<style>{CSS}{PAGE_CSS}</style></head><body>",
            f"<h1>{title}</h1>",
            f"<p>Story <code>{html.escape(record['story'])}</code>: the last {len(inputs)} of its "
            f"{record['story_frames']} frames, as the model saw them ({size} pixels), then {len(predicted)} "
            f"predicted frame(s), each fed back as the newest input. Model <code>{html.escape(model['origin'])}"
            f"</code> ({html.escape(str(model['checkpoint']))} checkpoint, step {model['step']}); "
            f"{html.escape(_generation_text(record['generation']))}.</p>",
            f'<div class="strip">{"".join(figures)}</div>',
            "<h2>How each frame was predicted</h2>",
            "<p>What the model reports beside each prediction (all values in <code>story.json</code>; per input "
            "frame, oldest first).</p>",
            f"<table>\n<thead><tr><th>field</th><th>meaning</th>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>",
            "</body></html>",
            "",
        ]
    )


def _generation_text(generation: dict) -> str:
    if not generation["temperature"]:
        return "sentences decoded greedily"
    return f"sentences sampled at temperature {generation['temperature']}, top-p {generation['top_p']}"


def story_record(
    trained: TrainedModel, story: Story, inputs: list[StoryFrame], predicted: list[PredictedFrame], generation: dict
) -> dict:
    cfg = trained.config
    notes = {name: FIELD_NOTES[name] for frame in predicted for name in frame.explanation if name in FIELD_NOTES}
    return {
        "storymm": storymm.__version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model": {
            "origin": trained.origin,
            "run": trained.run,
            "checkpoint": trained.checkpoint,
            "step": trained.step,
            "image_size": [cfg.data.image_height, cfg.data.image_width],
            "context_frames": cfg.data.context_frames,
            "fusion": cfg.model.fusion,
            "copy_path": cfg.model.copy_path,
            "image_head": cfg.model.image_head,
            "device": str(trained.device),
        },
        "story": story.description,
        "story_frames": len(story.frames),
        "generation": generation,
        "inputs": [
            {
                "name": f.name,
                "sentence": f.text.sentence,
                "objects": f.text.objects,
                "actions": f.text.actions,
                "locations": f.text.locations,
            }
            for f in inputs
        ],
        "predictions": [
            {
                "image": f.name,
                "sentence": f.sentence,
                "tokens": f.tokens,
                "inputs": f.inputs,
                "explanation": f.explanation,
            }
            for f in predicted
        ],
        "fields": notes,
    }


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def story_json(value: Any, indent: str = "") -> str:
    """JSON with objects and lists of lists indented, lists of plain values on one line each (a gate
    map is a row per line, not a number per line)."""
    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(str(k), ensure_ascii=False)}: {story_json(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and value and not all(_is_scalar(v) for v in value):
        return "[\n" + ",\n".join(inner + story_json(v, inner) for v in value) + "\n" + indent + "]"
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def write_prediction(out_uri: str, record: dict, inputs: list[StoryFrame], predicted: list[PredictedFrame]) -> dict:
    """``next-N.png``, ``index.html``, then ``story.json`` (the completion marker) under ``out_uri``;
    an earlier prediction's files there are removed first. Returns ``{name: uri}``."""
    storage.ensure_bucket(out_uri)
    storage.delete(storage.join(out_uri, STORY_FILE))
    for uri in storage.list_files(out_uri):
        if _PREDICTED_NAME.fullmatch(storage.basename(uri)):
            storage.delete(uri)
    written = {}
    for frame in predicted:
        written[frame.name] = storage.join(out_uri, frame.name)
        storage.write_bytes(written[frame.name], png_bytes(frame.pixels))
    written[PAGE_FILE] = storage.join(out_uri, PAGE_FILE)
    storage.write_text(written[PAGE_FILE], story_page(record, inputs, predicted))
    written[STORY_FILE] = storage.join(out_uri, STORY_FILE)
    storage.write_text(written[STORY_FILE], story_json(record) + "\n")
    return written


def load_model(run: str | None, model_dir: str | None, checkpoint: str | None) -> TrainedModel:
    """The model of ``--run`` (its ``latest`` or ``best`` checkpoint) or of ``--model`` (an export)."""
    if (run is None) == (model_dir is None):
        raise UsageError("give the model as --run RUN_URI or --model EXPORT_DIR (one of them)")
    if model_dir is not None:
        if checkpoint is not None:
            raise UsageError("--checkpoint picks a run's checkpoint; an export holds one (choose it at export)")
        from storymm.export import load_export

        return load_export(model_dir)
    return TrainedModel.from_run(run, checkpoint or "latest", command="predict")


def predict(
    story_spec: str,
    out_uri: str,
    *,
    run: str | None = None,
    model_dir: str | None = None,
    checkpoint: str | None = None,
    steps: int = 1,
    temperature: float | None = None,
    top_p: float | None = None,
    device: torch.device | str | None = None,
) -> dict:
    """Continue the story ``story_spec`` by ``steps`` frames and write the result under ``out_uri``;
    returns ``story.json``'s record with ``files`` (``{name: uri}``) added."""
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    trained = load_model(run, model_dir, checkpoint).to(device or default_device())
    cfg = trained.config
    story = read_story(story_spec, cfg.data.image_height, cfg.data.image_width, cfg.data.context_frames)
    generation = {
        "temperature": cfg.eval.temperature if temperature is None else temperature,
        "top_p": cfg.eval.top_p if top_p is None else top_p,
        "seed": cfg.seed,
    }
    inputs, predicted = continue_story(trained, story, steps, generation["temperature"], generation["top_p"])
    record = story_record(trained, story, inputs, predicted, generation)
    files = write_prediction(out_uri, record, inputs, predicted)
    return {**record, "files": files}
