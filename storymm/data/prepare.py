"""prepare: source stories → validated, resized, tokenized training shards plus a manifest.

Every source row ends in exactly one place: a kept story (maybe minus some bad frames, counted)
or a rejection with a reason. The manifest, written last, records the accounting
(``source_rows == sum(kept_stories) + sum(rejected)``) and readers refuse a dataset without one.
Decoding, resizing and tokenizing happen here once, so training epochs only copy bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

import storymm
from storymm import storage
from storymm.config import Config
from storymm.data.gdi import FrameText, StoryParseError, frame_texts, parse_story
from storymm.data.sources import SOURCE_SPLITS, open_source
from storymm.data.tokenizer import TOKENIZER_FILE, SentenceTokenizer, build_tokenizer
from storymm.progress import Progress

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
OUTPUT_SPLITS = ("train", "val", "test")


def shard_schema(height: int, width: int) -> pa.Schema:
    """One row per kept story; frames are raw RGB uint8 (H*W*3 bytes), decoded and resized once."""
    return pa.schema(
        [
            ("story_id", pa.string()),
            ("source_split", pa.string()),
            ("frame_index", pa.list_(pa.int32())),
            ("frames", pa.list_(pa.binary(height * width * 3))),
            ("sentences", pa.list_(pa.string())),
            ("token_ids", pa.list_(pa.list_(pa.int32()))),
            ("objects", pa.list_(pa.list_(pa.string()))),
            ("actions", pa.list_(pa.list_(pa.string()))),
            ("locations", pa.list_(pa.list_(pa.string()))),
        ]
    )


# ----------------------------------------------------------------------------- per-row checks


@dataclass
class RowOutcome:
    story_id: str | None
    reason: str | None = None  # set when rejected
    frames: list[bytes] = field(default_factory=list)
    texts: list[FrameText] = field(default_factory=list)
    frame_index: list[int] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)


def decode_frame(image: object, width: int, height: int) -> bytes:
    """Decode one source image and resize it to ``width``x``height`` RGB; raises ValueError(reason)."""
    data = image.get("bytes") if isinstance(image, dict) else image
    if not data:
        raise ValueError("empty_image")
    try:
        with Image.open(io.BytesIO(data)) as picture:
            picture.draft("RGB", (width * 2, height * 2))  # JPEG: decode at reduced scale, much faster
            if picture.mode in ("RGBA", "LA") or (picture.mode == "P" and "transparency" in picture.info):
                background = Image.new("RGB", picture.size, (0, 0, 0))
                background.paste(picture.convert("RGBA"), mask=picture.convert("RGBA").getchannel("A"))
                picture = background
            else:
                picture = picture.convert("RGB")
            resized = picture.resize((width, height), Image.Resampling.BILINEAR)
            return resized.tobytes()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise ValueError("undecodable_image") from None


def check_row(row: dict, *, min_frames: int, width: int, height: int) -> RowOutcome:
    """Validate and decode one source row. A problem of the row becomes a reason; a bug in storymm
    (any other exception) surfaces instead of turning every row into a rejection."""
    story_id = row.get("story_id")
    outcome = RowOutcome(story_id=story_id)
    try:
        if not isinstance(story_id, str) or not story_id.strip():
            outcome.reason = "missing_story_id"
            return outcome
        images = row.get("images") or []
        if len(images) == 0:
            outcome.reason = "no_images"
            return outcome
        frame_count = row.get("frame_count")
        if frame_count is not None and int(frame_count) != len(images):
            outcome.reason = "frame_count_mismatch"
            return outcome
        try:
            texts = frame_texts(row.get("story"), len(images))
        except StoryParseError as err:
            outcome.reason = err.reason
            return outcome
        for index, (image, text) in enumerate(zip(images, texts)):
            try:
                outcome.frames.append(decode_frame(image, width, height))
            except ValueError as err:
                outcome.dropped[str(err)] += 1
                continue
            outcome.texts.append(text)
            outcome.frame_index.append(index)
        if len(outcome.frames) < min_frames:
            outcome.reason = "too_few_usable_frames"
            outcome.frames, outcome.texts = [], []
    except (TypeError, ValueError) as err:  # a field of the wrong type or value (bytes that are not bytes, ...)
        log.warning("row %r rejected: a malformed field: %s", story_id, err)
        outcome.reason, outcome.frames, outcome.texts = "malformed_row", [], []
    return outcome


def assign_split(story_id: str, source_split: str, seed: int, val_fraction: float) -> str:
    """Deterministic train/val split by story id; the source's test split stays test."""
    if source_split == "test":
        return "test"
    digest = hashlib.sha256(f"{seed}:{story_id}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if position < val_fraction else "train"


# ------------------------------------------------------------------------------------ writing


def shard_record(outcome: RowOutcome, source_split: str, token_ids: list[list[int]]) -> dict:
    """The shard row of a kept story (``shard_schema``'s columns)."""
    return {
        "story_id": outcome.story_id,
        "source_split": source_split,
        "frame_index": outcome.frame_index,
        "frames": outcome.frames,
        "sentences": [t.sentence for t in outcome.texts],
        "token_ids": token_ids,
        "objects": [t.objects for t in outcome.texts],
        "actions": [t.actions for t in outcome.texts],
        "locations": [t.locations for t in outcome.texts],
    }


def shard_path(split: str, index: int) -> str:
    return f"{split}/part-{index:05d}.parquet"


def write_shard(data_uri: str, split: str, index: int, records: list[dict], schema: pa.Schema) -> dict:
    """Encode ``records`` as shard ``index`` of ``split``, publish it; return its manifest entry.
    The bytes depend only on the records, so whoever writes a shard writes the same file."""
    table = pa.Table.from_pylist(records, schema=schema)
    sink = io.BytesIO()
    # Small row groups let a reader stream a shard without holding all of it.
    pq.write_table(table, sink, compression="zstd", row_group_size=max(1, min(32, len(records))))
    data = sink.getvalue()
    relative = shard_path(split, index)
    storage.write_bytes(storage.join(data_uri, relative), data)
    return {
        "path": relative,
        "rows": len(records),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "frame_counts": [len(r["frames"]) for r in records],
    }


class ShardWriter:
    """Buffers kept stories of one split and publishes fixed-size parquet shards."""

    def __init__(self, data_uri: str, split: str, schema: pa.Schema, rows_per_shard: int):
        self.data_uri, self.split, self.schema, self.rows_per_shard = data_uri, split, schema, rows_per_shard
        self.buffer: list[dict] = []
        self.shards: list[dict] = []

    def add(self, record: dict) -> None:
        self.buffer.append(record)
        if len(self.buffer) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        self.shards.append(write_shard(self.data_uri, self.split, len(self.shards), self.buffer, self.schema))
        self.buffer = []


class Accounting:
    """Where every source row went, counted in source order (the order decides which copy of a
    duplicated story id is kept): rows per source split, rejections and dropped frames by reason."""

    def __init__(self):
        self.rejected: Counter = Counter()
        self.dropped: Counter = Counter()
        self.source_rows: Counter = Counter()
        self.seen_ids: set[str] = set()

    def admit(self, source_split: str, outcome: RowOutcome) -> bool:
        """Count the next row of the source; True when its story is kept."""
        self.source_rows[source_split] += 1
        if outcome.reason is None and outcome.story_id in self.seen_ids:
            outcome.reason = "duplicate_story_id"
        if outcome.reason is not None:
            self.rejected[outcome.reason] += 1
            return False
        self.seen_ids.add(outcome.story_id)
        self.dropped.update(outcome.dropped)
        return True


def _clear_previous(data_uri: str) -> None:
    """Remove an earlier dataset's manifest first (so it is never valid half-way), then its shards."""
    storage.delete(storage.join(data_uri, MANIFEST_FILE))
    for split in OUTPUT_SPLITS:
        storage.delete(storage.join(data_uri, split))


def _training_sentences(source, batch_size: int):
    for batch in source.iter_batches("train", batch_size, columns=("story",)):
        for row in batch:
            try:
                parsed = parse_story(row.get("story"))
            except StoryParseError:
                continue
            for frame in parsed.values():
                yield frame.sentence


def _checked_locally(source, check, threads: int):
    """(source split, outcomes) batch by batch in source order, rows checked by a thread pool."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for source_split in SOURCE_SPLITS:
            for batch in source.iter_batches(source_split, batch_size=64):
                yield source_split, list(pool.map(check, batch))


def prepare(
    source_spec: str,
    data_uri: str,
    config: Config,
    progress: bool = True,
    backend: str = "local",
    workers: int | None = None,
) -> dict:
    """Read ``source_spec``, write shards and ``manifest.json`` under ``data_uri``; return the manifest.

    ``backend="ray"`` decodes, resizes, tokenizes and writes the shards on a Ray cluster (``workers``
    tasks at a time, see ``prepare_ray``); this process only does the accounting, in source order,
    which fixes each kept story's shard and row, so the output is byte-identical to the local
    backend's.
    """
    if backend not in ("local", "ray"):
        raise ValueError(f"unknown prepare backend {backend!r} (choose local or ray)")
    cfg = config.data
    height, width = cfg.image_height, cfg.image_width
    min_frames = cfg.context_frames + 1
    source = open_source(source_spec)
    # the tokenizer first: a bad tokenizer setting must fail before an existing dataset is cleared
    tokenizer = SentenceTokenizer(
        build_tokenizer(cfg.tokenizer, _training_sentences(source, 256), cfg.tokenizer_vocab_size)
    )
    storage.ensure_bucket(data_uri)
    _clear_previous(data_uri)
    storage.write_text(storage.join(data_uri, TOKENIZER_FILE), tokenizer.to_json())

    schema = shard_schema(height, width)
    accounting = Accounting()
    threads = cfg.prepare_threads or os.cpu_count() or 1
    check = dict(min_frames=min_frames, width=width, height=height)

    def split_of(outcome: RowOutcome, source_split: str) -> str:
        return assign_split(outcome.story_id, source_split, config.seed, cfg.val_fraction)

    bar = Progress(sum(source.rows.values()), desc="prepare", unit="story", enabled=progress)
    if backend == "ray":
        from storymm.data.prepare_ray import written_on_ray

        size = (height, width)
        shards = written_on_ray(
            source, data_uri, check, tokenizer, workers or 1, size, cfg.rows_per_shard, accounting, split_of, bar
        )
    else:
        writers = {split: ShardWriter(data_uri, split, schema, cfg.rows_per_shard) for split in OUTPUT_SPLITS}
        for source_split, outcomes in _checked_locally(source, lambda row: check_row(row, **check), threads):
            kept = [outcome for outcome in outcomes if accounting.admit(source_split, outcome)]
            sentences = [text.sentence for outcome in kept for text in outcome.texts]
            token_ids = iter(tokenizer.encode_batch(sentences)) if sentences else iter(())
            for outcome in kept:
                ids = [next(token_ids) for _ in outcome.texts]
                writers[split_of(outcome, source_split)].add(shard_record(outcome, source_split, ids))
            bar.update(len(outcomes))
        for writer in writers.values():
            writer.flush()
        shards = {split: writer.shards for split, writer in writers.items()}
    bar.close()
    shards = {split: shards.get(split, []) for split in OUTPUT_SPLITS}
    rejected, dropped, source_rows = accounting.rejected, accounting.dropped, accounting.source_rows

    kept_stories = {split: sum(s["rows"] for s in entries) for split, entries in shards.items()}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"storymm {storymm.__version__}",
        "source": source.description,
        "image_size": [height, width],
        "context_frames": cfg.context_frames,
        "split_seed": config.seed,
        "val_fraction": cfg.val_fraction,
        "tokenizer": {
            "spec": storage.redact(cfg.tokenizer),
            "requested_vocab_size": cfg.tokenizer_vocab_size if cfg.tokenizer == "train" else None,
            "file": TOKENIZER_FILE,
            "sha256": tokenizer.sha256(),
            "vocab_size": tokenizer.vocab_size,
            "pad_id": tokenizer.pad_id,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
        },
        "source_rows": sum(source_rows.values()),
        "source_rows_by_split": dict(source_rows),
        "kept_stories": kept_stories,
        "kept_frames": {split: sum(sum(s["frame_counts"]) for s in entries) for split, entries in shards.items()},
        "rejected": dict(sorted(rejected.items())),
        "dropped_frames": dict(sorted(dropped.items())),
        "shards": shards,
    }
    accounted = sum(kept_stories.values()) + sum(rejected.values())
    if accounted != manifest["source_rows"]:  # the promise prepare makes; fail loudly, never publish
        raise RuntimeError(f"row accounting broken: {manifest['source_rows']} rows, {accounted} accounted")
    storage.write_text(storage.join(data_uri, MANIFEST_FILE), json.dumps(manifest, indent=2))
    return manifest


def summarize(manifest: dict, data_uri: str) -> str:
    """The human summary printed after prepare."""
    kept = manifest["kept_stories"]
    lines = [
        f"prepared {manifest['source_rows']} source stories from {manifest['source']}",
        f"  kept:     train {kept['train']}, val {kept['val']}, test {kept['test']} stories "
        f"({sum(manifest['kept_frames'].values())} frames at "
        f"{manifest['image_size'][0]}x{manifest['image_size'][1]})",
        f"  rejected: {sum(manifest['rejected'].values())}"
        + (f" ({', '.join(f'{k} {v}' for k, v in manifest['rejected'].items())})" if manifest["rejected"] else ""),
        f"  dropped frames: {sum(manifest['dropped_frames'].values())}"
        + (
            f" ({', '.join(f'{k} {v}' for k, v in manifest['dropped_frames'].items())})"
            if manifest["dropped_frames"]
            else ""
        ),
        f"  shards:   {sum(len(s) for s in manifest['shards'].values())} under {storage.redact(data_uri)}"
        f" (manifest: {storage.redact(storage.join(data_uri, MANIFEST_FILE))})",
    ]
    return "\n".join(lines)
