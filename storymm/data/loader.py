"""Stream prepared shards as batches of (K input frames → next frame) windows, for one rank of N.

Design, and why:
- **One global order per epoch, whatever the world size.** The epoch's sequence of windows is a
  seeded function of (seed, epoch) alone: a permuted shard order, cut into chunks of whole shards
  holding at least ``shuffle_buffer`` windows, each chunk's windows permuted. Global step g takes
  the next ``G = batch_size * world_size`` windows of that sequence (the *global batch*) and rank r
  takes its slice ``[r*B, (r+1)*B)`` of them. So a position in the epoch is one number, the windows
  already consumed, and a run stopped on N ranks resumes on M ranks at exactly the next window as
  long as the global batch G stays the same (the training loop keeps it fixed; see ``loop.py``).
  The anchor for this is MosaicML Streaming's elastic determinism.
- The plan (which windows, in which order, which stories each rank must read) comes from the
  manifest alone, without reading pixels: every rank knows every step's windows, all ranks run the
  same number of steps (DDP needs it), and resuming skips whole chunks without reading them.
- Memory stays bounded: one chunk (``shuffle_buffer`` windows plus at most one shard) at a time,
  and of it only the stories holding this rank's windows.
- **I/O per rank.** A rank reads each shard holding a story with at least one of its windows
  (the shard's columns, as ``read_shard`` does) and decodes only the stories it needs (``take``).
  Windows are shuffled inside a chunk, so a rank's windows are spread over most of its stories:
  with m windows per story a rank needs about ``1 - (1 - 1/N)^m`` of them, and at small N every
  rank reads nearly the whole split per epoch (the earlier split of stories between ranks read
  1/N, but its order depended on N). With ``windows: first`` (m = 1) it decodes 1/N. That is the
  price of the exactness above; ``bench/loader_io.py`` measures it (``docs/data-order.md``).
- Evaluation (``equalize=False``) uses the same slicing: every window is yielded exactly once
  across ranks, the last global batch split as evenly as it goes; unshuffled, each rank's windows
  are runs of consecutive windows, so a rank decodes about 1/N of the stories (reading the shards
  that hold them, which is most shards unless a shard holds fewer than N batches of windows).
- Pixels were decoded and resized by prepare: a batch is one fancy-index gather from a uint8
  array and a conversion to float (or none: training sends uint8 to the GPU, ``data/transfer.py``).
- Planning the chunks and loading one chunk are separate steps (``plan``, ``load_chunk``), so a
  chunk's reading can overlap the training on the previous one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from storymm import storage
from storymm.data.prefetch import PrefetchStats, prefetch_map
from storymm.data.prepare import MANIFEST_FILE, SCHEMA_VERSION
from storymm.data.tokenizer import SentenceTokenizer
from storymm.data.transfer import pixels_to_float
from storymm.errors import StorymmError

log = logging.getLogger(__name__)


class DatasetError(StorymmError, RuntimeError):
    pass


class PreparedDataset:
    """A prepared dataset: its manifest, tokenizer and shard locations.

    The manifest is checked for every key readers use, so a partial or foreign ``manifest.json``
    fails here, naming the key. Each shard's bytes are checked against the manifest's sha256 when
    they are read (one hash per shard read, no extra request), so a damaged, replaced or truncated
    shard is named instead of training on it or failing deep inside pyarrow."""

    def __init__(self, data_uri: str):
        self.uri = data_uri
        manifest_uri = storage.join(data_uri, MANIFEST_FILE)
        try:
            text = storage.read_text(manifest_uri)
        except FileNotFoundError as err:
            if "bucket" in str(err):  # the whole bucket is missing: that is the news
                raise DatasetError(f"dataset {storage.redact(data_uri)}: {err}") from None
            raise DatasetError(
                f"no {MANIFEST_FILE} under {storage.redact(data_uri)}: not a prepared dataset, or prepare did "
                "not finish: run `storymm prepare`"
            ) from None
        try:
            self.manifest = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetError(f"{storage.redact(manifest_uri)} is not valid JSON ({err}): re-run prepare") from None
        _check_manifest(self.manifest, manifest_uri)
        self.height, self.width = self.manifest["image_size"]
        self._tokenizer: SentenceTokenizer | None = None

    @property
    def tokenizer(self) -> SentenceTokenizer:
        if self._tokenizer is None:
            self._tokenizer = SentenceTokenizer.load(self.uri)
        return self._tokenizer

    def shards(self, split: str) -> list[dict]:
        if split not in self.manifest["shards"]:
            raise DatasetError(f"split {split!r} not in dataset (have {list(self.manifest['shards'])})")
        return self.manifest["shards"][split]

    def read_shard(self, shard: dict, columns=("frames", "token_ids", "sentences")):
        """The shard's ``columns`` as a table, after checking its bytes against the manifest."""
        uri = storage.join(self.uri, shard["path"])
        try:
            data = storage.read_bytes(uri)  # retried as a whole: opening and reading every byte
        except FileNotFoundError:
            raise DatasetError(f"shard {storage.redact(uri)} is missing: re-run prepare") from None
        except storage.StorageError as err:
            raise DatasetError(f"reading shard {shard['path']} failed: {err}") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != shard["sha256"]:
            raise DatasetError(
                f"shard {storage.redact(uri)} does not match the manifest (sha256 {digest[:12]}..., expected "
                f"{shard['sha256'][:12]}..., {len(data)} bytes): it was changed or damaged; re-run prepare"
            )
        try:
            return pq.read_table(pa.BufferReader(data), columns=list(columns))
        except pa.ArrowInvalid as err:
            raise DatasetError(
                f"shard {storage.redact(uri)} is not a readable parquet file of this dataset ({err}): re-run prepare"
            ) from None


