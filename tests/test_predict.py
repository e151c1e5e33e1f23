"""``storymm predict`` and ``storymm export`` on a small trained run: a story of images and sentences
in, the next frames out, equal to what ``storymm evaluate`` computes for the same window; any image
format, size and name; the rollout fed back; an export that stands alone and refuses damage; the
page in headless Chromium; and each bad input as one ``storymm: error:`` line with nothing written."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import sacrebleu
import safetensors.torch
import torch
from PIL import Image, features

from storymm import storage
from storymm.cli import main as cli_main
from storymm.config import config_from_dict, load_config
from storymm.data.loader import PreparedDataset
from storymm.data.prepare import decode_frame
from storymm.evaluation.evaluate import evaluate, load_sequence_model
from storymm.evaluation.render import fmt, md_cell
from storymm.export import MODEL_FILES, load_export
from storymm.inference import predict_batch
from storymm.predict import continue_story, read_story
from storymm.training import checkpoint
from storymm.training.loop import train
from storymm.training.run import RunFolder
from storymm.training.stages import TokenizerInfo, window_loader

from browser import colourful, non_white, screenshot, table_header
from small import ROOT, small_config, small_dataset

K, H, W = 4, 32, 64  # configs/tiny.yaml
SETTINGS = [
    "train.sequence.steps=6",
    "train.sequence.checkpoint_every=6",
    "train.sequence.log_every=3",
    "model.tag_features=true",  # the <gdo>/<gda>/<gdl> spans of sentences.txt reach the model too
    "eval.median_windows=50",
    "eval.samples=2",
]
EXPLAINED = ("attention", "copy_weights", "copy_gate", "warp_params", "text_copy_weights", "text_copy_gate")
_GDI = re.compile(r"<gdi\s+image\s*(\d+)\s*>(.*?)</gdi\s*>", re.IGNORECASE | re.DOTALL)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A sequence run (6 steps, tag features, warp head) and a visual_ae run on 16 synthetic stories of
    5-7 frames, the sequence run evaluated on the test split and exported; the test split's source rows."""
    root = tmp_path_factory.mktemp("predict")
    config = small_config(*SETTINGS)
    data = small_dataset(str(root), 16, seed=4, frames=(5, 7), config=config)
    run, vis = str(root / "runs/seq"), str(root / "runs/vis")
    train(config, "sequence", data, run, progress=False)
    train(small_config("train.visual_ae.steps=2"), "visual_ae", data, vis, progress=False)
    report = evaluate(run, data, "test", str(root / "report"), progress=False)
    export = str(root / "export")
    assert cli_main(["export", "--run", run, "--out", export]) == 0
    src = root / "src"
    rows = [row for part in sorted((src / "test").glob("*.parquet")) for row in pq.read_table(part).to_pylist()]
    return {
        "root": root,
        "data": data,
        "run": run,
        "vis": vis,
        "report": report,
        "export": export,
        "src": src,
        "rows": rows,
    }


def gdi_blocks(row: dict) -> list[str]:
    """The ``<gdi imageN>`` bodies of a source row, in image order."""
    return [body for _, body in sorted(_GDI.findall(row["story"]), key=lambda match: int(match[0]))]


def story_folder(folder: Path, row: dict, count: int) -> Path:
    """The first ``count`` frames of a source row as a user's folder: the image bytes prepare read,
    as files, and their StoryReasoning text in sentences.txt."""
    folder.mkdir(parents=True)
    for i, image in enumerate(row["images"][:count], start=1):
        (folder / f"frame-{i:02d}.png").write_bytes(image["bytes"])
    blocks = gdi_blocks(row)[:count]
    (folder / "sentences.txt").write_text("\n".join(f"<gdi image{i}>{b}</gdi>" for i, b in enumerate(blocks, 1)))
    return folder


def run_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli_main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def png_pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# -------------------------------------------------------------------------------- equality


