"""Where source stories come from: the Hugging Face hub (``datasets``) or parquet files at any URI.

Both yield plain row dicts in the StoryReasoning schema, batch by batch, so prepare never holds a
whole split in memory. Images stay as raw bytes here; prepare decodes them exactly once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.parquet as pq

from storymm import storage

SOURCE_SPLITS = ("train", "test")
SOURCE_COLUMNS = ("story_id", "images", "frame_count", "chain_of_thought", "story")
HF_PREFIX = "hf:"

#: The ways users hold StoryReasoning as parquet, tried in this order (``<split>`` is train or test).
#: The second is what ``huggingface-cli download``/``snapshot_download`` of the dataset gives.
PARQUET_LAYOUTS = (
    "<source>/<split>/*.parquet",
    "<source>/data/<split>-*.parquet",
    "<source>/<split>-*.parquet",
)
_SPLIT_FILE = re.compile(r"^(?P<split>[A-Za-z]+)(-[^/]*)?\.parquet$")


def _split_by_file_name(files: list[str]) -> dict[str, list[str]]:
    """Group hub-style files (``train-00000-of-00002.parquet``) by the split their name starts with."""
    by_split: dict[str, list[str]] = {split: [] for split in SOURCE_SPLITS}
    for uri in files:
        match = _SPLIT_FILE.match(storage.basename(uri))
        if match and match["split"] in by_split:
            by_split[match["split"]].append(uri)
    return by_split


def find_parquet_files(uri: str) -> dict[str, list[str]]:
    """Source parquet files per split, in the first of ``PARQUET_LAYOUTS`` that matches; sorted by
    name within a split, so shard order (and so the prepared bytes) does not depend on the layout."""
    in_folders = {split: storage.list_files(storage.join(uri, split), suffix=".parquet") for split in SOURCE_SPLITS}
    if any(in_folders.values()):
        return in_folders
    for folder in (storage.join(uri, "data"), uri):
        by_name = _split_by_file_name(storage.list_files(folder, suffix=".parquet"))
        if any(by_name.values()):
            return by_name
    raise FileNotFoundError(
        f"no StoryReasoning parquet files under {storage.redact(uri)}: looked for "
        f"{', '.join(PARQUET_LAYOUTS)} with <split> one of {'/'.join(SOURCE_SPLITS)} "
        "(a Hugging Face snapshot download has the second layout)"
    )


@dataclass
class Source:
    """A readable source with a row count per split (for progress bars)."""

    description: str
    rows: dict[str, int]

    def iter_batches(self, split: str, batch_size: int = 32, columns=SOURCE_COLUMNS) -> Iterator[list[dict]]:
        raise NotImplementedError


class ParquetSource(Source):
    """Parquet files at a local path or storage URI, in any of ``PARQUET_LAYOUTS``; read row group
    by row group, so a split never has to fit in memory."""

    def __init__(self, uri: str):
        self.uri = uri
        self.files = find_parquet_files(uri)
        rows = {}
        for split, files in self.files.items():
            rows[split] = sum(pq.ParquetFile(storage.open_input_file(f)).metadata.num_rows for f in files)
        super().__init__(storage.redact(uri), rows)

    def iter_batches(self, split, batch_size=32, columns=SOURCE_COLUMNS):
        for uri in self.files.get(split, []):
            parquet = pq.ParquetFile(storage.open_input_file(uri))
            present = [c for c in columns if c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=batch_size, columns=present):
                yield batch.to_pylist()


class HubSource(Source):
    """A Hugging Face dataset id (e.g. ``daniel3303/StoryReasoning``) or a local dataset folder.

    Loaded with ``datasets.load_dataset`` and read in Arrow format, which keeps the ``images``
    column as ``{bytes, path}`` structs instead of decoding every image to PIL.
    """

    def __init__(self, name: str):
        import datasets

        self.name = name
        self.dataset = datasets.load_dataset(name)
        missing = [s for s in SOURCE_SPLITS if s not in self.dataset]
        if "train" in missing:
            raise ValueError(f"dataset {name} has no train split (splits: {list(self.dataset)})")
        rows = {split: len(self.dataset[split]) for split in SOURCE_SPLITS if split in self.dataset}
        super().__init__(f"hf:{name}", rows)

    def iter_batches(self, split, batch_size=32, columns=SOURCE_COLUMNS):
        if split not in self.dataset:
            return
        table_view = self.dataset[split].with_format("arrow")
        present = [c for c in columns if c in self.dataset[split].column_names]
        for table in table_view.iter(batch_size=batch_size):
            yield table.select(present).to_pylist()


def open_source(spec: str) -> Source:
    """``hf:NAME`` or a bare hub id → the hub; a local folder, ``file://`` or ``s3://`` → parquet."""
    if spec.startswith(HF_PREFIX):
        return HubSource(spec[len(HF_PREFIX) :])
    if "://" in spec or os.path.exists(spec):
        return ParquetSource(spec)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return HubSource(spec)
    raise FileNotFoundError(f"source {spec!r} is neither an existing folder, a storage URI nor a hub id")
