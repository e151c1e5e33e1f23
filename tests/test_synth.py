"""Synthetic stories: the exact source schema, determinism, and that they are learnable as promised
(the text says what the pixels show, and the cut structure makes two-frames-back the best input)."""

from __future__ import annotations

import io
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from storymm.cli import main
from storymm.data import synth

GDI = re.compile(r"<gdi image(\d+)>(.*?)</gdi>", re.S)
TAG = re.compile(r"<(/?)(gd[a-z])\b([^>]*)>")
SENTENCE = re.compile(
    r"The <gdo (\w+)>(\w+) (\w+)</gdo> <gda \1>\w+ ([a-z ]+)</gda> "
    r"(?:in the (middle)|near the ([a-z ]+)) of the <gdl (bg\d)>[a-z ]+</gdl>\."
)
CELL_OF_PHRASE = {phrase: cell for cell, phrase in synth.LOCATIONS.items()}


def _rows(root) -> dict[str, list[dict]]:
    out = {}
    for split in ("train", "test"):
        folder = os.path.join(root, split)
        out[split] = [
            row for name in sorted(os.listdir(folder)) for row in pq.read_table(os.path.join(folder, name)).to_pylist()
        ]
    return out


def _sample_rows(n: int, seed: int = 0) -> list[dict]:
    rows = []
    for index in range(n):
        rng = synth.story_rng(seed, index)
        rows.append(synth.render_story(rng, index, int(rng.integers(8, 15))))
    return rows


def _decode(image: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image["bytes"])).convert("RGB"))


def _bboxes(chain_of_thought: str) -> list[tuple[str, tuple[int, ...]]]:
    """(entity id, bounding box) per ``## Image N`` section, in order."""
    sections = re.split(r"^## Image \d+\n", chain_of_thought, flags=re.M)[1:]
    out = []
    for section in sections:
        match = re.search(r"^\| ((?:char|obj)\d+) \|.*\| (\d+,\d+,\d+,\d+) \|$", section, flags=re.M)
        out.append((match.group(1), tuple(int(v) for v in match.group(2).split(","))))
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth"))
    summary = synth.synthesize(root, 14, seed=3, rows_per_file=5, progress=False)
    return root, summary


def test_layout_schema_and_summary(written):
    root, summary = written
    rows = _rows(root)
    assert summary["out"] == root
    assert summary["train"] == len(rows["train"]) and summary["test"] == len(rows["test"])
    assert summary["train"] + summary["test"] == 14 and summary["test"] >= 1 and summary["train"] >= 1
    assert sorted(os.listdir(os.path.join(root, "train"))) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert all(os.path.isfile(uri) for uri in summary["files"])
    for uri in summary["files"]:
        assert pq.read_schema(uri).equals(synth.SOURCE_SCHEMA, check_metadata=False)
    ids = [row["story_id"] for split in rows.values() for row in split]
    assert len(set(ids)) == 14 and all(re.fullmatch(r"synth-\d{8}", i) for i in ids)
    # render_story rows are valid source rows on their own (tests corrupt them).
    pa.Table.from_pylist(_sample_rows(2), schema=synth.SOURCE_SCHEMA)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    def files(root, seed):
        summary = synth.synthesize(str(root), 4, seed=seed, frames=(5, 7), progress=False)
        return {os.path.relpath(uri, root): open(uri, "rb").read() for uri in summary["files"]}

    first, again, other = files(tmp_path / "a", 7), files(tmp_path / "b", 7), files(tmp_path / "c", 8)
    assert first == again
    assert first != other


def test_story_does_not_depend_on_story_count_and_rerun_removes_stale_parts(tmp_path):
    big = synth.synthesize(str(tmp_path / "x"), 6, frames=(5, 6), rows_per_file=1, progress=False)
    small = synth.synthesize(str(tmp_path / "x"), 3, frames=(5, 6), rows_per_file=1, progress=False)
    assert len(big["files"]) == 6 and len(small["files"]) == 3
    left = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(tmp_path / "x") for f in fs)
    assert left == sorted(small["files"])
    by_id = {r["story_id"]: r for split in _rows(str(tmp_path / "x")).values() for r in split}
    for index in range(3):
        rng = synth.story_rng(0, index)
        assert by_id[f"synth-{index:08d}"] == synth.render_story(rng, index, int(rng.integers(5, 7)))


def test_split_keeps_one_story_each_side_and_validates_arguments(tmp_path):
    summary = synth.synthesize(str(tmp_path / "two"), 2, frames=(3, 3), progress=False)
    assert (summary["train"], summary["test"]) == (1, 1)
    summary = synth.synthesize(str(tmp_path / "many"), 40, frames=(2, 2), progress=False)
    assert summary["test"] == round(40 * 0.15)
    with pytest.raises(ValueError):
        synth.synthesize(str(tmp_path / "bad"), 3, frames=(5, 4), progress=False)


