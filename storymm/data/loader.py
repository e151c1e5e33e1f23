"""Stream prepared shards as batches of (K input frames → next frame) windows, for one rank of N.

Design, and why:
- **One global order per epoch, whatever the world size.** The epoch's sequence of global batches
  is a seeded function of (seed, epoch) and the run's fixed global batch ``G`` and **partitions**
  ``P`` alone. The epoch's stories, in a permuted shard order, give a sequence of windows; it is cut
  into P contiguous ranges, partition p getting exactly ``steps * slots_p`` windows, where ``slots_p``
  = ``floor((p+1)G/P) - floor(pG/P)`` are the slots it fills in every global batch (the remainder,
  fewer than G windows, is dropped at the end). Each partition streams its range in chunks of whole
  shards holding at least ``shuffle_buffer / P`` windows, each chunk's windows permuted; global step g
  takes the next ``slots_p`` windows of every partition's stream, partition by partition. Rank r of
  N takes slots ``[r*B, (r+1)*B)`` (``B = G/N``). So a position in the epoch is one number, the
  windows already consumed, and a run stopped on N ranks resumes on M ranks at exactly the next
  window as long as G and P stay the same (the training loop keeps both fixed; see ``loop.py``).
  This is MosaicML Streaming's elastic determinism with its canonical nodes as the partitions.
- **Each rank reads its share.** When N divides P, rank r's slots are exactly those of partitions
  ``[r*P/N, (r+1)*P/N)``: it reads only their shards, about 1/N of the split per epoch (plus the
  shards cut by a partition boundary, which two partitions read). When it does not, ranks share a
  partition and each reads that partition's shards. With P = 1 (a run started on one process, or
  any run from before partitions) the order is exactly the one storymm always used.
- The plan (which windows, in which order, which stories each rank must read) comes from the
  manifest alone, without reading pixels: every rank knows every step's windows, all ranks run the
  same number of steps (DDP needs it), and resuming skips whole chunks without reading them.
- Memory stays bounded: a rank holds one chunk per partition it owns (``shuffle_buffer / N``
  windows in all, each chunk at least its part of one shard) plus the chunks read ahead, and of
  them only the stories holding this rank's windows.
- Evaluation (``equalize=False``, one partition) uses the same slicing: every window is yielded
  exactly once across ranks, the last global batch split as evenly as it goes; unshuffled, each
  rank's windows are runs of consecutive windows.
- Pixels were decoded and resized by prepare: a batch is one fancy-index gather from a uint8
  array and a conversion to float (or none: training sends uint8 to the GPU, ``data/transfer.py``).
- Planning the chunks and loading one chunk are separate steps (``pass_plan``, ``load_chunk``), so
  reading runs ahead in background threads (``storymm.data.prefetch``); a ``continuous`` loader
  (training, validation) goes on reading the next pass while the current one is consumed, so no
  epoch or validation pass starts by waiting for storage (the next epoch's order is known: it is a
  function of seed and epoch).
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
from storymm.data.prefetch import PrefetchStats, nbytes, prefetch_map
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
    """This rank's share of one chunk (a run of whole shards of one partition's stream): the stories
    to read (shard by shard, in story order) and its windows in the order the rank consumes them, as
    ``[n, 2]`` (index into ``stories``, window start)."""

    stories: list[StoryRef]
    windows: np.ndarray


class PassPlan(NamedTuple):
    """This rank's pass from a position: its chunks in the order they are first needed and, for every
    window it consumes, in order, the chunk it comes from (``chunk``) and its row in that chunk's
    ``windows`` (``row``)."""

    chunks: list[ChunkPlan]
    chunk: np.ndarray
    row: np.ndarray


class EpochOrder(NamedTuple):
    """One epoch's global order, from the manifest alone: the stories in the epoch's shard order,
    per window of that story order its story and start, the partitions' streams (window indices in
    the order each partition yields them), where each stream's chunks start, and the whole global
    batches in the epoch (``steps``)."""

    stories: list[StoryRef]
    story: np.ndarray
    start: np.ndarray
    streams: list[np.ndarray]
    chunk_starts: list[np.ndarray]
    steps: int


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

    ``partitions`` (training): the canonical partitions of the global order (fixed for a run; see the
    module docstring); a rank reads about ``1/world_size`` of the shards when ``world_size`` divides it.
    ``max_batches``: a pass stops after that many batches (validation). ``continuous``: after a pass,
    keep reading the next one (the next epoch, or the same windows again when not shuffled) in the
    background, so it starts without waiting for storage; ``close()`` stops that.
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
        partitions: int = 1,
        max_batches: int | None = None,
        continuous: bool = False,
    ):
        self.dataset = dataset if isinstance(dataset, PreparedDataset) else PreparedDataset(dataset)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in world of {world_size}")
        if windows not in ("all", "first"):
            raise ValueError(f"windows must be 'all' or 'first', not {windows!r}")
        if partitions < 1 or (partitions > 1 and not equalize):
            raise ValueError(f"partitions must be >= 1, and 1 without equalize (evaluation), got {partitions}")
        self.split, self.batch_size, self.context = split, batch_size, context_frames
        self.max_tokens, self.mode, self.rank, self.world_size = max_tokens, windows, rank, world_size
        self.shuffle, self.seed, self.shuffle_buffer, self.equalize = shuffle, seed, shuffle_buffer, equalize
        self.with_text, self.with_ids = with_text, with_ids
        self.tag_vocab, self.max_tags = int(tag_vocab), int(max_tags)
        self.prefetch_chunks = int(prefetch_chunks)  # chunks read ahead in background threads (storymm.data.prefetch)
        self.prefetch_stats = PrefetchStats()  # of the latest pass: consumer wait, peak chunks/bytes held
        self.uint8_pixels = bool(uint8_pixels)
        self.partitions, self.max_batches, self.continuous = int(partitions), max_batches, continuous
        self.shards = self.dataset.shards(split)
        self.epoch = 0
        self.start_window = 0
        self._orders: dict[int, EpochOrder] = {}  # the last few epochs' orders and passes, planned once
        self._passes: dict[tuple[int, int], PassPlan] = {}
        self._stream: _Stream | None = None  # chunks being read, possibly ahead into the next pass
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

    def _pass_key(self) -> tuple[int, int]:
        """(epoch of the order, start window) of the current pass; unshuffled, every epoch is one order."""
        return (self.epoch if self.shuffle else 0, self.start_window)

    def _next_pass(self, key: tuple[int, int]) -> tuple[int, int]:
        return (key[0] + 1, 0) if self.shuffle else (0, 0)

    def _rng(self, epoch: int, *salt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, *salt])

    def _epoch_stories(self, epoch: int | None = None) -> list[StoryRef]:
        """Every story with at least one window, in this epoch's (seeded) shard order."""
        order = list(range(len(self.shards)))
        if self.shuffle:
            order = list(self._rng(self.epoch if epoch is None else epoch, 0).permutation(len(self.shards)))
        return [
            StoryRef(shard, row, frames)
            for shard in order
            for row, frames in enumerate(self.shards[shard]["frame_counts"])
            if windows_of(frames, self.context, self.mode) > 0
        ]

    def windows_in_epoch(self) -> int:
        """Windows in the epoch's global sequence (all ranks together, before dropping a remainder)."""
        return sum(windows_of(s.frames, self.context, self.mode) for s in self._epoch_stories())

    def _slot_bounds(self) -> np.ndarray:
        """Partition p fills slots ``[bounds[p], bounds[p+1])`` of every global batch."""
        return (np.arange(self.partitions + 1, dtype=np.int64) * self.global_batch) // self.partitions

    def _chunk_bounds(self, shard: np.ndarray, low: int, high: int) -> list[tuple[int, int]]:
        """Cut windows ``[low, high)`` of the story order into chunks of whole shards (the first and
        last possibly partial) holding at least ``shuffle_buffer / partitions`` windows."""
        if high <= low:
            return []
        buffer = max(1, -(-self.shuffle_buffer // self.partitions))
        ends = [*(low + 1 + np.flatnonzero(shard[low + 1 : high] != shard[low : high - 1])).tolist(), high]
        chunks, begin = [], low
        for end in ends:
            if end - begin >= buffer:
                chunks.append((begin, end))
                begin = end
        if begin < high:
            chunks.append((begin, high))
        return chunks

    def epoch_order(self, epoch: int) -> EpochOrder:
        """The global order of ``epoch`` (the same on every rank and world size): its stories in a
        seeded shard order; their windows cut into the partitions' contiguous ranges (partition p
        gets ``steps * slots_p`` windows, so each has exactly enough for its slots of every step; the
        last also holds the remainder that is dropped); each range cut into chunks of whole shards,
        and each chunk's windows permuted (``default_rng([seed, epoch, 1, p, chunk])``: with one
        partition, the salt single-process runs always used)."""
        if epoch in self._orders:
            return self._orders[epoch]
        stories = self._epoch_stories(epoch)
        counts = np.fromiter(
            (windows_of(s.frames, self.context, self.mode) for s in stories), dtype=np.int64, count=len(stories)
        )
        total = int(counts.sum())
        story = np.repeat(np.arange(len(stories), dtype=np.int64), counts)
        start = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        shard = np.fromiter((s.shard for s in stories), dtype=np.int64, count=len(stories))[story]
        steps = total // self.global_batch
        bounds = self._slot_bounds()
        streams, chunk_starts = [], []
        for p in range(self.partitions):
            low = steps * int(bounds[p])
            high = total if p == self.partitions - 1 else steps * int(bounds[p + 1])
            pieces, starts = [np.empty(0, dtype=np.int64)], []
            for k, (begin, end) in enumerate(self._chunk_bounds(shard, low, high)):
                windows = np.arange(begin, end, dtype=np.int64)
                if self.shuffle:
                    windows = windows[self._rng(epoch, 1, p, k).permutation(end - begin)]
                pieces.append(windows)
                starts.append(begin - low)
            streams.append(np.concatenate(pieces))
            chunk_starts.append(np.asarray(starts, dtype=np.int64))
        order = EpochOrder(stories, story, start, streams, chunk_starts, steps)
        self._orders = {k: v for k, v in self._orders.items() if k >= epoch - 1} | {epoch: order}
        return order

    def _rank_positions(self, total: int, start_window: int) -> np.ndarray:
        """With one partition: the positions in the epoch's global sequence that this rank yields, in
        order, from ``start_window``."""
        remaining = max(0, total - start_window)
        size, world = self.global_batch, self.world_size
        full = remaining // size
        mine = self.rank * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        positions = [(np.arange(full, dtype=np.int64)[:, None] * size + mine[None, :]).ravel()]
        last = remaining - full * size
        if last and not self.equalize:  # the last, partial global batch: split as evenly as it goes
            positions.append(full * size + np.arange(self.rank * last // world, (self.rank + 1) * last // world))
        return start_window + np.concatenate(positions)

    def _stream_positions(self, order: EpochOrder, start_window: int) -> tuple[np.ndarray, np.ndarray]:
        """(partition, position in its stream) of every window this rank yields from ``start_window``,
        in order: step by step, its slots ``[rank*B, (rank+1)*B)`` of each global batch."""
        if self.partitions == 1:
            positions = self._rank_positions(len(order.streams[0]), start_window)
            return np.zeros_like(positions), positions
        size, bounds = self.global_batch, self._slot_bounds()
        slots = self.rank * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        part = np.searchsorted(bounds, slots, side="right") - 1
        per_step = np.diff(bounds)[part]
        steps = np.arange(start_window // size, order.steps, dtype=np.int64)[:, None]
        positions = (steps * per_step + (slots - bounds[part])).ravel()
        keep = (steps * size + slots).ravel() >= start_window  # a start inside a step (never in training)
        return np.broadcast_to(part, (len(steps), len(slots))).ravel()[keep], positions[keep]

    def pass_plan(self, key: tuple[int, int] | None = None) -> PassPlan:
        """This rank's pass from the current position (or ``key``: epoch of the order, start window):
        which chunks it loads, in the order it first needs them, each with only the stories its
        windows come from. Reads nothing."""
        key = key or self._pass_key()
        if key in self._passes:
            return self._passes[key]
        order = self.epoch_order(key[0])
        part, positions = self._stream_positions(order, key[1])
        if self.max_batches is not None:
            limit = self.max_batches * self.batch_size
            part, positions = part[:limit], positions[:limit]
        window, chunk = np.empty_like(positions), np.empty_like(positions)
        first_chunk = np.cumsum([0] + [len(starts) for starts in order.chunk_starts])
        for p in np.unique(part).tolist():
            mine = part == p
            window[mine] = order.streams[p][positions[mine]]
            chunk[mine] = first_chunk[p] + np.searchsorted(order.chunk_starts[p], positions[mine], side="right") - 1
        needed, first_use = np.unique(chunk, return_index=True)
        by_need = needed[np.argsort(first_use)]  # chunks in the order the rank first needs them
        index = np.zeros(int(first_chunk[-1]), dtype=np.int64)
        index[by_need] = np.arange(len(by_need))
        chunk = index[chunk]
        sequence = np.argsort(chunk, kind="stable")  # each chunk's windows, in the order they are consumed
        sizes = np.bincount(chunk, minlength=len(by_need))
        offsets = np.cumsum(sizes) - sizes
        row = np.empty_like(chunk)
        row[sequence] = np.arange(len(chunk)) - np.repeat(offsets, sizes)
        plans = []
        for c in range(len(by_need)):
            windows = window[sequence[offsets[c] : offsets[c] + sizes[c]]]
            stories, story_index = np.unique(order.story[windows], return_inverse=True)  # sorted: shard by shard
            plans.append(
                ChunkPlan(
                    [order.stories[i] for i in stories.tolist()],
                    np.stack([story_index.ravel(), order.start[windows]], axis=1),
                )
            )
        plan = PassPlan(plans, chunk, row)
        self._passes = {k: v for k, v in self._passes.items() if k[0] >= key[0] - 1} | {key: plan}
        return plan

    def plan(self) -> list[ChunkPlan]:
        """This rank's chunks from the current position (``pass_plan().chunks``)."""
        return self.pass_plan().chunks

    def __len__(self) -> int:
        """Batches this rank yields from the current position to the end of the pass."""
        return math.ceil(self.num_windows() / self.batch_size)

    def num_windows(self) -> int:
        """Windows this rank yields from the current position to the end of the pass."""
        return len(self.pass_plan().chunk)

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

    def begin(self) -> None:
        """Start reading the current pass's first chunks in the background now (while a model is
        built, or the validation split while training runs)."""
        if self.pass_plan().chunks:
            self._stream_at(self._pass_key())

    def _stream_at(self, key: tuple[int, int]) -> _Stream:
        if self._stream is None or self._stream.next_pass != key:
            self.close()
            self._stream = _Stream(self, key)
        return self._stream

    def _chunk_items(self, key: tuple[int, int]) -> Iterator[tuple[tuple[int, int], int, ChunkPlan]]:
        """The chunks to load, pass after pass (one pass unless ``continuous``), as (pass, index, plan)."""
        while True:
            chunks = self.pass_plan(key).chunks  # planned in the consumer's thread, as prefetch pulls items
            if not chunks:
                return
            for index, chunk in enumerate(chunks):
                yield key, index, chunk
            if not self.continuous:
                return
            key = self._next_pass(key)

    def close(self) -> None:
        """Stop reading ahead (background threads end); the next pass starts afresh."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def __iter__(self) -> Iterator[dict]:
        """This rank's slices of the global batches, from the current position: chunks are planned
        first, then loaded ``prefetch_chunks`` ahead in background threads (``load_chunk``, see
        ``storymm.data.prefetch``; with ``continuous`` on into the next pass) and cut into batches."""
        key = self._pass_key()
        plan = self.pass_plan()
        stream = self._stream_at(key) if plan.chunks else None
        if stream is not None:
            stream.stats.new_pass()
            self.prefetch_stats = stream.stats
        done = False
        try:
            yield from self._batches(plan, stream, key)
            done = True
        finally:
            if stream is not None and done and self.continuous:
                stream.next_pass = self._next_pass(key)
            else:  # a pass abandoned mid-way, or nothing to read ahead for
                self.close()
        log.info("%s rank %d epoch %d read: %s", self.split, self.rank, self.epoch, self.prefetch_stats.summary())

    def _describe_chunk(self, item: tuple[tuple[int, int], int, ChunkPlan]) -> str:
        (epoch, _), _, plan = item
        paths = [self.shards[shard]["path"] for shard in dict.fromkeys(story.shard for story in plan.stories)]
        return f"a chunk of {self.split} (epoch {epoch}, rank {self.rank}: {', '.join(paths)})"

    def _batches(self, plan: PassPlan, stream: _Stream | None, key: tuple[int, int]) -> Iterator[dict]:
        """Cut the pass into batches of ``batch_size`` windows. A batch may take windows from several
        loaded chunks (several partitions, or a chunk boundary), so chunks are held until their last
        window is consumed."""
        steps = np.arange(self.context + 1, dtype=np.int64)
        total = len(plan.chunk)
        last_use = np.zeros(len(plan.chunks), dtype=np.int64)
        last_use[plan.chunk] = np.arange(total)  # the last assignment wins: each chunk's last window
        held: dict[int, tuple[ChunkData, int]] = {}
        for low in range(0, total, self.batch_size):
            high = min(low + self.batch_size, total)
            chunks, rows_in = plan.chunk[low:high], plan.row[low:high]
            while stream.loaded <= chunks.max():  # chunks come in the order they are first needed
                (got, index, _), data = next(stream.items)
                if (got, index) != (key, stream.loaded):
                    raise RuntimeError(f"loader out of step: chunk {index} of pass {got} in pass {key}")
                held[index] = (data, nbytes(data))
                stream.loaded += 1
            cuts = [0, *(np.flatnonzero(np.diff(chunks)) + 1).tolist(), len(chunks)]
            parts = []
            for begin, end in zip(cuts, cuts[1:]):
                chunk = int(chunks[begin])
                data, windows = held[chunk][0], plan.chunks[chunk].windows[rows_in[begin:end]]
                rows = (data.offsets[windows[:, 0]] + windows[:, 1])[:, None] + steps[None, :]
                parts.append(self._batch(data, rows, windows))
            for chunk in np.unique(chunks).tolist():
                if last_use[chunk] < high:  # its last window is in this batch
                    stream.stats.release(held.pop(chunk)[1])
            yield parts[0] if len(parts) == 1 else _concat_batches(parts)
        if stream is not None:
            stream.loaded = 0  # the next pass's chunks come next


class _Stream:
    """The chunks a loader is reading: a prefetch over :meth:`WindowLoader._chunk_items` from a pass
    on, and the pass whose first chunk it yields next (``next_pass``)."""

    def __init__(self, loader: WindowLoader, key: tuple[int, int]):
        self.next_pass, self.loaded = key, 0
        self.stats = PrefetchStats()
        self.items = prefetch_map(
            lambda item: loader.load_chunk(item[2]),
            loader._chunk_items(key),
            loader.prefetch_chunks,
            describe=loader._describe_chunk,
            stats=self.stats,
            consumer_releases=True,
        )

    def close(self) -> None:
        self.items.close()


def _concat_batches(parts: list[dict]) -> dict:
    out = {}
    for key in parts[0]:
        if isinstance(parts[0][key], torch.Tensor):
            out[key] = torch.cat([part[key] for part in parts])
        else:
            out[key] = [item for part in parts for item in part[key]]
    return out
