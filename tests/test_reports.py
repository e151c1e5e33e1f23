"""The report writer: every file, self-contained HTML, escaping, images that are not blank."""

from __future__ import annotations

import base64
import io
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from storymm import storage
from storymm.evaluation.report import loss_terms, render_table, write_report

XSS = "<script>alert(1)</script>"


def _report():
    return {
        "run": "gate <b>run</b>",
        "split": "test",
        "checkpoint": "runs/gate/checkpoints/step-100",
        "windows": 40,
        "metrics": {
            "image_mse": 0.05,
            "image_l1": 0.14,
            "ssim": 0.3,
            "psnr": 14.2,
            "perplexity": 30.1,
            "text_ce_true": 3.2,
            "text_ce_shuffled": 3.5,
            "bleu": 0.05,
            "cross_modal_similarity": 0.2,
            "retrieval_r1": 0.1,
            "retrieval_r10": 0.4,
            "prediction_spread": 0.11,
            "target_spread": 0.2,
        },
        "floors": {
            "median_image_l1": 0.153,
            "median_image_mse": 0.045,
            "copy_last_l1": 0.172,
            "copy_last_mse": 0.08,
        },
    }


def _history():
    return {
        "visual_ae": [{"step": s, "loss": 1.0 / (s + 1), "l1": 0.5 / (s + 1), "lr": 1e-3} for s in range(20)],
        "sequence": [
            {"step": s, "loss": 4.0 - 0.1 * s, "text_ce": 3.0 - 0.05 * s, "l1": 0.3 - 0.005 * s} for s in range(15)
        ],
    }


def _samples():
    rng = np.random.default_rng(0)
    k, h, w = 4, 24, 40
    uint8_sample = {
        "inputs": rng.integers(0, 256, size=(k, h, w, 3), dtype=np.uint8),
        "target": rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8),
        "prediction": rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8),
        "input_sentences": ["A cat enters.", "It looks around.", "A dog barks.", "The cat hides."],
        "target_sentence": XSS,
        "generated_sentence": "the cat & the dog",
    }
    float_sample = {
        "inputs": torch.rand(k, 3, h, w),
        "target": torch.rand(3, h, w),
        "prediction": torch.full((3, h, w), 0.5),
        "input_sentences": ["one", "two", "three", "four"],
        "target_sentence": "five",
        "generated_sentence": '<img src=x onerror="alert(2)">',
    }
    return [uint8_sample, float_sample]


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_write_report_all_files(tmp_path):
    out = str(tmp_path / "report")
    uris = write_report(_report(), out, metrics_history=_history(), samples=_samples(), title="night <1>")
    for name in ("report.json", "report.html", "report.md", "loss_curves.png", "samples.png"):
        assert os.path.isfile(os.path.join(out, name)), name
        assert uris[name] == storage.join(out, name)
    assert list(uris)[-1] == "report.json"  # written last: the completion marker
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]

    assert json.loads(storage.read_text(uris["report.json"])) == _report()

    page = storage.read_text(uris["report.html"])
    # metrics table against the floors
    assert "<table" in page and "Metrics against the floors" in page
    for needle in ("image_l1", "median_image_l1", "copy_last_l1", "image_mse", "text_ce_shuffled", "✓"):
        assert needle in page, needle
    assert "0.14" in page and "0.153" in page
    # self-contained: both PNGs embedded and decodable, and identical to the files beside the page
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == 2
    files = {storage.read_bytes(uris["loss_curves.png"]), storage.read_bytes(uris["samples.png"])}
    assert {base64.b64decode(b) for b in embedded} == files
    for data in files:
        pixels = _decode(data)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels.std() > 0  # not blank

    md = storage.read_text(uris["report.md"])
    assert "| image_l1 |" in md and "(samples.png)" in md and "(loss_curves.png)" in md


def test_loss_curves_pair_each_term_with_its_validation_curve_and_leave_timing_out():
    """Small multiples: one panel per term, its train and val curves together; throughput, time and
    the time breakdown are not loss terms."""
    steps = [
        {"step": 10, "total": 2.0, "l1": 0.5, "lr": 1e-3, "samples_per_s": 50.0, "time": 1.7e9, "time/data_s": 0.1},
        {"step": 20, "total": 1.5, "l1": 0.4, "val_total": 1.8, "val_l1": 0.45, "val_windows": 64},
    ]
    terms = loss_terms(steps)
    assert sorted(terms) == ["l1", "total"]
    assert terms["total"] == {"train": ([10.0, 20.0], [2.0, 1.5]), "val": ([20.0], [1.8])}
    assert terms["l1"]["val"] == ([20.0], [0.45])


def test_everything_from_data_is_escaped(tmp_path):
    out = str(tmp_path)
    uris = write_report(_report(), out, metrics_history=_history(), samples=_samples(), title="t")
    page = storage.read_text(uris["report.html"])
    md = storage.read_text(uris["report.md"])
    for text in (page, md):
        assert "<script>" not in text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
        assert "<img src=x" not in text
        assert "<b>run</b>" not in text
        assert "gate &lt;b&gt;run&lt;/b&gt;" in text
    assert "the cat &amp; the dog" in page