_MANIFEST_KEYS = {"schema_version": int, "image_size": list, "tokenizer": dict, "shards": dict}
_TOKENIZER_KEYS = ("vocab_size", "pad_id", "bos_id", "eos_id")
_SHARD_KEYS = ("path", "sha256", "frame_counts")


def _check_manifest(manifest, uri: str) -> None:
    where = storage.redact(uri)
    if not isinstance(manifest, dict):
        raise DatasetError(f"{where} is not a manifest (a JSON object): re-run prepare")
    if manifest.get("schema_version") != SCHEMA_VERSION and "schema_version" in manifest:
        raise DatasetError(
            f"dataset schema version {manifest.get('schema_version')} is not {SCHEMA_VERSION}: re-run prepare"
        )
    missing = [key for key, kind in _MANIFEST_KEYS.items() if not isinstance(manifest.get(key), kind)]
    missing += [
        f"tokenizer.{key}"
        for key in _TOKENIZER_KEYS
        if isinstance(manifest.get("tokenizer"), dict) and not isinstance(manifest["tokenizer"].get(key), int)
    ]
    for split, shards in (manifest.get("shards") or {}).items() if isinstance(manifest.get("shards"), dict) else ():
        if not isinstance(shards, list):
            missing.append(f"shards.{split}")
            continue
        for index, shard in enumerate(shards):
            absent = [k for k in _SHARD_KEYS if not isinstance(shard, dict) or k not in shard]
            missing += [f"shards.{split}[{index}].{key}" for key in absent]
    if not missing and len(manifest["image_size"]) != 2:
        missing.append("image_size ([height, width])")
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DatasetError(f"{where} is incomplete: missing or malformed {shown}; re-run prepare")


TAG_COLUMNS = ("objects", "actions", "locations")
_TAG_STOPWORDS = frozenset({"a", "an", "the", "of", "to", "and", "in", "on", "at"})


def hash_tags(objects: list[str], actions: list[str], locations: list[str], vocab: int, max_tags: int) -> list[int]:
    """One frame's ``<gdo>/<gda>/<gdl>`` spans -> up to ``max_tags`` ids in ``1..vocab-1`` (0 is padding).

    Each span gives its whole lower-cased phrase and its words (minus a few stopwords), prefixed by
    the kind (``o:red circle``, ``o:red``, ``o:circle``, ``a:moves``, ``l:meadow``), hashed with CRC-32
    into ``vocab - 1`` buckets: no vocabulary to build or ship, the same ids on every machine, and
    collisions are rare at 1024 buckets for a few hundred distinct tags. Duplicates are dropped; the
    order is objects, actions, locations, so truncation drops locations first."""
    keys: list[str] = []
    for prefix, spans in (("o", objects), ("a", actions), ("l", locations)):
        for span in spans or ():
            phrase = " ".join(str(span).lower().split())
            if not phrase:
                continue
            words = [w for w in phrase.split() if w not in _TAG_STOPWORDS]
            keys += [f"{prefix}:{key}" for key in [phrase, *words]]
    ids = list(dict.fromkeys(1 + zlib.crc32(k.encode()) % (vocab - 1) for k in keys))
    return ids[:max_tags]


