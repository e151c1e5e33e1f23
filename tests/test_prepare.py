"""prepare end to end on real parquet: every source row kept or rejected with a reason, the manifest's
accounting, resized frames, tokenization, deterministic split, and the hub (datasets) reader."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from storymm.config import load_config
from storymm.data import synth
from storymm.data.gdi import StoryParseError, frame_texts, parse_story
from storymm.data.loader import DatasetError, PreparedDataset
from storymm.data.prepare import MANIFEST_FILE, assign_split, prepare

CONFIG = "configs/tiny.yaml"


def _png(mode: str, size=(90, 50), colour=None) -> bytes:
    picture = Image.new(mode, size, colour if colour is not None else (10,) * len(mode))
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def _good(index: int, frames: int = 8) -> dict:
    return synth.render_story(synth.story_rng(7, index), index, frames)


def _bad_rows() -> list[tuple[dict, str | None]]:
    """(row, expected rejection reason or None when the row must be kept)."""
    rows = []
    row = _good(100)
    row["images"][2] = {"bytes": b"", "path": "x"}
    row["images"][5] = {"bytes": b"not an image at all", "path": "y"}
    rows.append((row, None))  # two frames dropped, 6 left >= K+1=5
    row = _good(101, frames=6)
    row["images"][0] = {"bytes": b"\x89PNG\r\n\x1a\n truncated", "path": "z"}
    row["images"][1] = {"bytes": None, "path": "z"}
    rows.append((row, "too_few_usable_frames"))
    row = _good(102, frames=4)
    rows.append((row, "too_few_usable_frames"))
    row = _good(103)
    row["story"] = "no tags here at all"
    rows.append((row, "no_gdi_tags"))
    row = _good(104)
    row["story"] = row["story"].replace("</gdi>", "", 1)
    rows.append((row, "unclosed_gdi_tag"))
    row = _good(105)
    blocks = row["story"].split("\n")
    row["story"] = "\n".join(blocks[:-2])
    rows.append((row, "fewer_sentences_than_frames"))
    row = _good(106)
    row["frame_count"] = row["frame_count"] + 3
    rows.append((row, "frame_count_mismatch"))
    row = _good(107)
    row["images"][0] = {"bytes": _png("L", (300, 40)), "path": "gray.png"}
    row["images"][1] = {"bytes": _png("RGBA", (17, 91), (200, 10, 10, 128)), "path": "rgba.png"}
    row["images"][2] = {"bytes": _png("P", (33, 33), 3), "path": "palette.png"}
    rows.append((row, None))  # converted, not rejected
    row = _good(108)
    row["story_id"] = None
    rows.append((row, "missing_story_id"))
    row = _good(109)
    row["images"] = []
    row["frame_count"] = 0
    rows.append((row, "no_images"))
    dup = _good(110)
    rows.append((dup, None))
    rows.append((dict(dup), "duplicate_story_id"))
    return rows


def _write_source(root: str, train_rows: list[dict], test_rows: list[dict]) -> None:
    for split, rows in (("train", train_rows), ("test", test_rows)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        table = pa.Table.from_pylist(rows, schema=synth.SOURCE_SCHEMA)
        pq.write_table(table, os.path.join(root, split, "part-00000.parquet"))


@pytest.fixture(scope="module")
def messy_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    bad = _bad_rows()
    good = [_good(i) for i in range(20)]
    _write_source(str(root / "source"), good + [row for row, _ in bad], [_good(i) for i in range(200, 206)])
    config = load_config(CONFIG, ["data.rows_per_shard=7", "data.val_fraction=0.2"])
    manifest = prepare(str(root / "source"), str(root / "data"), config, progress=False)
    return root, manifest, bad


def test_every_row_is_kept_or_rejected_with_its_reason(messy_dataset):
    _root, manifest, bad = messy_dataset
    expected = {}
    for _row, reason in bad:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert manifest["rejected"] == expected
    assert manifest["dropped_frames"] == {"empty_image": 1, "undecodable_image": 1}
    assert manifest["source_rows"] == 20 + len(bad) + 6
    assert manifest["source_rows"] == sum(manifest["kept_stories"].values()) + sum(manifest["rejected"].values())
    assert manifest["kept_stories"]["test"] == 6
    assert manifest["kept_stories"]["train"] + manifest["kept_stories"]["val"] == 20 + 3


def test_shards_hold_resized_frames_tokens_and_tags(messy_dataset):
    root, manifest, _ = messy_dataset
    data = str(root / "data")
    rows = []
    for split in ("train", "val", "test"):
        for shard in manifest["shards"][split]:
            assert shard["rows"] <= 7
            table = pq.read_table(os.path.join(data, shard["path"]))
            assert table.num_rows == shard["rows"] == len(shard["frame_counts"])
            rows.extend(table.to_pylist())
    by_id = {row["story_id"]: row for row in rows}
    height, width = manifest["image_size"]
    dropped = by_id["synth-00000100"]
    assert dropped["frame_index"] == [0, 1, 3, 4, 6, 7]
    assert len(dropped["frames"]) == len(dropped["sentences"]) == len(dropped["token_ids"]) == 6
    converted = by_id["synth-00000107"]
    assert len(converted["frames"]) == 8
    for frame in converted["frames"]:
        assert len(frame) == height * width * 3
    rgba = np.frombuffer(converted["frames"][1], np.uint8).reshape(height, width, 3)
    assert rgba[..., 0].mean() > 60 and rgba[..., 1].mean() < 30  # alpha composited, not dropped
    story = _good(3)
    expected = [t.sentence for t in frame_texts(story["story"], story["frame_count"])]
    assert by_id["synth-00000003"]["sentences"] == expected
    assert "<" not in " ".join(expected)
    assert by_id["synth-00000003"]["objects"][0] and by_id["synth-00000003"]["locations"][0]
    token_ids = by_id["synth-00000003"]["token_ids"][0]
    assert token_ids[0] == manifest["tokenizer"]["bos_id"] and token_ids[-1] == manifest["tokenizer"]["eos_id"]


def test_manifest_checksums_and_split_are_deterministic(messy_dataset, tmp_path):
    root, manifest, _ = messy_dataset
    for shard in manifest["shards"]["train"]:
        import hashlib

        assert hashlib.sha256((root / "data" / shard["path"]).read_bytes()).hexdigest() == shard["sha256"]
    again = prepare(
        str(root / "source"),
        str(tmp_path / "again"),
        load_config(CONFIG, ["data.rows_per_shard=7", "data.val_fraction=0.2"]),
        progress=False,
    )
    assert again["shards"] == manifest["shards"]
    ids = [f"s{i}" for i in range(2000)]
    val = [i for i in ids if assign_split(i, "train", 0, 0.1) == "val"]
    assert 150 < len(val) < 250
    assert val != [i for i in ids if assign_split(i, "train", 1, 0.1) == "val"]  # seeded
    assert all(assign_split(i, "test", 0, 0.9) == "test" for i in ids[:50])


def test_reprepare_replaces_old_shards(messy_dataset, tmp_path):
    root, _, _ = messy_dataset
    out = str(tmp_path / "data")
    prepare(str(root / "source"), out, load_config(CONFIG, ["data.rows_per_shard=2"]), progress=False)
    many = len(os.listdir(os.path.join(out, "train")))
    manifest = prepare(str(root / "source"), out, load_config(CONFIG, ["data.rows_per_shard=50"]), progress=False)
    assert len(os.listdir(os.path.join(out, "train"))) == len(manifest["shards"]["train"]) < many


def test_readers_refuse_a_dataset_without_manifest(messy_dataset, tmp_path):
    root, _, _ = messy_dataset
    with pytest.raises(DatasetError, match="manifest.json"):
        PreparedDataset(str(tmp_path))
    assert (
        PreparedDataset(str(root / "data")).manifest["schema_version"]
        == json.loads((root / "data" / MANIFEST_FILE).read_text())["schema_version"]
    )


def test_gdi_parsing_edge_cases():
    parsed = parse_story("<gdi image2> B <gdo char1 obj3>x</gdo>.</gdi><gdi image1>A <gdl bg1>y</gdl> !</gdi>")
    assert parsed[1].sentence == "A y!" and parsed[1].locations == ["y"]
    assert parsed[2].objects == ["x"]
    with pytest.raises(StoryParseError) as err:
        parse_story("<gdi image1> a <gdi image2> b </gdi>")
    assert err.value.reason == "unclosed_gdi_tag"
    with pytest.raises(StoryParseError) as err:
        frame_texts("<gdi image1>a</gdi><gdi image3>c</gdi>", 3)
    assert err.value.reason == "fewer_sentences_than_frames"


def test_hub_reader_through_datasets(tmp_path, monkeypatch):
    """The real ``datasets.load_dataset`` path, on a local folder (nothing downloads in tests)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    synth.synthesize(str(tmp_path / "hub"), 12, seed=3, progress=False)
    manifest = prepare(f"hf:{tmp_path / 'hub'}", str(tmp_path / "data"), load_config(CONFIG), progress=False)
    assert manifest["source"].startswith("hf:")
    assert manifest["source_rows"] == 12 == sum(manifest["kept_stories"].values())