def test_one_step_equals_what_evaluate_computes(world, tmp_path):
    """Every test window, given as the images and sentences prepare read for its story (as a user's
    folder), predicted by the exported model: the image, sentence, copy weights, gates and warp equal
    evaluation's for that window, and pooled over the split they give evaluate's image L1 and BLEU."""
    dataset = PreparedDataset(world["data"])
    _, config, model, _ = load_sequence_model(world["run"], TokenizerInfo.from_manifest(dataset.manifest))
    loader = window_loader(
        dataset, "test", config, batch_size=config.eval.batch_size, shuffle=False, equalize=False, with_ids=True
    )
    exported = load_export(world["export"])
    rows = {row["story_id"]: row for row in world["rows"]}
    decode = dataset.tokenizer.decode
    abs_error, values, hypotheses, references = 0.0, 0, [], []
    for batch in loader:
        reference = predict_batch(model, batch, config.data.max_tokens)
        for i, (story_id, start) in enumerate(batch["window_ids"]):
            folder = story_folder(tmp_path / f"{story_id}-{start}", rows[story_id], start + K)
            inputs, (frame,) = continue_story(exported, read_story(str(folder), H, W, K), steps=1)
            assert [f.name for f in inputs] == [f"frame-{j:02d}.png" for j in range(start + 1, start + K + 1)]
            torch.testing.assert_close(frame.image, reference.image[i], atol=1e-5, rtol=0)
            assert frame.sentence == decode(reference.tokens[i].tolist())
            for name in EXPLAINED:
                np.testing.assert_allclose(frame.explanation[name], reference.outputs[name][i].numpy(), atol=2e-6)
            abs_error += float((frame.image.double() - batch["target_frame"][i].double()).abs().sum())
            values += frame.image.numel()
            hypotheses.append(frame.sentence)
            references.append(decode(batch["target_tokens"][i].tolist()))
    report = world["report"]
    assert len(hypotheses) == report["windows"] >= 3
    assert abs_error / values == pytest.approx(report["metrics"]["image_l1"], rel=1e-5)
    bleu = sacrebleu.corpus_bleu(hypotheses, [references], lowercase=True).score / 100
    assert bleu == pytest.approx(report["metrics"]["bleu"], abs=1e-9)


# --------------------------------------------------------------------------------- the CLI


def test_rollout_writes_frames_story_and_page_and_feeds_each_prediction_back(world, tmp_path, capsys):
    row = world["rows"][0]
    n = len(row["images"])
    out = tmp_path / "out"
    folder = story_folder(tmp_path / "story", row, n)
    code, stdout, _ = run_cli(
        capsys, "predict", "--model", world["export"], "--story", folder, "--out", out, "--steps", 3
    )
    assert code == 0
    assert sorted(os.listdir(out)) == ["index.html", "next-1.png", "next-2.png", "next-3.png", "story.json"]
    record = json.loads((out / "story.json").read_text())
    names = [f"frame-{i:02d}.png" for i in range(n - K + 1, n + 1)]
    assert [f["name"] for f in record["inputs"]] == names and record["story_frames"] == n
    assert [f["sentence"] for f in record["inputs"]] == _plain(gdi_blocks(row)[-K:])
    assert record["inputs"][0]["objects"]  # the tags of the StoryReasoning text
    predictions = record["predictions"]
    assert [p["image"] for p in predictions] == ["next-1.png", "next-2.png", "next-3.png"]
    assert [p["inputs"] for p in predictions] == [
        names,
        names[1:] + ["next-1.png"],
        names[2:] + ["next-1.png", "next-2.png"],
    ]
    for p in predictions:
        assert png_pixels(out / p["image"]).shape == (H, W, 3)
        assert p["sentence"] in stdout and p["tokens"][0] == "[CLS]"
        e = p["explanation"]
        assert set(EXPLAINED) <= set(e) and set(EXPLAINED) <= set(record["fields"])
        assert len(e["copy_weights"]) == K and sum(e["copy_weights"]) == pytest.approx(1, abs=1e-5)
        assert (
            np.asarray(e["copy_gate"]).shape == (1, H, W) and 0 <= np.min(e["copy_gate"]) <= np.max(e["copy_gate"]) <= 1
        )
        assert np.asarray(e["warp_params"]).shape == (K, 3) and 0 <= e["text_copy_gate"] <= 1
    assert f"page: {out / 'index.html'}" in stdout

    # the last K-1 inputs and next-1.png with its sentence, as a folder: continues as the rollout did
    again = tmp_path / "again"
    again.mkdir()
    for i, image in enumerate(row["images"][n - K + 1 :], start=1):
        (again / f"{i}.png").write_bytes(image["bytes"])
    shutil.copy(out / "next-1.png", again / f"{K}.png")
    blocks = gdi_blocks(row)[n - K + 1 :] + [predictions[0]["sentence"]]
    (again / "sentences.txt").write_text("".join(f"<gdi image{i}>{b}</gdi>\n" for i, b in enumerate(blocks, 1)))
    assert run_cli(capsys, "predict", "--model", world["export"], "--story", again, "--out", tmp_path / "o2")[0] == 0
    second = json.loads((tmp_path / "o2/story.json").read_text())["predictions"][0]
    assert np.array_equal(png_pixels(tmp_path / "o2/next-1.png"), png_pixels(out / "next-2.png"))
    assert second["sentence"] == predictions[1]["sentence"]
    assert second["explanation"] == predictions[1]["explanation"]


