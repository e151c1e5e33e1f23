"""Stream prepared shards as batches of (K input frames → next frame) windows, for one rank of N.

Design, and why:
- The epoch's whole plan (which stories go to which rank, in which order, which windows) is
  computed from the manifest alone, without reading pixels. So every rank knows every other
  rank's window count (all ranks run the same number of steps, as DDP needs), and resuming at
  batch n of an epoch skips straight to it.
- Stories, not windows, are split between ranks (contiguous blocks of a seeded shard order), so
  each story is read by exactly one rank per epoch and each rank touches few shards.
- Shuffling is by chunk: a run of consecutive shards holding at least ``shuffle_buffer`` windows
  is loaded, and its windows are permuted. Memory stays bounded; order stays reproducible.
- Pixels were decoded and resized by prepare: a batch is one fancy-index gather from a uint8
  array and a conversion to float.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from storymm import storage
from storymm.data.prepare import MANIFEST_FILE, SCHEMA_VERSION
from storymm.data.tokenizer import SentenceTokenizer
from storymm.errors import StorymmError


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
    missing += [f"tokenizer.{key}" for key in _TOKENIZER_KEYS
                if isinstance(manifest.get("tokenizer"), dict) and not isinstance(manifest["tokenizer"].get(key), int)]
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
    return data[flat.offset * size:].reshape(len(flat), height, width, 3)


class WindowLoader:
    """Batches for one rank: ``frames [B,K,3,H,W]``, ``tokens [B,K,L]``, ``target_frame [B,3,H,W]``,
    ``target_tokens [B,L]`` (floats in [0,1], token ids padded with the tokenizer's pad id).
    With ``tag_vocab > 0`` also ``tags [B,K,max_tags]`` int64: each input frame's hashed
    objects/actions/locations (``hash_tags``; 0 = padding), read from the shards' tag columns.

    ``equalize=True`` (training) gives every rank the same number of full batches; ``False``
    (evaluation) yields every window of this rank's stories, the last batch possibly short.
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
        tag_vocab: int = 0,
        max_tags: int = 12,
    ):
        self.dataset = dataset if isinstance(dataset, PreparedDataset) else PreparedDataset(dataset)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in world of {world_size}")
        if windows not in ("all", "first"):
            raise ValueError(f"windows must be 'all' or 'first', not {windows!r}")
        self.split, self.batch_size, self.context = split, batch_size, context_frames
        self.max_tokens, self.mode, self.rank, self.world_size = max_tokens, windows, rank, world_size
        self.shuffle, self.seed, self.shuffle_buffer, self.equalize = shuffle, seed, shuffle_buffer, equalize
        self.with_text = with_text
        self.tag_vocab, self.max_tags = int(tag_vocab), int(max_tags)
        self.shards = self.dataset.shards(split)
        self.epoch = 0
        self.start_batch = 0
        tokenizer_info = self.dataset.manifest["tokenizer"]
        self.pad_id, self.eos_id = tokenizer_info["pad_id"], tokenizer_info["eos_id"]

    # -------------------------------------------------------------------------------- planning

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (reshuffles) and the batch to start from (resume mid-epoch)."""
        self.epoch, self.start_batch = epoch, start_batch

    def _rng(self, *salt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, *salt])

    def _rank_stories(self) -> list[list[StoryRef]]:
        order = list(range(len(self.shards)))
        if self.shuffle:
            order = list(self._rng(0).permutation(len(self.shards)))
        stories = [
            StoryRef(shard, row, frames)
            for shard in order
            for row, frames in enumerate(self.shards[shard]["frame_counts"])
            if windows_of(frames, self.context, self.mode) > 0
        ]
        bounds = [round(i * len(stories) / self.world_size) for i in range(self.world_size + 1)]
        return [stories[bounds[r]:bounds[r + 1]] for r in range(self.world_size)]

    def _windows_per_rank(self, per_rank: list[list[StoryRef]]) -> list[int]:
        return [sum(windows_of(s.frames, self.context, self.mode) for s in stories) for stories in per_rank]

    def __len__(self) -> int:
        counts = self._windows_per_rank(self._rank_stories())
        if self.equalize:
            return min(counts) // self.batch_size
        return math.ceil(counts[self.rank] / self.batch_size)

    def num_windows(self) -> int:
        """Windows this rank yields in the current epoch."""
        counts = self._windows_per_rank(self._rank_stories())
        if self.equalize:
            return len(self) * self.batch_size
        return counts[self.rank]

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
        """[n, 2]: (story position in chunk, window start), in this epoch's order."""
        pairs = [
            (position, start)
            for position, story in enumerate(chunk)
            for start in range(windows_of(story.frames, self.context, self.mode))
        ]
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        if self.shuffle and len(pairs):
            pairs = pairs[self._rng(1, self.rank, chunk_index).permutation(len(pairs))]
        return pairs

    # ------------------------------------------------------------------------------- loading

    def _load_chunk(self, chunk: list[StoryRef]):
        """Decode the chunk's stories into flat arrays: frames, padded tokens, story offsets.

        A chunk lists stories shard by shard (see ``_rank_stories``), so taking each shard's rows
        in turn keeps the chunk's story order.
        """
        columns = ["frames", "token_ids"] + (["sentences", "story_id"] if self.with_text else [])
        if self.tag_vocab:
            columns += list(TAG_COLUMNS)
        frame_parts, token_parts, sentences, lengths, tag_parts = [], [], [], [], []
        for shard in dict.fromkeys(story.shard for story in chunk):
            rows = [story.row for story in chunk if story.shard == shard]
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
            if self.with_text:  # per frame: (story id, sentence), for reports and checks
                for story_id, story in zip(table.column("story_id").to_pylist(), table.column("sentences").to_pylist()):
                    sentences.extend((story_id, sentence) for sentence in story)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        tags = np.concatenate(tag_parts) if self.tag_vocab else None
        return np.concatenate(frame_parts), np.concatenate(token_parts), offsets, sentences, tags

    def _tag_ids(self, table) -> np.ndarray:
        """[frames of the table's stories, max_tags] hashed tag ids, 0-padded."""
        columns = [table.column(c).to_pylist() for c in TAG_COLUMNS]
        rows = [
            hash_tags(o, a, l, self.tag_vocab, self.max_tags)
            for story in zip(*columns)
            for o, a, l in zip(*story)
        ]
        out = np.zeros((len(rows), self.max_tags), dtype=np.int64)
        for index, ids in enumerate(rows):
            out[index, : len(ids)] = ids
        return out

    def _pad_tokens(self, stories: list[list[list[int]]]) -> np.ndarray:
        rows = [ids for story in stories for ids in story]
        out = np.full((len(rows), self.max_tokens), self.pad_id, dtype=np.int64)
        for index, ids in enumerate(rows):
            if len(ids) > self.max_tokens:
                ids = ids[: self.max_tokens - 1] + [self.eos_id]
            out[index, : len(ids)] = ids
        return out

    def _batch(self, frames: np.ndarray, tokens: np.ndarray, index: np.ndarray, sentences,
               tags: np.ndarray | None = None) -> dict:
        """``index`` [B, K+1] absolute frame rows → tensors."""
        pixels = torch.from_numpy(frames[index]).permute(0, 1, 4, 2, 3).float().div_(255.0)
        ids = torch.from_numpy(tokens[index])
        batch = {
            "frames": pixels[:, :-1].contiguous(),
            "tokens": ids[:, :-1].contiguous(),
            "target_frame": pixels[:, -1].contiguous(),
            "target_tokens": ids[:, -1].contiguous(),
        }
        if tags is not None:  # input frames only: the target's tags would leak the answer
            batch["tags"] = torch.from_numpy(tags[index[:, :-1]])
        if self.with_text:
            batch["story_ids"] = [sentences[row[-1]][0] for row in index]
            batch["input_sentences"] = [[sentences[i][1] for i in row[:-1]] for row in index]
            batch["target_sentences"] = [sentences[row[-1]][1] for row in index]
        return batch

    def __iter__(self) -> Iterator[dict]:
        """Batches are consecutive runs of this epoch's window sequence, so resuming at batch n
        means skipping exactly n*B windows, and whole chunks are skipped without being read."""
        per_rank = self._rank_stories()
        limit = len(self) * self.batch_size if self.equalize else None
        steps = np.arange(self.context + 1, dtype=np.int64)
        carry: list[dict] = []  # the partial batch left at the end of the previous chunk
        carried = 0
        skip = self.start_batch * self.batch_size
        consumed = 0
        for chunk_index, chunk in enumerate(self._chunks(per_rank[self.rank])):
            if limit is not None and consumed >= limit:
                break
            pairs = self._chunk_windows(chunk_index, chunk)
            if limit is not None:
                pairs = pairs[: limit - consumed]
            consumed += len(pairs)
            if skip >= len(pairs):
                skip -= len(pairs)
                continue
            pairs, skip = pairs[skip:], 0
            frames, tokens, offsets, sentences, tags = self._load_chunk(chunk)
            rows = (offsets[pairs[:, 0]] + pairs[:, 1])[:, None] + steps[None, :]
            start = 0
            if carried:
                take = min(self.batch_size - carried, len(rows))
                carry.append(self._batch(frames, tokens, rows[:take], sentences, tags))
                carried, start = carried + take, take
                if carried == self.batch_size:
                    yield _concat_batches(carry)
                    carry, carried = [], 0
            while len(rows) - start >= self.batch_size:
                yield self._batch(frames, tokens, rows[start:start + self.batch_size], sentences, tags)
                start += self.batch_size
            if start < len(rows):
                carry.append(self._batch(frames, tokens, rows[start:], sentences, tags))
                carried += len(rows) - start
        if carried and not self.equalize:
            yield _concat_batches(carry)


def _concat_batches(parts: list[dict]) -> dict:
    out = {}
    for key in parts[0]:
        if isinstance(parts[0][key], torch.Tensor):
            out[key] = torch.cat([part[key] for part in parts])
        else:
            out[key] = [item for part in parts for item in part[key]]
    return out