def tag_array(frames, vocab: int, max_tags: int) -> np.ndarray:
    """``[len(frames), max_tags]`` int64 hashed tag ids (:func:`hash_tags`), 0-padded; ``frames``
    holds one ``(objects, actions, locations)`` per frame."""
    rows = [hash_tags(objects, actions, locations, vocab, max_tags) for objects, actions, locations in frames]
    out = np.zeros((len(rows), max_tags), dtype=np.int64)
    for index, ids in enumerate(rows):
        out[index, : len(ids)] = ids
    return out


def sentence_lengths(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Non-pad token counts (at least 1) of padded sentences ``[..., L]``: what the text encoder packs
    by, kept on the host (``HostLengths`` in ``models/text.py``)."""
    return (ids != pad_id).sum(-1).clamp_(min=1)


def pad_token_ids(rows: list[list[int]], max_tokens: int, pad_id: int, eos_id: int) -> np.ndarray:
    """``[len(rows), max_tokens]`` int64: each sentence's ids padded with ``pad_id``, or cut to
    ``max_tokens - 1`` ids plus ``eos_id``."""
    out = np.full((len(rows), max_tokens), pad_id, dtype=np.int64)
    for index, ids in enumerate(rows):
        if len(ids) > max_tokens:
            ids = ids[: max_tokens - 1] + [eos_id]
        out[index, : len(ids)] = ids
    return out


@dataclass(frozen=True)
class StoryRef:
    shard: int  # index into the split's shard list
    row: int
    frames: int


def windows_of(frames: int, context: int, mode: str) -> int:
    """Number of (context+1)-frame windows a story yields."""
    available = frames - context
    if available <= 0:
        return 0
    return available if mode == "all" else 1


def _frames_array(column, height: int, width: int) -> np.ndarray:
    """list<fixed_size_binary> column → uint8 [total_frames, H, W, 3] without per-frame copies."""
    flat = column.combine_chunks().flatten() if hasattr(column, "combine_chunks") else column.flatten()
    size = height * width * 3
    buffer = flat.buffers()[1]
    data = np.frombuffer(buffer, dtype=np.uint8, count=(flat.offset + len(flat)) * size)
    return data[flat.offset * size :].reshape(len(flat), height, width, 3)


class ChunkPlan(NamedTuple):
    """This rank's share of one chunk: the stories to read (shard by shard, in chunk order) and
    its windows in the epoch's order, as ``[n, 2]`` (index into ``stories``, window start)."""

    stories: list[StoryRef]
    windows: np.ndarray


class ChunkData(NamedTuple):
    """A loaded chunk: frames ``[F,H,W,3]`` uint8 and padded tokens ``[F,L]`` of its stories' frames,
    each story's first frame row, per-frame (story id, sentence) with ``with_text``, story ids with
    ``with_text``/``with_ids``, hashed tags ``[F,T]`` with ``tag_vocab``."""

    frames: np.ndarray
    tokens: np.ndarray
    offsets: np.ndarray
    sentences: list
    story_ids: list
    tags: np.ndarray | None


class WindowLoader:
    """Batches for one rank: ``frames [B,K,3,H,W]``, ``tokens [B,K,L]``, ``target_frame [B,3,H,W]``,
    ``target_tokens [B,L]`` (floats in [0,1], token ids padded with the tokenizer's pad id), and the
    sentences' non-pad token counts (at least 1) ``token_lengths [B,K]``, ``target_lengths [B]``, which
    stay on the host (``storymm.data.transfer``). With ``uint8_pixels`` the frames are uint8 (0-255):
    4x fewer bytes to pin and copy; ``transfer.to_device`` makes them floats on the device.
    With ``tag_vocab > 0`` also ``tags [B,K,max_tags]`` int64: each input frame's hashed
    objects/actions/locations (``hash_tags``; 0 = padding), read from the shards' tag columns.
    With ``with_ids`` also ``window_ids``: ``(story_id, start)`` per window (debug recording).

    ``batch_size`` is this rank's B; the global batch is ``B * world_size``. ``equalize=True``
    (training) yields only whole global batches, so every rank runs the same number of steps and
    the epoch's remainder (< one global batch) is dropped; ``False`` (evaluation) yields every window
    of the split exactly once across ranks, the last batch possibly short (or absent).
    """

    def __init__(
        self,
        dataset: PreparedDataset | str,
        split: str,
        *,
        batch_size: int,
        context_frames: int,
        max_tokens: int,
        windows: str = "all",
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_buffer: int = 2048,
        equalize: bool = True,
        with_text: bool = False,
        with_ids: bool = False,
        tag_vocab: int = 0,
        max_tags: int = 12,
        prefetch_chunks: int = 2,
        uint8_pixels: bool = False,
    ):
        self.dataset = dataset if isinstance(dataset, PreparedDataset) else PreparedDataset(dataset)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in world of {world_size}")
        if windows not in ("all", "first"):
            raise ValueError(f"windows must be 'all' or 'first', not {windows!r}")
        self.split, self.batch_size, self.context = split, batch_size, context_frames
        self.max_tokens, self.mode, self.rank, self.world_size = max_tokens, windows, rank, world_size
        self.shuffle, self.seed, self.shuffle_buffer, self.equalize = shuffle, seed, shuffle_buffer, equalize
        self.with_text, self.with_ids = with_text, with_ids
        self.tag_vocab, self.max_tags = int(tag_vocab), int(max_tags)
        self.prefetch_chunks = int(prefetch_chunks)  # chunks read ahead in background threads (storymm.data.prefetch)
        self.prefetch_stats = PrefetchStats()  # of the latest pass: consumer wait, peak chunks/bytes held
        self.uint8_pixels = bool(uint8_pixels)
        self.shards = self.dataset.shards(split)
        self.epoch = 0
        self.start_window = 0
        tokenizer_info = self.dataset.manifest["tokenizer"]
        self.pad_id, self.eos_id = tokenizer_info["pad_id"], tokenizer_info["eos_id"]

    # -------------------------------------------------------------------------------- planning

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def set_epoch(self, epoch: int, start_window: int = 0) -> None:
        """Select the epoch (reshuffles) and how many windows of its global sequence were already
        consumed (resume mid-epoch; the same number on every rank, whatever the world size)."""
        if start_window < 0:
            raise ValueError(f"start_window must be >= 0, got {start_window}")
        self.epoch, self.start_window = epoch, start_window

    def _rng(self, *salt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, *salt])

    def _epoch_stories(self) -> list[StoryRef]:
        """Every story with at least one window, in this epoch's (seeded) shard order."""
        order = list(range(len(self.shards)))
        if self.shuffle:
            order = list(self._rng(0).permutation(len(self.shards)))
        return [
            StoryRef(shard, row, frames)
            for shard in order
            for row, frames in enumerate(self.shards[shard]["frame_counts"])
            if windows_of(frames, self.context, self.mode) > 0
        ]

    def windows_in_epoch(self) -> int:
        """Windows in the epoch's global sequence (all ranks together, before dropping a remainder)."""
        return sum(windows_of(s.frames, self.context, self.mode) for s in self._epoch_stories())

    def _rank_positions(self, total: int) -> np.ndarray:
        """Positions in the epoch's global sequence that this rank yields, in order, from ``start_window``."""
        remaining = max(0, total - self.start_window)
        size, world = self.global_batch, self.world_size
        full = remaining // size
        mine = self.rank * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        positions = [(np.arange(full, dtype=np.int64)[:, None] * size + mine[None, :]).ravel()]
        last = remaining - full * size
        if last and not self.equalize:  # the last, partial global batch: split as evenly as it goes
            positions.append(full * size + np.arange(self.rank * last // world, (self.rank + 1) * last // world))
        return self.start_window + np.concatenate(positions)

    def __len__(self) -> int:
        """Batches this rank yields from the current position to the end of the epoch."""
        return math.ceil(self.num_windows() / self.batch_size)

    def num_windows(self) -> int:
        """Windows this rank yields from the current position to the end of the epoch."""
        return len(self._rank_positions(self.windows_in_epoch()))

    def _chunks(self, stories: list[StoryRef]) -> list[list[StoryRef]]:
        """Group consecutive stories into chunks of whole shards holding >= shuffle_buffer windows."""
        chunks, current, windows, last_shard = [], [], 0, None
        for story in stories:
            if story.shard != last_shard and windows >= self.shuffle_buffer and current:
                chunks.append(current)
                current, windows = [], 0
            current.append(story)
            windows += windows_of(story.frames, self.context, self.mode)
            last_shard = story.shard
        if current:
            chunks.append(current)
        return chunks

    def _chunk_windows(self, chunk_index: int, chunk: list[StoryRef]) -> np.ndarray:
        """[n, 2]: (story position in chunk, window start), in this epoch's order. The salt
        (1, 0, chunk) is the one single-process runs always used, so their order is unchanged."""
        pairs = [
            (position, start)
            for position, story in enumerate(chunk)
            for start in range(windows_of(story.frames, self.context, self.mode))
        ]
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        if self.shuffle and len(pairs):
            pairs = pairs[self._rng(1, 0, chunk_index).permutation(len(pairs))]
        return pairs

    def plan(self) -> list[ChunkPlan]:
        """This rank's chunks from the current position on: only chunks holding some of its
        windows, each with only the stories those windows come from. Reads nothing."""
        chunks = self._chunks(self._epoch_stories())
        total = sum(windows_of(s.frames, self.context, self.mode) for chunk in chunks for s in chunk)
        positions = self._rank_positions(total)
        plans, offset = [], 0
        for chunk_index, chunk in enumerate(chunks):
            size = sum(windows_of(s.frames, self.context, self.mode) for s in chunk)
            low, high = np.searchsorted(positions, [offset, offset + size])
            if high > low:
                pairs = self._chunk_windows(chunk_index, chunk)[positions[low:high] - offset]
                needed, index = np.unique(pairs[:, 0], return_inverse=True)  # sorted: chunk order kept
                plans.append(ChunkPlan([chunk[i] for i in needed], np.stack([index.ravel(), pairs[:, 1]], axis=1)))
            offset += size
        return plans

    # ------------------------------------------------------------------------------- loading

    def load_chunk(self, plan: ChunkPlan) -> ChunkData:
        """Decode the plan's stories into flat arrays: frames, padded tokens, story offsets.

        A plan lists stories shard by shard, so taking each shard's rows in turn keeps its order.
        """
        stories = plan.stories
        need_ids = self.with_text or self.with_ids
        columns = ["frames", "token_ids"] + (["story_id"] if need_ids else [])
        columns += ["sentences"] if self.with_text else []
        if self.tag_vocab:
            columns += list(TAG_COLUMNS)
        frame_parts, token_parts, sentences, lengths, tag_parts, story_ids = [], [], [], [], [], []
        for shard in dict.fromkeys(story.shard for story in stories):
            rows = [story.row for story in stories if story.shard == shard]
            try:
                table = self.dataset.read_shard(self.shards[shard], columns).take(rows)
            except Exception as err:
                if self.tag_vocab and any(c in str(err) for c in TAG_COLUMNS):
                    raise DatasetError(
                        f"tag features need the shards' {'/'.join(TAG_COLUMNS)} columns, which "
                        f"{self.shards[shard]['path']} lacks: re-run prepare"
                    ) from None
                raise
            if self.tag_vocab:
                tag_parts.append(self._tag_ids(table))
            frame_parts.append(_frames_array(table.column("frames"), self.dataset.height, self.dataset.width))
            token_ids = table.column("token_ids").to_pylist()
            token_parts.append(self._pad_tokens(token_ids))
            lengths.extend(len(story) for story in token_ids)
            if need_ids:
                story_ids.extend(table.column("story_id").to_pylist())
            if self.with_text:  # per frame: (story id, sentence), for reports and checks
                for story_id, story in zip(table.column("story_id").to_pylist(), table.column("sentences").to_pylist()):
                    sentences.extend((story_id, sentence) for sentence in story)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        tags = np.concatenate(tag_parts) if self.tag_vocab else None
        return ChunkData(np.concatenate(frame_parts), np.concatenate(token_parts), offsets, sentences, story_ids, tags)

    def _tag_ids(self, table) -> np.ndarray:
        """[frames of the table's stories, max_tags] hashed tag ids, 0-padded."""
        columns = [table.column(c).to_pylist() for c in TAG_COLUMNS]
        frames = [frame for story in zip(*columns) for frame in zip(*story)]
        return tag_array(frames, self.tag_vocab, self.max_tags)

    def _pad_tokens(self, stories: list[list[list[int]]]) -> np.ndarray:
        rows = [ids for story in stories for ids in story]
        return pad_token_ids(rows, self.max_tokens, self.pad_id, self.eos_id)

    def _batch(self, data: ChunkData, rows: np.ndarray, windows: np.ndarray) -> dict:
        """``rows`` [B, K+1] absolute frame rows of ``data``, ``windows`` their [B, 2] plan entries → tensors."""
        pixels = torch.from_numpy(data.frames[rows]).permute(0, 1, 4, 2, 3)
        if not self.uint8_pixels:
            pixels = pixels_to_float(pixels)
        ids = torch.from_numpy(data.tokens[rows])
        lengths = sentence_lengths(ids, self.pad_id)
        batch = {
            "frames": pixels[:, :-1].contiguous(),
            "tokens": ids[:, :-1].contiguous(),
            "target_frame": pixels[:, -1].contiguous(),
            "target_tokens": ids[:, -1].contiguous(),
            "token_lengths": lengths[:, :-1].contiguous(),
            "target_lengths": lengths[:, -1].contiguous(),
        }
        if data.tags is not None:  # input frames only: the target's tags would leak the answer
            batch["tags"] = torch.from_numpy(data.tags[rows[:, :-1]])
        if self.with_ids:
            batch["window_ids"] = [(data.story_ids[story], int(start)) for story, start in windows]
        if self.with_text:
            batch["story_ids"] = [data.sentences[row[-1]][0] for row in rows]
            batch["input_sentences"] = [[data.sentences[i][1] for i in row[:-1]] for row in rows]
            batch["target_sentences"] = [data.sentences[row[-1]][1] for row in rows]
        return batch

    def __iter__(self) -> Iterator[dict]:
        """This rank's slices of the global batches, from the current position: chunks are planned
        first, then loaded ``prefetch_chunks`` ahead in background threads (``load_chunk``, see
        ``storymm.data.prefetch``) and cut into batches of ``batch_size``."""
        plans = self.plan()
        self.prefetch_stats = PrefetchStats()
        loaded = prefetch_map(
            self.load_chunk, plans, self.prefetch_chunks, describe=self._describe_chunk, stats=self.prefetch_stats
        )
        yield from self._batches(loaded)
        log.info("%s rank %d epoch %d read: %s", self.split, self.rank, self.epoch, self.prefetch_stats.summary())

    def _describe_chunk(self, plan: ChunkPlan) -> str:
        paths = [self.shards[shard]["path"] for shard in dict.fromkeys(story.shard for story in plan.stories)]
        return f"a chunk of {self.split} (epoch {self.epoch}, rank {self.rank}: {', '.join(paths)})"

    def _batches(self, chunks) -> Iterator[dict]:
        steps = np.arange(self.context + 1, dtype=np.int64)
        carry: list[dict] = []  # the partial batch left at the end of the previous chunk
        carried = 0
        for plan, data in chunks:
            windows = plan.windows
            rows = (data.offsets[windows[:, 0]] + windows[:, 1])[:, None] + steps[None, :]
            start = 0
            if carried:
                take = min(self.batch_size - carried, len(rows))
                carry.append(self._batch(data, rows[:take], windows[:take]))
                carried, start = carried + take, take
                if carried == self.batch_size:
                    yield _concat_batches(carry)
                    carry, carried = [], 0
            while len(rows) - start >= self.batch_size:
                end = start + self.batch_size
                yield self._batch(data, rows[start:end], windows[start:end])
                start = end
            if start < len(rows):
                carry.append(self._batch(data, rows[start:], windows[start:]))
                carried += len(rows) - start
        if carried:  # only without equalize: the rank's share of the last, partial global batch
            yield _concat_batches(carry)


def _concat_batches(parts: list[dict]) -> dict:
    out = {}
    for key in parts[0]:
        if isinstance(parts[0][key], torch.Tensor):
            out[key] = torch.cat([part[key] for part in parts])
        else:
            out[key] = [item for part in parts for item in part[key]]
    return out