def test_trained_tokenizer_travels_with_the_dataset(tmp_path):
    synth.synthesize(str(tmp_path / "src"), 10, seed=1, progress=False)
    manifest = prepare(
        str(tmp_path / "src"), str(tmp_path / "data"), load_config(CONFIG, ["data.tokenizer=train"]), progress=False
    )
    dataset = PreparedDataset(str(tmp_path / "data"))
    assert dataset.tokenizer.vocab_size == manifest["tokenizer"]["vocab_size"] < 1000
    assert dataset.tokenizer.sha256() == manifest["tokenizer"]["sha256"]


def test_a_malformed_field_rejects_the_row_but_a_bug_surfaces(monkeypatch):
    from storymm.data import prepare as prepare_module

    row = _good(0)
    row["images"] = [{"bytes": 12345, "path": None}, *row["images"][1:]]  # not bytes: a malformed field
    assert prepare_module.check_row(row, min_frames=5, width=32, height=16).reason == "malformed_row"

    def broken(story, n_frames):  # a bug in storymm's own parsing is not a property of the row
        raise KeyError("image1")

    monkeypatch.setattr(prepare_module, "frame_texts", broken)
    with pytest.raises(KeyError):
        prepare_module.check_row(_good(1), min_frames=5, width=32, height=16)