def _plain(blocks: list[str]) -> list[str]:
    from storymm.data.gdi import clean_text

    return [clean_text(b) for b in blocks]


def test_run_export_and_parquet_row_predict_alike(world, tmp_path, capsys):
    """``--run`` and ``--model`` give the same prediction, and a source row (``parquet:URI#id``, the
    source folder or one of its files) gives what the same images and sentences as a folder give."""
    row = world["rows"][-1]
    story_id, n = row["story_id"], len(row["images"])
    part = sorted((world["src"] / "test").glob("*.parquet"))[0]
    outs = {
        "run+source": ("--run", world["run"], f"parquet:{world['src']}#{story_id}"),
        "model+file": ("--model", world["export"], f"parquet:{part}#{story_id}"),
        "model+folder": ("--model", world["export"], story_folder(tmp_path / "story", row, n)),
    }
    for name, (flag, model, story) in outs.items():
        assert run_cli(capsys, "predict", flag, model, "--story", story, "--out", tmp_path / name)[0] == 0, name
    records = {name: json.loads((tmp_path / name / "story.json").read_text()) for name in outs}
    assert records["run+source"]["model"]["origin"] == world["run"]
    assert records["model+file"]["model"]["origin"] == world["export"]
    assert records["model+file"]["model"]["run"] == world["run"]
    assert [f["name"] for f in records["run+source"]["inputs"]] == [f"image {i}" for i in range(n - K + 1, n + 1)]
    first = records["run+source"]
    for name, record in records.items():
        assert record["predictions"][0]["sentence"] == first["predictions"][0]["sentence"], name
        assert record["predictions"][0]["explanation"] == first["predictions"][0]["explanation"], name
        assert [{k: v for k, v in f.items() if k != "name"} for f in record["inputs"]] == [
            {k: v for k, v in f.items() if k != "name"} for f in first["inputs"]
        ], name
        assert np.array_equal(
            png_pixels(tmp_path / name / "next-1.png"), png_pixels(tmp_path / "run+source/next-1.png")
        )


def test_images_of_any_format_size_and_name_order_with_plain_sentences(tmp_path):
    """Pillow's formats and modes at any size, taken in name order (numbers as numbers), each decoded
    exactly as prepare decodes it; other files ignored; one plain sentence per line."""
    rng = np.random.default_rng(0)
    kinds = [("png", "RGB"), ("jpg", "RGB"), ("bmp", "RGB"), ("gif", "P"), ("png", "RGBA"), ("tif", "L")]
    kinds += [("webp", "RGB")] if features.check("webp") else []
    folder = tmp_path / "story"
    folder.mkdir()
    expected = []
    for i, (suffix, mode) in enumerate(kinds * 2, start=1):
        size = (int(rng.integers(20, 400)), int(rng.integers(20, 300)))
        picture = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
        buffer = io.BytesIO()
        picture.save(buffer, format={"jpg": "JPEG", "tif": "TIFF"}.get(suffix, suffix.upper()))
        (folder / f"shot {i}.{suffix}").write_bytes(buffer.getvalue())
        expected.append((f"shot {i}.{suffix}", buffer.getvalue()))
    (folder / "notes.md").write_text("not an image")
    sentences = [f"Shot {i} shows  a <b>thing</b> ." for i in range(1, len(expected) + 1)]
    (folder / "sentences.txt").write_text("\n\n".join(sentences) + "\n")
    story = read_story(str(folder), H, W, K)
    assert [f.name for f in story.frames] == [name for name, _ in expected]  # shot 2 before shot 10
    for frame, (name, data) in zip(story.frames, expected):
        assert frame.pixels.shape == (H, W, 3)
        assert np.array_equal(frame.pixels, np.frombuffer(decode_frame(data, W, H), np.uint8).reshape(H, W, 3)), name
    assert story.frames[1].text.sentence == "Shot 2 shows a thing."
    assert story.frames[1].text.objects == []


# ------------------------------------------------------------------------------- the export