def test_frames_blocks_and_tags(written):
    root, _ = written
    for row in [r for split in _rows(root).values() for r in split]:
        n = row["frame_count"]
        assert n == len(row["images"]) and 8 <= n <= 14
        blocks = GDI.findall(row["story"])
        assert [int(number) for number, _ in blocks] == list(range(1, n + 1))
        assert GDI.sub("", row["story"]).strip() == ""  # nothing outside the blocks
        assert len(row["story"].splitlines()) == n
        for _, body in blocks:
            stack = []
            for closing, name, _ in TAG.findall(body):
                if closing:
                    assert stack and stack.pop() == name
                else:
                    stack.append(name)
            assert not stack
        assert [line for line in row["chain_of_thought"].splitlines() if line.startswith("## Image")] == [
            f"## Image {i}" for i in range(1, n + 1)
        ]
        for i, image in enumerate(row["images"], start=1):
            assert image["path"] == f"{row['story_id']}/frame_{i:02d}.png"


def test_images_decode_with_varied_sizes():
    sizes = set()
    for row in _sample_rows(20):
        story_sizes = {Image.open(io.BytesIO(image["bytes"])).size for image in row["images"]}
        assert len(story_sizes) == 1  # one camera per story
        ((width, height),) = story_sizes
        assert 160 <= width <= 256 and 80 <= height <= 128
        sizes.add((width, height))
    assert len(sizes) >= 10


def test_cut_structure_makes_two_back_the_closest_input():
    """After resizing to the model's 125x60, frame t is much closer to t-2 than to t-1."""
    last, two_back = [], []
    for row in _sample_rows(40, seed=1):
        frames = [
            np.asarray(
                Image.open(io.BytesIO(im["bytes"])).convert("RGB").resize((125, 60), Image.BILINEAR), dtype=np.float32
            )
            / 255
            for im in row["images"]
        ]
        for t in range(2, len(frames)):
            last.append(np.abs(frames[t] - frames[t - 1]).mean())
            two_back.append(np.abs(frames[t] - frames[t - 2]).mean())
    last, two_back = float(np.mean(last)), float(np.mean(two_back))
    print(f"mean L1 to t-1: {last:.4f}, to t-2: {two_back:.4f}")
    assert two_back < 0.6 * last
    assert last > 0.1  # copying the last frame is a weak baseline


def test_text_says_what_the_pixels_show():
    """Colour, location cell, bounding box and direction in the text all match the drawn shape."""
    for row in _sample_rows(25, seed=2):
        sentences = [body for _, body in GDI.findall(row["story"])]
        boxes = _bboxes(row["chain_of_thought"])
        seen = {}
        for t, (image, sentence, (box_entity, box)) in enumerate(zip(row["images"], sentences, boxes)):
            match = SENTENCE.search(sentence)
            assert match, sentence
            entity, colour, _kind, direction, middle, near, _bg = match.groups()
            assert entity == box_entity
            pixels = _decode(image)
            height, width, _ = pixels.shape
            ys, xs = np.nonzero(np.all(pixels == synth.SHAPE_COLOURS[colour], axis=-1))
            assert len(xs) > 0.01 * height * width  # clearly visible
            drawn = (xs.min(), ys.min(), xs.max(), ys.max())
            assert drawn == box
            cx, cy = (drawn[0] + drawn[2] + 1) / 2, (drawn[1] + drawn[3] + 1) / 2
            assert CELL_OF_PHRASE[middle or near] == (min(2, int(3 * cy / height)), min(2, int(3 * cx / width)))
            # Direction: when the phrase holds until the shot's next frame (no bounce), the shape
            # moved that way.
            if entity in seen and seen[entity][0] == direction:
                dx, dy = cx - seen[entity][1], cy - seen[entity][2]
                for word, ok in (("right", dx > 0), ("left", dx < 0), ("down", dy > 0), ("up", dy < 0)):
                    if word in direction.split():
                        assert ok, (row["story_id"], t, direction, dx, dy)
            seen[entity] = (direction, cx, cy)


# ---- the textured camera-pan scene ----------------------------------------------------------------
PAN_SENTENCE = re.compile(
    r"The <gdo (char\d)>camera</gdo> <gda \1>\w+ ([a-z ]+?)(?: and zooms (in|out))?</gda> "
    r"over the <gdl (bg\d)>[a-z ]+</gdl>(?: with an? <gdo (obj\d+)>(\w+) (box|disc)</gdo> "
    r"(?:in the (middle)|near the ([a-z ]+)))?\."
)


def _pan_rows(n: int, seed: int = 0) -> list[dict]:
    rows = []
    for index in range(n):
        rng = synth.story_rng(seed, index)
        rows.append(synth.render_pan_story(rng, index, int(rng.integers(8, 15))))
    return rows


def test_pan_scene_same_seed_same_bytes_and_valid_schema(tmp_path):
    def files(root, seed):
        summary = synth.synthesize(str(root), 4, seed=seed, frames=(5, 7), progress=False, scene="pan")
        return {os.path.relpath(uri, root): open(uri, "rb").read() for uri in summary["files"]}

    first, again, other = files(tmp_path / "a", 7), files(tmp_path / "b", 7), files(tmp_path / "c", 8)
    assert first == again and first != other
    shapes = synth.synthesize(str(tmp_path / "s"), 4, seed=7, frames=(5, 7), progress=False)
    assert {os.path.relpath(u, tmp_path / "s") for u in shapes["files"]} == set(first)
    for name in first:
        assert first[name] != open(tmp_path / "s" / name, "rb").read()  # another scene, other pixels
        assert pq.read_schema(tmp_path / "a" / name).equals(synth.SOURCE_SCHEMA, check_metadata=False)
    with pytest.raises(ValueError, match="unknown scene"):
        synth.synthesize(str(tmp_path / "bad"), 2, scene="film", progress=False)


