"""The science check (issue 3): the demo pipeline, run for real on synthetic stories, must produce a
gate model that beats the trivial floors, varies its predictions with the input, uses its text
condition and writes sentences close to the targets. A model that does not learn fails here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from storymm.config import load_config
from storymm.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_demo_pipeline_trains_a_gate_model_that_beats_the_floors(tmp_path):
    config = load_config(ROOT / "configs/tiny.yaml")
    assert config.model.fusion == "gate"
    lines: list[str] = []
    result = run_pipeline(config, str(tmp_path / "work"), say=lines.append, progress=False)

    report = json.loads((tmp_path / "work/reports/gate/report.json").read_text())
    m, floors = report["metrics"], report["floors"]
    summary = "\n".join(lines)
    assert report["windows"] > 200, summary
    assert m["image_l1"] < floors["median_image_l1"], summary
    assert m["image_l1"] < floors["copy_last_l1"], summary
    assert m["prediction_spread"] > 0.02, summary
    assert m["text_ce_true"] < m["text_ce_shuffled"], summary
    assert m["bleu"] > 0.3, summary
    for page in ("report.html", "report.md", "loss_curves.png", "samples.png"):
        assert (tmp_path / "work/reports/gate" / page).stat().st_size > 0, page
    assert f"report: {tmp_path / 'work/reports/gate/report.html'}" in summary
    assert result["report"]["metrics"] == m