def test_export_is_weights_config_tokenizer_and_a_card_citing_the_latest_report(world, tmp_path):
    export = Path(world["export"])
    assert sorted(os.listdir(export)) == [
        "README.md",
        "config.json",
        "export.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    record = json.loads((export / "export.json").read_text())
    for name in MODEL_FILES:
        assert record["files"][name]["bytes"] == (export / name).stat().st_size
    run_record = RunFolder(world["run"]).read_record()
    assert load_config(export / "config.json") == config_from_dict(run_record["config"])  # JSON is a --config
    state = checkpoint.load_latest(world["run"])
    weights = safetensors.torch.load_file(export / "model.safetensors")
    assert weights.keys() == state["model"].keys() and record["step"] == state["step"] == 6
    assert all(torch.equal(weights[k], state["model"][k]) for k in weights)

    report_uri, report = RunFolder(world["run"]).latest_report()
    assert report_uri == str(world["root"] / "report") and report["step"] == 6
    card = (export / "README.md").read_text()
    assert f"`{report_uri}`" in card and "step 6 (this export)" in card
    assert md_cell(report["verdict"]) in card
    assert f"| image_l1 | {fmt(report['metrics']['image_l1'])} |" in card
    assert world["data"] in card and "storymm predict --model" in card
    # the card is documentation: editing it does not stop the model loading
    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    (copy / "README.md").write_text(card + "\nOur notes.\n")
    assert load_export(str(copy)).step == 6


# ----------------------------------------------------------------------------- the page


def test_index_page_renders_in_chromium(world, tmp_path, capsys):
    row = world["rows"][0]
    folder = story_folder(tmp_path / "story", row, len(row["images"]))
    out = tmp_path / "out"
    assert run_cli(capsys, "predict", "--model", world["export"], "--story", folder, "--out", out, "--steps", 2)[0] == 0
    page = (out / "index.html").read_text()
    assert page.count('src="data:image/png;base64,') == K + 2
    pixels = screenshot(out / "index.html", tmp_path / "page.png", 1100)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100, "the page rendered flat"
    assert non_white(pixels) > 0.05
    assert table_header(pixels) > 0.001, "no explanation table in the screenshot"
    # the coloured frames are images that rendered: without them the page has next to no colour
    shown = colourful(pixels)
    blank = tmp_path / "blank.html"
    blank.write_text(re.sub(r'src="data:image/png;base64,[^"]+"', 'src=""', page))
    without = colourful(screenshot(blank, tmp_path / "blank.png", 1100))
    assert shown > 0.02 and without < shown / 10, (shown, without)


# ---------------------------------------------------------------------------- bad input


def _folder(tmp_path: Path, row: dict, images: int, sentences: int | None = None, gdi: bool = False) -> Path:
    folder = tmp_path / "story"
    folder.mkdir()
    for i, image in enumerate(row["images"][:images], start=1):
        (folder / f"frame-{i:02d}.png").write_bytes(image["bytes"])
    texts = gdi_blocks(row)[: images if sentences is None else sentences]
    if gdi:
        (folder / "sentences.txt").write_text("".join(f"<gdi image{i}>{t}</gdi>" for i, t in enumerate(texts, 1)))
    else:
        (folder / "sentences.txt").write_text("\n".join(_plain(texts)) + "\n")
    return folder


def _damaged_export(world, tmp_path: Path, damage) -> Path:
    copy = tmp_path / "export"
    shutil.copytree(world["export"], copy)
    damage(copy)
    return copy


def _garbled(folder: Path) -> Path:
    (folder / "frame-03.png").write_bytes(b"\x89PNG\r\n\x1a\n but the rest is not an image")
    return folder


BAD_INPUTS = {
    "fewer than K images": (
        lambda w, t: ["predict", "--model", w["export"], "--story", _folder(t, w["rows"][0], K - 1)],
        [f"{K - 1} image(s)", f"at least {K}"],
    ),
    "an unreadable image": (
        lambda w, t: ["predict", "--model", w["export"], "--story", _garbled(_folder(t, w["rows"][0], 5))],
        ["frame-03.png", "not a readable image"],
    ),
    "fewer sentences than images": (
        lambda w, t: ["predict", "--model", w["export"], "--story", _folder(t, w["rows"][0], 5, sentences=3)],
        ["3 sentences for 5 images", "one sentence per image"],
    ),
    "fewer <gdi> texts than images": (
        lambda w, t: ["predict", "--model", w["export"], "--story", _folder(t, w["rows"][0], 5, 4, gdi=True)],
        ["fewer sentences than images", "image(s) [5]"],
    ),
    "predict with a run of another stage": (
        lambda w, t: ["predict", "--run", w["vis"], "--story", _folder(t, w["rows"][0], 5)],
        ["visual_ae run", "predict takes a sequence run"],
    ),
    "export a run of another stage": (
        lambda w, t: ["export", "--run", w["vis"]],
        ["visual_ae run", "export takes a sequence run"],
    ),
    "an export with a missing file": (
        lambda w, t: [
            "predict",
            "--model",
            _damaged_export(w, t, lambda d: (d / "model.safetensors").unlink()),
            "--story",
            _folder(t, w["rows"][0], 5),
        ],
        ["model.safetensors is missing", "re-run storymm export"],
    ),
    "an export with an altered file": (
        lambda w, t: [
            "predict",
            "--model",
            _damaged_export(w, t, lambda d: (d / "config.json").write_text((d / "config.json").read_text() + " ")),
            "--story",
            _folder(t, w["rows"][0], 5),
        ],
        ["config.json does not match the hash recorded at export"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(world, tmp_path, capsys, case):
    make_args, words = BAD_INPUTS[case]
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, *make_args(world, tmp_path), "--out", out)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("storymm: error: "), stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not out.exists() and not stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA is unusable")
def test_gpus_named_but_unusable_stop_with_one_line(world, tmp_path, capsys, monkeypatch):
    """As training does: CUDA_VISIBLE_DEVICES naming a GPU torch cannot use is an error, not a CPU run."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    story = _folder(tmp_path, world["rows"][0], 5)
    code, _, stderr = run_cli(capsys, "predict", "--model", world["export"], "--story", story, "--out", tmp_path / "o")
    assert code == 2 and stderr.startswith("storymm: error: CUDA_VISIBLE_DEVICES=0 asks for GPUs")
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_bad_input_in_a_real_process_prints_only_the_error(world, tmp_path):
    """The same through the console script's process: no warning, no traceback, only progress lines
    (INFO) before the one error line."""
    story = _garbled(_folder(tmp_path, world["rows"][0], 5))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "storymm.cli",
            "predict",
            "--run",
            world["run"],
            "--story",
            story,
            "--out",
            tmp_path / "o",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines[-1].startswith("storymm: error: ") and "frame-03.png" in lines[-1]
    assert all(" INFO storymm." in line for line in lines[:-1]) and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------- S3


@pytest.mark.slow
def test_run_story_out_and_export_on_s3(world, s3_env, tmp_path, capsys):
    """RUN, STORY and OUT all in a bucket of the real S3 server (the run's dataset too), and an export
    written to and loaded from the bucket: the same prediction as from local disk."""
    bucket = s3_env
    local = {"data": world["data"], "run": world["run"]}
    for name, folder in local.items():  # the run.json names the local dataset: point it at the bucket copy
        for path in Path(folder).rglob("*"):
            if path.is_file():
                storage.write_bytes(storage.join(bucket, name, str(path.relative_to(folder))), path.read_bytes())
    record = RunFolder(storage.join(bucket, "run")).read_record()
    RunFolder(storage.join(bucket, "run")).write_record({**record, "data": storage.join(bucket, "data")})
    row = world["rows"][0]
    folder = story_folder(tmp_path / "story", row, len(row["images"]))
    for path in folder.iterdir():
        storage.write_bytes(storage.join(bucket, "story", path.name), path.read_bytes())

    s3_run, s3_export = storage.join(bucket, "run"), storage.join(bucket, "export")
    assert run_cli(capsys, "export", "--run", s3_run, "--out", s3_export)[0] == 0
    story = storage.join(bucket, "story")
    assert run_cli(capsys, "predict", "--run", s3_run, "--story", story, "--out", storage.join(bucket, "a"))[0] == 0
    assert (
        run_cli(capsys, "predict", "--model", s3_export, "--story", story, "--out", storage.join(bucket, "b"))[0] == 0
    )
    assert run_cli(capsys, "predict", "--model", world["export"], "--story", folder, "--out", tmp_path / "c")[0] == 0
    expected = json.loads((tmp_path / "c/story.json").read_text())["predictions"]
    for name in ("a", "b"):
        got = json.loads(storage.read_text(storage.join(bucket, name, "story.json")))["predictions"]
        assert [p["sentence"] for p in got] == [p["sentence"] for p in expected]
        assert got[0]["explanation"] == expected[0]["explanation"]
        png = storage.read_bytes(storage.join(bucket, name, "next-1.png"))
        assert np.array_equal(
            np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), png_pixels(tmp_path / "c/next-1.png")
        )
        assert storage.exists(storage.join(bucket, name, "index.html"))
