"""The science check (issue 3): the demo pipeline, run for real on synthetic stories, must produce a
gate model that beats the trivial floors, varies its predictions with the input, uses its text
condition and writes sentences close to the targets. A model that does not learn fails here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from storymm.config import load_config
from storymm.data import synth
from storymm.data.loader import PreparedDataset, WindowLoader
from storymm.evaluation.evaluate import evaluate
from storymm.pipeline import run_pipeline
from storymm.training.loop import train

from small import small_config, small_dataset

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
    # issue 14: every floor but the per-window oracle best input (which no copying can reach on the
    # demo's A-B-A-B shapes: the frame two back differs by one small shape), and the verdict says so
    for floor in ("median_image_l1", "copy_last_l1", "copy_two_back_l1", "mean_of_inputs_l1"):
        assert m["image_l1"] < floors[floor], (floor, summary)
    assert "beats every floor but best_input_oracle" in report["verdict"], (report["verdict"], summary)
    # cross-modal InfoNCE (on in tiny.yaml as in gate.yaml): retrieval clearly above chance
    assert m["retrieval_r1"] > 10 * floors["retrieval_r1_chance"], summary
    assert m["retrieval_r10"] > 3 * floors["retrieval_r10_chance"], summary
    assert m["prediction_spread"] > 0.02, summary
    assert m["text_ce_true"] < m["text_ce_shuffled"], summary
    assert m["bleu"] > 0.3, summary
    for page in ("report.html", "report.md", "loss_curves.png", "samples.png"):
        assert (tmp_path / "work/reports/gate" / page).stat().st_size > 0, page
    assert f"report: {tmp_path / 'work/reports/gate/report.html'}" in summary
    assert result["report"]["metrics"] == m


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_warp_head_predicts_camera_pans_beyond_the_best_input_frame(tmp_path):
    """Issue 14: on textured camera pans cut A-B-A-B, no input frame is the next frame (the pan moved
    it), so a model that picks and copies an input can at best score the per-window oracle best input
    (``best_input_oracle``: mean over windows of the min over the K inputs of mean |input - target|).
    The gate model with the warp head must beat it, and copying the frame two back by 15%, with
    predictions that vary. Small but real: 150 synthetic stories at the demo's 32x64, the sequence
    stage trained from scratch (its autoencoders too: the image here comes from the warped frames)
    for 500 steps of 16 windows, about a minute of CPU, and scored by ``evaluate`` on the test split."""
    config = small_config("model.image_head=warp", "data.batch_size=16", "train.sequence.steps=500")
    assert config.model.fusion == "gate" and config.model.copy_path
    data = small_dataset(str(tmp_path), stories=150, seed=0, frames=(8, 14), config=config, scene="pan")
    run = str(tmp_path / "sequence")
    assert train(config, "sequence", data, run, progress=False)["status"] == "completed"
    report = evaluate(run, data, "test", None, progress=False)

    windows = two_back = best = 0.0
    loader = WindowLoader(
        PreparedDataset(data),
        "test",
        batch_size=64,
        context_frames=config.data.context_frames,
        max_tokens=config.data.max_tokens,
        shuffle=False,
        equalize=False,
    )
    for batch in loader:
        per_input = (batch["frames"] - batch["target_frame"][:, None]).abs().mean((2, 3, 4))  # [B,K]
        two_back += per_input[:, -2].sum().item()
        best += per_input.min(1).values.sum().item()
        windows += len(per_input)
    floors = {"copy_two_back": two_back / windows, "best_input_oracle": best / windows}
    m = report["metrics"]
    summary = f"image_l1 {m['image_l1']:.4f}, spread {m['prediction_spread']:.4f}, floors {floors}"
    print(summary)
    assert windows == report["windows"] > 100, summary
    assert m["image_l1"] < floors["best_input_oracle"], summary
    assert m["image_l1"] < 0.85 * floors["copy_two_back"], summary
    assert m["prediction_spread"] > 0.05, summary


@pytest.mark.timeout(600)
def test_pointer_head_says_words_never_seen_in_training(tmp_path):
    """Issue 28: the test sentences name subjects, colours and places that no training sentence holds
    (``synth --unseen-words``; the trained WordPiece vocabulary does not even have them as words, so
    each comes out as one piece per letter). A text head that only generates from its vocabulary
    cannot say them; the pointer head copies them from the input sentences. It must score a BLEU
    within 0.05 of the best repeat floor, a cross-entropy below every text floor (the same decoder
    fed the last / two-back sentence alone, its tokens to copy included) and below the shuffled
    condition. Small but real, and in the default suite (about a minute on 2 cores): 150 stories at
    32x64, the sequence stage from scratch for 300 steps of 16 windows, 40 tokens per sentence (the
    letters), scored by ``evaluate``."""
    config = small_config(
        "model.text_head=pointer", "data.batch_size=16", "train.sequence.steps=300", "data.max_tokens=40"
    )
    assert config.model.pointer_word_swap > 0
    data = small_dataset(str(tmp_path), stories=150, seed=0, frames=(8, 14), config=config, unseen_words=True)
    vocabulary = set(PreparedDataset(data).tokenizer.tokenizer.get_vocab())
    assert not vocabulary & synth.UNSEEN_WORDS["test"].names()  # never a training word, not even a token
    run = str(tmp_path / "sequence")
    assert train(config, "sequence", data, run, progress=False)["status"] == "completed"
    report = evaluate(run, data, "test", None, progress=False)

    m, f = report["metrics"], report["floors"]
    summary = (
        f"BLEU {m['bleu']:.3f} (repeat last {f['bleu_copy_last']:.3f}, two back {f['bleu_copy_two_back']:.3f}); "
        f"text CE {m['text_ce_true']:.3f} (shuffled {m['text_ce_shuffled']:.3f}, repeat last "
        f"{f['text_ce_copy_last']:.3f}, two back {f['text_ce_copy_two_back']:.3f})"
    )
    print(summary)
    assert report["windows"] > 100, summary
    assert m["bleu"] >= max(f["bleu_copy_last"], f["bleu_copy_two_back"]) - 0.05, summary
    assert m["text_ce_true"] < min(f["text_ce_copy_last"], f["text_ce_copy_two_back"]), summary
    assert m["text_ce_true"] < m["text_ce_shuffled"], summary
