"""Parquet sources in the layouts users hold StoryReasoning in: ``<source>/{train,test}/*.parquet``
(storymm synth), a Hugging Face snapshot's ``<source>/data/<split>-NNNNN-of-NNNNN.parquet`` and the
flat ``<source>/<split>-*.parquet``, locally and on the S3 server: all prepare into the same bytes."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storymm import storage
from storymm.cli import main as cli_main
from storymm.data import synth
from storymm.data.prepare import MANIFEST_FILE, prepare
from storymm.data.sources import PARQUET_LAYOUTS, ParquetSource, open_source

from small import ROOT, SMALL, small_config


def _rows(uris: list[str]) -> list[dict]:
    return [row for uri in uris for row in pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()]


def _write(uri: str, rows: list[dict]) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=synth.SOURCE_SCHEMA), buffer, row_group_size=3)
    storage.write_bytes(uri, buffer.getvalue())


def _hub_layout(folders_source: str, out: str, prefix: str = "data") -> None:
    """Rewrite a ``train/``/``test/`` source as the hub names its files: the train rows split over two
    files, the test rows in one (row groups of 3, unlike synth's), in the same order."""
    for split, parts in (("train", 2), ("test", 1)):
        rows = _rows(storage.list_files(storage.join(folders_source, split), suffix=".parquet"))
        cut = [round(i * len(rows) / parts) for i in range(parts + 1)]
        for part in range(parts):
            name = f"{split}-{part:05d}-of-{parts:05d}.parquet"
            _write(storage.join(out, *([prefix] if prefix else []), name), rows[cut[part] : cut[part + 1]])


def _prepared(source: str, data: str) -> dict:
    prepare(source, data, small_config(), progress=False)
    manifest = json.loads(storage.read_text(storage.join(data, MANIFEST_FILE)))
    manifest.pop("source")  # where the rows came from: the one thing that differs
    return manifest


@pytest.fixture(scope="module")
def folders_source(tmp_path_factory) -> str:
    source = str(tmp_path_factory.mktemp("folders") / "src")
    synth.synthesize(source, 14, seed=3, frames=(6, 9), rows_per_file=4, progress=False)
    return source


@pytest.fixture(scope="module")
def folders_manifest(folders_source, tmp_path_factory) -> dict:
    return _prepared(folders_source, str(tmp_path_factory.mktemp("folders-data")))


def _shard_hashes(manifest: dict) -> dict:
    return {split: [shard["sha256"] for shard in shards] for split, shards in manifest["shards"].items()}


@pytest.mark.parametrize("prefix", ["data", ""])
def test_hub_layouts_prepare_to_the_same_shards_locally(folders_source, folders_manifest, tmp_path, prefix):
    hub = str(tmp_path / "sr")
    _hub_layout(folders_source, hub, prefix)
    source = open_source(hub)
    assert isinstance(source, ParquetSource)
    assert [storage.basename(u) for u in source.files["train"]] == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
    ]
    assert source.rows == ParquetSource(folders_source).rows
    data = str(tmp_path / "data")  # through the command users run
    overrides = [arg for override in SMALL for arg in ("--set", override)]
    assert cli_main(
        ["prepare", "--source", hub, "--out", data, "--config", str(ROOT / "configs/tiny.yaml"), *overrides]
    ) in (0, None)
    manifest = json.loads(storage.read_text(storage.join(data, MANIFEST_FILE)))
    manifest.pop("source")
    assert _shard_hashes(manifest) == _shard_hashes(folders_manifest)
    assert manifest == folders_manifest


def test_hub_snapshot_in_a_bucket_prepares_to_the_same_shards(folders_source, folders_manifest, s3_env, tmp_path):
    hub = storage.join(s3_env, "sr")
    _hub_layout(folders_source, hub)
    assert all(uri.startswith(f"{hub}/data/") for uri in ParquetSource(hub).files["train"])
    manifest = _prepared(hub, storage.join(s3_env, "data"))
    assert _shard_hashes(manifest) == _shard_hashes(folders_manifest)
    assert manifest == folders_manifest


def test_other_splits_and_files_are_not_read(folders_source, tmp_path):
    hub = str(tmp_path / "sr")
    _hub_layout(folders_source, hub)
    _write(str(tmp_path / "sr" / "data" / "validation-00000-of-00001.parquet"), [])
    _write(str(tmp_path / "sr" / "data" / "trainer-notes.parquet"), [])
    files = ParquetSource(hub).files
    assert sorted(files) == ["test", "train"]
    assert all(storage.basename(u).startswith(("train-", "test-")) for us in files.values() for u in us)


def test_a_folder_in_no_known_layout_names_the_layouts(tmp_path):
    (tmp_path / "sr" / "data").mkdir(parents=True)
    _write(str(tmp_path / "sr" / "data" / "stories.parquet"), [])
    with pytest.raises(FileNotFoundError) as raised:
        open_source(str(tmp_path / "sr"))
    message = str(raised.value)
    assert all(layout in message for layout in PARQUET_LAYOUTS)