def test_floor_marks():
    from storymm.evaluation.report import metrics_rows

    report = _report()
    report["metrics"]["image_mse"] = 0.06  # worse than the median floor, better than copy-last
    report["metrics"]["text_ce_true"] = 3.6  # worse than shuffled
    marks = {(r["metric"], r.get("floor")): r.get("better than floor") for r in metrics_rows(report)}
    assert marks[("image_l1", "median image (median_image_l1)")] == "✓"
    assert marks[("image_l1", "copy last input (copy_last_l1)")] == "✓"
    assert marks[("image_mse", "median image (median_image_mse)")] == "✗"
    assert marks[("image_mse", "copy last input (copy_last_mse)")] == "✓"
    assert marks[("text_ce_true", "shuffled condition (text_ce_shuffled)")] == "✗"
    report["metrics"]["prediction_spread"] = 0.0
    marks = {r["metric"]: r.get("better than floor") for r in metrics_rows(report)}
    assert marks["prediction_spread"] == "✗"
    # a missing median floor leaves the mark empty rather than guessing
    report["floors"]["median_image_l1"] = None
    rows = [r for r in metrics_rows(report) if r.get("floor", "").startswith("median image (median_image_l1")]
    assert rows[0]["better than floor"] is None


def test_without_history_or_samples(tmp_path):
    uris = write_report({"metrics": {"image_l1": 0.2}, "floors": {}}, str(tmp_path))
    assert set(uris) == {"report.json", "report.html", "report.md"}
    page = storage.read_text(uris["report.html"])
    assert "No training history" in page and "No samples" in page


def test_render_table():
    rows = [
        {"run": "baseline", "image_mse": 0.0777, "ssim": 0.155, "perplexity": 65.6},
        {"run": "a|b <i>", "image_mse": 0.0772, "ssim": None},
    ]
    md, page = render_table(rows, ["run", "image_mse", "ssim", "perplexity"])
    lines = md.strip().splitlines()
    assert lines[0] == "| run | image_mse | ssim | perplexity |"
    assert lines[1] == "|---|---|---|---|"
    assert lines[2] == "| baseline | 0.0777 | 0.155 | 65.6 |"
    assert lines[3] == "| a\\|b &lt;i&gt; | 0.0772 | — | — |"
    assert page.count("<tr>") == 3 and "<th>perplexity</th>" in page
    assert "&lt;i&gt;" in page and "<i>" not in page


def test_non_finite_values_become_null(tmp_path):
    uris = write_report({"metrics": {"psnr": float("inf"), "ssim": float("nan")}}, str(tmp_path))
    data = json.loads(storage.read_text(uris["report.json"]))
    assert data["metrics"] == {"psnr": None, "ssim": None}


@pytest.mark.parametrize("shape", [(3, 10, 12), (10, 12, 3)])
def test_image_layouts(shape):
    from storymm.evaluation.render import image_uint8 as _to_hwc_uint8

    arr = np.random.default_rng(1).random(shape).astype(np.float32)
    out = _to_hwc_uint8(torch.from_numpy(arr) if shape[0] == 3 else arr)
    assert out.shape == (10, 12, 3) and out.dtype == np.uint8


def _with_floors(l1: float) -> dict:
    report = _report()
    report["metrics"]["image_l1"] = l1
    report["floors"].update(
        copy_two_back_l1=0.110,
        mean_of_inputs_l1=0.160,
        best_input_oracle_l1=0.012,
        copy_two_back_mse=0.03,
        best_input_oracle_mse=0.002,
        bleu_copy_two_back=0.2,
        retrieval_r1_chance=0.025,
        retrieval_r10_chance=0.25,
    )
    return report


def test_verdict_names_the_strongest_floor_not_beaten():
    from storymm.evaluation.report import verdict_line

    # floors by strength: oracle .012 < two back .110 < median .153 < mean .160 < copy last .172
    line = verdict_line(_with_floors(0.155))
    assert "does not beat best_input_oracle (0.0120), the strongest floor it fails" in line
    assert "nor copy_two_back (0.1100), median_image (0.1530)" in line
    assert "beats copy_last, mean_of_inputs" in line
    # beats all but the oracle: says how far from it
    line = verdict_line(_with_floors(0.074))
    assert line == (
        "verdict: image L1 0.0740 beats every floor but best_input_oracle (0.0120): "
        "0.0620 above it (6.17x the oracle's error)"
    )
    line = verdict_line(_with_floors(0.009))
    assert "beats every floor, best_input_oracle (0.0120) included, by 25.0%" in line
    line = verdict_line(_with_floors(0.5))
    assert line.endswith("beats no floor")
    # equal to a floor is not beating it; reports without the new floors still get a verdict
    assert "does not beat copy_two_back" in verdict_line({**_with_floors(0.110), "floors": {"copy_two_back_l1": 0.110}})
    assert "beats every floor given (copy_last, median_image)" in verdict_line(_report())
    assert verdict_line({"metrics": {}, "floors": {}}).startswith("verdict: not available")


def test_new_floors_in_table_and_page(tmp_path):
    from storymm.evaluation.report import metrics_rows

    report = _with_floors(0.074)
    report["verdict"] = "verdict: <b>from the evaluation</b>"
    marks = {(r["metric"], r.get("floor")): r.get("better than floor") for r in metrics_rows(report)}
    assert marks[("image_l1", "oracle best input (best_input_oracle_l1)")] == "✗"
    assert marks[("image_l1", "copy input two back (copy_two_back_l1)")] == "✓"
    assert marks[("bleu", "repeat sentence two back (bleu_copy_two_back)")] == "✗"  # 0.05 < 0.2: higher is better
    assert marks[("retrieval_r1", "chance (1/N) (retrieval_r1_chance)")] == "✓"  # 0.1 > 0.025
    assert marks[("retrieval_r10", "chance (10/N) (retrieval_r10_chance)")] == "✓"
    # a metric whose floors the report lacks still gets its row
    assert ("ssim", None) in marks
    uris = write_report(report, str(tmp_path))
    for page in (storage.read_text(uris["report.html"]), storage.read_text(uris["report.md"])):
        assert "verdict: &lt;b&gt;from the evaluation&lt;/b&gt;" in page
        assert "best_input_oracle_l1" in page and "retrieval_r10_chance" in page
