"""Nightly evaluation, comparison, report links and escaping, against a real S3-compatible server
(SeaweedFS on 127.0.0.1) and rendered in a real headless Chromium.

The S3 world (one tiny sequence run trained into a bucket, then nights 2026-01-01..03) is built once
per module; the tests check what it left behind."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from storymm import storage
from storymm.cli import main as cli_main
from storymm.evaluation import nightly
from storymm.evaluation.report import report_url, write_report
from storymm.training import checkpoint
from storymm.training.loop import train

from browser import colourful, non_white, screenshot, table_header
from s3server import point_storage_at
from small import SMALL as SMALL_MODEL
from small import small_config as shared_small_config
from small import small_dataset

ROOT = Path(__file__).resolve().parents[1]
SMALL = SMALL_MODEL + ["eval.median_windows=50", "eval.samples=3"]
EVIL = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


def small_config(*extra: str):
    return shared_small_config("eval.median_windows=50", "eval.samples=3", *extra)


def cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_main(list(args))
    return code, out.getvalue()


def read_json(uri: str) -> dict:
    return json.loads(storage.read_text(uri))


# ------------------------------------------------------------------------------- the S3 world


@pytest.fixture(scope="module")
def world(s3_server, tmp_path_factory):
    """Train a tiny run in a bucket; night 1 (ok), night 2 (worse checkpoint), rerun of night 2, and
    night 3 with an extra run that has no checkpoint. Returns what each step printed and left."""
    mp = pytest.MonkeyPatch()
    point_storage_at(s3_server, mp)
    bucket = "s3://" + s3_server.create_bucket()
    try:
        run, reports = (storage.join(bucket, n) for n in ("runs/seq", "reports"))
        data = small_dataset(bucket, 40, seed=3, frames=(6, 10), config=small_config())
        train(
            small_config("train.sequence.steps=6", "train.sequence.checkpoint_every=3", "train.sequence.log_every=1"),
            "sequence",
            data,
            run,
            progress=False,
        )
        nightly_uri = storage.join(reports, "nightly")
        w = {"bucket": bucket, "data": data, "run": run, "reports": reports, "nightly": nightly_uri}
        common = ["--data", data, "--reports", reports]

        w["night1"] = cli("nightly", "--runs", run, *common, "--date", "2026-01-01")

        # A deliberately worse checkpoint: the generated image saturates to white and the copy gate
        # is shut, so every prediction is a white frame.
        state = checkpoint.load_latest(run)
        hits = 0
        for key, tensor in state["model"].items():
            if key.endswith("content_head.bias"):
                tensor.fill_(50.0)
                hits += 1
            elif key.endswith("copy_gate_bias.bias"):
                tensor.fill_(-50.0)
                hits += 1
        assert hits >= 1, sorted(state["model"])
        state["step"] = int(state["step"]) + 1
        checkpoint.save(run, state, state["step"])

        w["night2"] = cli("nightly", "--runs", run, *common, "--date", "2026-01-02")
        w["index_after_2"] = read_json(storage.join(nightly_uri, "index.json"))
        w["index_html_after_2"] = storage.read_text(storage.join(nightly_uri, "index.html"))
        w["files_after_2"] = storage.list_files(storage.join(nightly_uri, "2026-01-02"), recursive=True)
        w["night2_json"] = read_json(storage.join(nightly_uri, "2026-01-02", "night.json"))

        # Rerun of night 2 through the Ray job entry point, as a separate process (real exit code).
        # A report left by a run that is no longer tracked must not survive the rerun.
        stale = storage.join(nightly_uri, "2026-01-02", "retired", "report.html")
        storage.write_text(stale, "<html>old</html>")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        w["rerun"] = subprocess.run(
            [sys.executable, "jobs/nightly_eval.py", "--runs", run, *common, "--date", "2026-01-02"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        w["index_after_rerun"] = read_json(storage.join(nightly_uri, "index.json"))
        w["files_after_rerun"] = storage.list_files(storage.join(nightly_uri, "2026-01-02"), recursive=True)
        w["stale_left"] = storage.exists(stale)
        w["night2_json_rerun"] = read_json(storage.join(nightly_uri, "2026-01-02", "night.json"))

        # A run folder with run.json but no checkpoint yet.
        fresh = storage.join(bucket, "runs", "fresh")
        storage.write_text(storage.join(fresh, "run.json"), storage.read_text(storage.join(run, "run.json")))
        w["fresh"] = fresh
        w["night3"] = cli("nightly", "--runs", run, fresh, *common, "--date", "2026-01-03")
        w["index"] = read_json(storage.join(nightly_uri, "index.json"))
        yield w
    finally:
        mp.undo()
        storage._s3_filesystem_cached.cache_clear()


@pytest.mark.slow
def test_first_night_is_ok_and_writes_the_report(world):
    code, out = world["night1"]
    assert code == nightly.EXIT_OK, out
    assert "ok: seq: step 6, no earlier night to compare" in out
    night_dir = storage.join(world["nightly"], "2026-01-01")
    names = {storage.basename(u) for u in storage.list_files(storage.join(night_dir, "seq"))}
    assert {"report.json", "report.html", "report.md", "samples.png", "loss_curves.png"} <= names
    night = read_json(storage.join(night_dir, "night.json"))
    [entry] = night["runs"]
    assert entry["status"] == "ok" and entry["step"] == 6 and entry["error"] is None
    assert entry["run"] == world["run"] and entry["metrics"]["image_l1"] > 0
    assert night["exit_code"] == 0 and night["status"] == "ok"
    # every floor travels with the night, and the report's verdict line with it
    floors = entry["floors"]
    assert 0 <= floors["best_input_oracle_l1"] <= min(floors["copy_last_l1"], floors["copy_two_back_l1"])
    assert floors["retrieval_r1_chance"] == pytest.approx(1 / entry["windows"])
    assert entry["verdict"].startswith("verdict: image L1 ")


@pytest.mark.slow
def test_worse_checkpoint_is_a_regression_naming_the_metric(world):
    code, out = world["night2"]
    assert code == nightly.EXIT_REGRESSION, out
    [line] = [line for line in out.splitlines() if line.startswith("REGRESSION:")]
    assert line.startswith("REGRESSION: seq: ")
    assert "image_l1 " in line and "image_mse " in line and "->" in line and "%)" in line
    [entry] = world["night2_json"]["runs"]
    assert entry["previous"] == {"date": "2026-01-01", "step": 6} and entry["step"] == 7
    regressed = {r["metric"]: r for r in entry["regressions"]}
    assert regressed["image_l1"]["current"] > regressed["image_l1"]["previous"]
    assert regressed["image_l1"]["higher_is_better"] is False
    # informational metrics are never alarms
    assert not set(regressed) & set(nightly.DEFAULT_IGNORE)


@pytest.mark.slow
def test_index_lists_both_nights_with_trends(world):
    index = world["index_after_2"]
    assert [n["date"] for n in index["nights"]] == ["2026-01-02", "2026-01-01"]
    assert [n["status"] for n in index["nights"]] == ["regression", "ok"]
    assert index["nights"][0]["runs"][0]["report"] == "seq/report.html"
    assert "image_l1" in index["trends"] and "bleu" in index["trends"]
    page = world["index_html_after_2"]
    assert "2026-01-01" in page and "2026-01-02" in page
    assert 'href="2026-01-02/seq/report.html"' in page and "data:image/png;base64," in page
    assert storage.exists(storage.join(world["nightly"], "trends", "image_l1.png"))
    md = storage.read_text(storage.join(world["nightly"], "index.md"))
    assert "(trends/image_l1.png)" in md and "## 2026-01-02" in md
    assert "| floor: best_input_oracle_l1 |" in md and "floor: retrieval_r10_chance" in page
    assert "verdict: image L1 " in md
    assert "floor" not in {r["metric"][:5] for n in index["nights"] for e in n["runs"] for r in e["regressions"]}


@pytest.mark.slow
def test_rerunning_a_night_replaces_it(world):
    rerun = world["rerun"]
    assert rerun.returncode == nightly.EXIT_REGRESSION, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert "REGRESSION: seq: " in rerun.stdout and "image_l1" in rerun.stdout
    assert [n["date"] for n in world["index_after_rerun"]["nights"]] == ["2026-01-02", "2026-01-01"]
    assert world["files_after_rerun"] == world["files_after_2"]
    assert not world["stale_left"]
    before, after = world["night2_json"], world["night2_json_rerun"]
    assert after["runs"][0]["metrics"] == before["runs"][0]["metrics"]
    assert after["runs"][0]["previous"]["date"] == "2026-01-01"  # not itself


@pytest.mark.slow
def test_run_without_checkpoint_is_recorded_as_failed(world, s3_server):
    code, out = world["night3"]
    assert code == nightly.EXIT_FAILED, out
    assert "FAILED: fresh: TrainingError: " in out and "has no checkpoint" in out
    # the other run was still evaluated and compared with night 2 (same checkpoint: no regression)
    assert "ok: seq: step 7, compared with 2026-01-02" in out and "REGRESSION" not in out
    night = world["index"]["nights"][0]
    assert night["date"] == "2026-01-03" and night["status"] == "failed"
    entries = {e["name"]: e for e in night["runs"]}
    assert entries["fresh"]["status"] == "failed" and "has no checkpoint" in entries["fresh"]["error"]
    assert entries["fresh"]["report"] is None and entries["seq"]["status"] == "ok"
    assert [n["date"] for n in world["index"]["nights"]] == ["2026-01-03", "2026-01-02", "2026-01-01"]
    everything = "".join(
        storage.read_text(u) for u in storage.list_files(world["nightly"], suffix=".json", recursive=True)
    )
    assert s3_server.secret_key not in everything and s3_server.access_key not in everything


@pytest.mark.slow
def test_compare_two_reports_and_a_run(world, tmp_path):
    storage._s3_filesystem_cached.cache_clear()
    night1 = storage.join(world["nightly"], "2026-01-01", "seq")
    night2 = storage.join(world["nightly"], "2026-01-02", "seq")
    out = storage.join(world["bucket"], "compare")
    code, printed = cli("compare", night1, night2, "--out", out, "--names", "good,broken")
    assert code == 0, printed
    md = storage.read_text(storage.join(out, "compare.md"))
    page = storage.read_text(storage.join(out, "compare.html"))
    report = read_json(storage.join(night1, "report.json"))
    assert "| metric | good | broken |" in md
    for name in report["metrics"]:
        assert f"| {name}" in md and name in page, name
    for name in report["floors"]:
        assert f"| floor: {name} |" in md, name
    assert "best_input_oracle_l1" in report["floors"] and "| verdict |" in md
    result = read_json(storage.join(out, "compare.json"))
    rows = {r["label"]: r for r in result["rows"]}
    assert rows["image_l1"]["best"] == [0]  # the good checkpoint has the lower error
    l1_line = next(line for line in md.splitlines() if line.startswith("| image_l1"))
    assert l1_line.split("|")[2].strip().endswith("★") and "★" not in l1_line.split("|")[3]

    # a run without a report: clear error without --data, evaluated with it
    code, _ = cli("compare", night1, world["run"], "--out", str(tmp_path / "c1"))
    assert code == 2
    code, printed = cli("compare", night1, world["run"], "--out", str(tmp_path / "c2"), "--data", world["data"])
    assert code == 0, printed
    assert (tmp_path / "c2/reports/seq-2/report.json").exists()
    assert "| metric | seq | seq-2 |" in (tmp_path / "c2/compare.md").read_text()


@pytest.mark.slow
def test_presigned_url_serves_the_report(world):
    storage._s3_filesystem_cached.cache_clear()
    report = storage.join(world["nightly"], "2026-01-01", "seq")
    code, printed = cli("report", "url", report, "--expires", "600")
    assert code == 0
    url = printed.strip()
    assert url.startswith("http://127.0.0.1:") and "X-Amz-Signature=" in url
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read().decode("utf-8")
    assert body.startswith("<!DOCTYPE html>") and "Metrics against the floors" in body
    with urllib.request.urlopen(report_url(world["nightly"]), timeout=30) as response:
        assert "storymm nightly evaluation" in response.read().decode("utf-8")
    # unsigned access is refused: the link is what grants it
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(url.split("?")[0], timeout=30)
    code, _ = cli("report", "url", storage.join(world["bucket"], "nowhere"))
    assert code == 2


# ------------------------------------------------------------------------------- Chromium


@pytest.mark.slow
def test_chromium_renders_report_and_index(world, tmp_path):
    import numpy as np

    storage._s3_filesystem_cached.cache_clear()
    report_page = tmp_path / "report.html"
    report_page.write_text(storage.read_text(storage.join(world["nightly"], "2026-01-01", "seq", "report.html")))
    index_page = tmp_path / "index.html"
    index_page.write_text(storage.read_text(storage.join(world["nightly"], "index.html")))

    pixels = screenshot(report_page, tmp_path / "report.png", 3200)
    assert pixels.shape[:2] == (3200, 1200)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200, "report rendered as a flat page"
    assert non_white(pixels) > 0.03
    assert table_header(pixels) > 0.002, "no table in the report screenshot"
    # the images are there: the sample grid (coloured synthetic frames) and the loss curves
    assert colourful(pixels) > 0.01, f"no image region in the report screenshot ({colourful(pixels):.4f})"

    pixels = screenshot(index_page, tmp_path / "index.png", 1600)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100, "index rendered as a flat page"
    assert non_white(pixels) > 0.015
    assert table_header(pixels) > 0.002, "no table in the index screenshot"
    assert colourful(pixels) > 0.001, f"no trend plot in the index screenshot ({colourful(pixels):.4f})"


# ------------------------------------------------------------------------------- fast, local


def _fake_report(l1: float, bleu: float, run: str) -> dict:
    return {
        "run": run,
        "split": "test",
        "step": 3,
        "windows": 12,
        "metrics": {"image_l1": l1, "image_mse": l1 * l1, "bleu": bleu, "text_ce_shuffled": 3.0},
        "floors": {"median_image_l1": 0.3, "copy_last_l1": 0.25},
    }


def test_data_text_is_escaped_everywhere(tmp_path):
    # a report with a sentence from the data that is markup
    samples = [
        {
            "inputs": torch.rand(4, 3, 8, 16),
            "target": torch.rand(3, 8, 16),
            "prediction": torch.rand(3, 8, 16),
            "input_sentences": ["a", "b", "c", EVIL],
            "target_sentence": EVIL,
            "generated_sentence": EVIL,
        }
    ]
    a, b = tmp_path / "a", tmp_path / "b"
    write_report(_fake_report(0.1, 0.4, EVIL), str(a), samples=samples, title=EVIL)
    write_report(_fake_report(0.2, 0.3, "b"), str(b))
    # a comparison whose column names are markup
    assert cli("compare", str(a), str(b), "--out", str(tmp_path / "cmp"), "--names", f"{EVIL},b")[0] == 0
    # a night whose run URI is markup (it fails: no dataset) -> its name and error reach the index
    code, out = cli(
        "nightly",
        "--runs",
        str(tmp_path / "runs" / EVIL),
        "--data",
        str(tmp_path / "none"),
        "--reports",
        str(tmp_path / "rep"),
        "--date",
        "2026-02-01",
    )
    assert code == nightly.EXIT_FAILED and "FAILED: script:" in out
    pages = [
        a / "report.html",
        a / "report.md",
        tmp_path / "cmp/compare.html",
        tmp_path / "cmp/compare.md",
        tmp_path / "rep/nightly/index.html",
        tmp_path / "rep/nightly/index.md",
    ]
    for page in pages:
        text = page.read_text()
        assert "<script" not in text, page
        assert ESCAPED in text or page.name == "index.md", page  # index.md shows names, not URIs
    night = json.loads((tmp_path / "rep/nightly/2026-02-01/night.json").read_text())
    assert night["runs"][0]["run"].endswith(EVIL)  # JSON keeps the text as it is; only pages escape it
    assert report_url(str(a)) == (a / "report.html").resolve().as_uri()


def test_tolerances_and_directions():
    tol = nightly.parse_tolerances({"default": {"relative": 0.1}, "metrics": {"bleu": {"absolute": 0.02}}})
    assert tol.for_metric("bleu") == nightly.Tolerance(relative=0.1, absolute=0.02)
    assert tol.for_metric("ssim") == nightly.Tolerance(relative=0.1, absolute=0.0)
    prev = {"image_l1": 0.10, "bleu": 0.40, "ssim": 0.5, "text_ce_shuffled": 3.0, "mystery": 1.0, "perplexity": 5.0}
    # lower-is-better up 5% (within 10%), higher-is-better down 25%, ignored metric way worse, unknown direction
    cur = {"image_l1": 0.105, "bleu": 0.30, "ssim": 0.56, "text_ce_shuffled": 9.0, "mystery": 99.0, "perplexity": None}
    found = {r["metric"]: r for r in nightly.compare_metrics(prev, cur, tol)}
    assert set(found) == {"bleu", "perplexity"}  # perplexity became non-finite
    assert found["bleu"]["relative_change"] == pytest.approx(-0.25)
    line = nightly.regression_line("seq", list(found.values()))
    assert line == "REGRESSION: seq: bleu 0.4 -> 0.3 (-25.0%), perplexity 5 -> n/a"
    # improvements and small changes are not regressions; a lower-is-better rise beyond tolerance is
    assert nightly.compare_metrics({"image_l1": 0.1}, {"image_l1": 0.05}, nightly.Tolerances()) == []
    assert nightly.compare_metrics({"image_l1": 0.1}, {"image_l1": 0.104}, nightly.Tolerances()) == []
    assert [
        r["metric"] for r in nightly.compare_metrics({"image_l1": 0.1}, {"image_l1": 0.2}, nightly.Tolerances())
    ] == ["image_l1"]
    for bad, message in (
        ({"defaults": {}}, "defaults: unknown key"),
        ({"default": {"relative": -1}}, "relative"),
        ({"metrics": {"bleu": {"abs": 1}}}, "metrics.bleu.abs: unknown key"),
    ):
        with pytest.raises(ValueError, match=message):
            nightly.parse_tolerances(bad)
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        nightly.check_date("2026-1-2")
    assert nightly.run_names(["s3://b/x/seq", "s3://b/y/seq", "/r/a b"]) == ["seq", "seq-2", "a_b"]


def test_tolerance_file_changes_the_verdict(tmp_path):
    tol_file = tmp_path / "tol.yaml"
    tol_file.write_text("default: {relative: 0.05}\nmetrics:\n  image_l1: {relative: 5.0}\n")
    tol = nightly.load_tolerances(str(tol_file))
    assert nightly.compare_metrics({"image_l1": 0.1}, {"image_l1": 0.2}, tol) == []