def test_pan_scene_text_and_boxes_say_what_the_pixels_show():
    for row in _pan_rows(12, seed=4):
        sentences = [body for _, body in GDI.findall(row["story"])]
        assert len(sentences) == row["frame_count"] == len(row["images"])
        sections = re.split(r"^## Image \d+\n", row["chain_of_thought"], flags=re.M)[1:]
        for image, sentence, section in zip(row["images"], sentences, sections):
            match = PAN_SENTENCE.search(sentence)
            assert match, sentence
            obj, colour, near_middle, near = match.group(5), match.group(6), match.group(8), match.group(9)
            if obj is None:
                continue
            box = re.search(rf"^\| {obj} \|.*\| (\d+),(\d+),(\d+),(\d+) \|$", section, flags=re.M)
            x1, y1, x2, y2 = (int(v) for v in box.groups())
            pixels = _decode(image).astype(np.int32)
            height, width, _ = pixels.shape
            # The named object's colour fills the middle of its box (bilinear sampling blurs the edges).
            cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
            assert np.abs(pixels[cy, cx] - np.array(synth.SHAPE_COLOURS[colour])).max() <= 12, (sentence, box.groups())
            cell = CELL_OF_PHRASE[near_middle or near]
            assert cell == (min(2, int(3 * ((y1 + y2 + 1) / 2) / height)), min(2, int(3 * ((x1 + x2 + 1) / 2) / width)))


def test_pan_scene_moves_within_a_shot_so_no_input_frame_is_a_copy():
    """At 125x60: two frames back is the closest input on average, but far from exact (the pan
    shifted it), and the last frame (the other shot) is much further."""
    last, two_back, best = [], [], []
    for row in _pan_rows(20, seed=1):
        frames = [
            np.asarray(
                Image.open(io.BytesIO(im["bytes"])).convert("RGB").resize((125, 60), Image.BILINEAR), dtype=np.float32
            )
            / 255
            for im in row["images"]
        ]
        for t in range(4, len(frames)):
            dist = [np.abs(frames[t] - frames[t - back]).mean() for back in (1, 2, 3, 4)]
            last.append(dist[0])
            two_back.append(dist[1])
            best.append(min(dist))
    last, two_back, best = float(np.mean(last)), float(np.mean(two_back)), float(np.mean(best))
    print(f"pan: mean L1 to t-1 {last:.4f}, to t-2 {two_back:.4f}, best input {best:.4f}")
    assert two_back < 0.7 * last
    assert best > 0.06  # the motion makes even the best input frame a poor copy


# ---- words never seen in training --------------------------------------------------------------
def _words(rows: list[dict]) -> set[str]:
    text = " ".join(re.sub(r"<[^>]+>", " ", body) for row in rows for _, body in GDI.findall(row["story"]))
    return set(re.findall(r"[a-z]+", text.lower()))


@pytest.mark.parametrize("scene", ["shapes", "pan"])
def test_unseen_words_test_split_names_things_with_words_no_train_story_uses(tmp_path, capsys, scene):
    """``unseen_words``: every subject, colour and place word of the test sentences is absent from the
    train sentences (and the drawn colours follow the names); without it both splits share them."""
    train_words, test_words = synth.UNSEEN_WORDS["train"].names(), synth.UNSEEN_WORDS["test"].names()
    assert not train_words & test_words
    argv = ["synth", "--out", str(tmp_path / "u"), "--stories", "40", "--frames", "5-8", "--scene", scene]
    assert main([*argv, "--unseen-words"]) == 0
    assert "words no train story uses" in capsys.readouterr().out
    rows = _rows(str(tmp_path / "u"))
    seen, unseen = _words(rows["train"]), _words(rows["test"])
    named = unseen & test_words
    assert len(named) >= 6, named  # the test stories do use the new words
    assert not seen & test_words and not unseen & (train_words - test_words)
    assert {"the", "of", "near"} & seen & unseen  # the sentence frame stays the same
    sentence = SENTENCE if scene == "shapes" else PAN_SENTENCE
    colour_group = 2 if scene == "shapes" else 6
    for row in rows["test"][:5]:
        for image, (_, body) in zip(row["images"], GDI.findall(row["story"])):
            colour = sentence.search(body).group(colour_group)
            if colour is not None:  # its pixels are in the frame
                assert np.any(np.abs(_decode(image).astype(int) - synth.SHAPE_COLOURS[colour]).max(-1) <= 12)

    synth.synthesize(str(tmp_path / "a"), 40, seed=0, frames=(5, 8), progress=False, scene=scene)
    rows = _rows(str(tmp_path / "a"))
    assert _words(rows["test"]) & test_words & _words(rows["train"])
