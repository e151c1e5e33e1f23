"""Validation during training (the val split scored every eval_every steps, the best checkpoint kept)
and evaluation of models whose visual and text latents differ in size."""

from __future__ import annotations

import json
import logging

import pytest

from storymm import storage
from storymm.evaluation.evaluate import evaluate
from storymm.training import checkpoint
from storymm.training.loop import read_metrics, train

from small import small_config, small_dataset

EVAL = ["eval.median_windows=50", "eval.samples=2", "eval.batch_size=32"]


@pytest.fixture(scope="module")
def data_uri(tmp_path_factory):
    return small_dataset(str(tmp_path_factory.mktemp("validation")), 40, seed=3, frames=(6, 10))


def _sequence(*extra: str):
    return small_config(
        "train.sequence.steps=6",
        "train.sequence.checkpoint_every=3",
        "train.sequence.log_every=1",
        "train.sequence.warmup_steps=2",
        *EVAL,
        *extra,
    )


def test_val_is_scored_recorded_and_the_best_checkpoint_kept(data_uri, tmp_path):
    run = str(tmp_path / "seq")
    train(_sequence(), "sequence", data_uri, run, progress=False)  # eval_every: null = checkpoint_every
    metrics = read_metrics(run)
    scored = [m for m in metrics if "val_total" in m]
    assert [m["step"] for m in scored] == [3, 6]
    assert [m["step"] for m in metrics] == list(range(1, 7))  # merged into the step's record, not extra lines
    for record in scored:
        assert record["val_windows"] > 0 and record["val_l1"] > 0 and record["val_text"] > 0
        assert record["total"] != record["val_total"]
    best = checkpoint.read_best(run)
    want = min(scored, key=lambda m: m["val_total"])
    assert best == {
        "checkpoint": f"step-{want['step']:08d}.pt",
        "step": want["step"],
        "metric": "val_total",
        "value": want["val_total"],
    }
    assert storage.exists(storage.join(run, "checkpoints", best["checkpoint"]))

    # evaluation can take the best checkpoint instead of the latest
    report = evaluate(run, data_uri, "val", None, progress=False, checkpoint_name="best")
    assert report["step"] == best["step"] and report["checkpoint"] == "best"

    # scoring val does not touch the training curve (RNG restored, eval mode, no gradients)
    plain = str(tmp_path / "plain")
    train(_sequence("train.sequence.eval_every=0"), "sequence", data_uri, plain, progress=False)
    assert [m["total"] for m in read_metrics(plain)] == [m["total"] for m in metrics]
    assert checkpoint.read_best(plain) is None
    with pytest.raises(Exception, match="no 'best' checkpoint"):
        evaluate(plain, data_uri, "val", None, progress=False, checkpoint_name="best")


def test_best_checkpoint_survives_pruning(data_uri, tmp_path):
    run = str(tmp_path / "vis")
    config = small_config(
        "train.visual_ae.steps=4",
        "train.visual_ae.checkpoint_every=1",
        "train.visual_ae.eval_every=1",
        "train.visual_ae.log_every=1",
        "train.visual_ae.val_batches=1",
    )
    train(config, "visual_ae", data_uri, run, progress=False)
    best = checkpoint.read_best(run)
    scored = [m for m in read_metrics(run) if "val_total" in m]
    assert [m["step"] for m in scored] == [1, 2, 3, 4]
    assert best["value"] == min(m["val_total"] for m in scored)
    kept = sorted(storage.basename(u) for u in storage.list_files(checkpoint.checkpoint_dir(run), suffix=".pt"))
    assert best["checkpoint"] in kept and {"step-00000003.pt", "step-00000004.pt"} <= set(kept)
    assert len(kept) <= 3
    # val_batches bounds the work: one batch of data.batch_size windows
    assert scored[0]["val_windows"] == config.data.batch_size


def test_empty_val_split_is_skipped_with_a_log_line(tmp_path, caplog):
    config = small_config("data.val_fraction=0.0")
    data = small_dataset(str(tmp_path), 12, seed=5, frames=(6, 8), config=config)
    run = str(tmp_path / "seq")
    with caplog.at_level(logging.INFO, logger="storymm.training.validation"):
        train(
            small_config("data.val_fraction=0.0", "train.sequence.steps=2", "train.sequence.checkpoint_every=1"),
            "sequence",
            data,
            run,
            progress=False,
        )
    assert "no validation" in caplog.text
    assert checkpoint.read_best(run) is None
    assert not any("val_total" in m for m in read_metrics(run))


@pytest.mark.parametrize("fusion, space", [("gate", "fusion"), ("concat", None)])
def test_unequal_latent_sizes_train_and_evaluate(data_uri, tmp_path, fusion, space):
    run = str(tmp_path / fusion)
    config = small_config(
        "model.visual_latent=32",
        "model.text_latent=64",
        f"model.fusion={fusion}",
        "train.sequence.steps=2",
        "train.sequence.eval_every=0",
        # concat has no space where latents of two sizes meet: the config refuses InfoNCE there
        *(["loss.cross_modal_infonce=0"] if space is None else []),
        *EVAL,
    )
    train(config, "sequence", data_uri, run, progress=False)
    out = str(tmp_path / f"report-{fusion}")
    report = evaluate(run, data_uri, "test", out, progress=False)
    m = report["metrics"]
    assert report["model"]["visual_latent"] == 32 and report["model"]["text_latent"] == 64
    assert m["image_l1"] > 0 and m["text_ce_true"] > 0
    note = report["notes"]["cross_modal_similarity"]
    if space is None:  # concat has no shared space: not applicable, said so, never a failure
        assert m["cross_modal_similarity"] is None and m["retrieval_r1"] is None
        assert note.startswith("not applicable")
    else:
        assert -1 <= m["cross_modal_similarity"] <= 1 and 0 <= m["retrieval_r1"] <= 1
        assert "shared space" in note
    assert report["floors"]["best_input_oracle_l1"] > 0
    saved = json.loads(storage.read_text(storage.join(out, "report.json")))
    assert saved["notes"] == report["notes"]
    assert note.split(":")[0] in storage.read_text(storage.join(out, "report.html"))


def test_latent_sweep_trials_are_evaluated_into_one_table_with_floors(data_uri, tmp_path):
    """What `storymm tune --stage sequence --evaluate` does after the sweep (the Ray part is tested in
    test_ray.py): each trial run scored, one comparison with every floor; unequal sizes included."""
    from storymm.training.tune import compare_trials, trial_name

    runs, trials = str(tmp_path / "runs"), []
    for latent in (8, 32):
        params = {"model.visual_latent": latent}
        config = small_config(f"model.visual_latent={latent}", "train.sequence.steps=2", *EVAL)
        train(config, "sequence", data_uri, storage.join(runs, trial_name(params)), progress=False)
        trials.append({"params": params})
    trials.append({"params": {"model.visual_latent": 64}})  # stopped before its first checkpoint
    summary = {"stage": "sequence", "trials": trials}
    out = str(tmp_path / "sweep")
    result = compare_trials(summary, runs, data_uri, out)
    assert result["names"] == ["visual_latent=8", "visual_latent=32"]
    md = (tmp_path / "sweep/compare.md").read_text()
    for floor in ("copy_two_back_l1", "mean_of_inputs_l1", "best_input_oracle_l1", "retrieval_r1_chance"):
        assert f"| floor: {floor} |" in md, floor
    rows = {r["label"]: r["values"] for r in result["rows"]}
    assert rows["model.visual_latent"] == [8, 32] and all(v > 0 for v in rows["image_l1"])


def test_tune_stage_all_trial_trains_its_own_autoencoders_then_the_sequence_model(data_uri, tmp_path, monkeypatch):
    """`storymm tune --stage all`: a trial (the function each Ray Tune worker runs) trains both
    autoencoders at its latent size and starts the sequence model from them; only the sequence loss
    reaches Tune; --evaluate scores the sequence runs."""
    from ray import tune

    from storymm.training import tune as sweep
    from storymm.training.run import read_run

    heard = []
    monkeypatch.setattr(tune, "report", lambda metrics: heard.append(metrics["step"]))
    base = small_config(
        "model.text_latent=16",
        "train.visual_ae.steps=2",
        "train.text_ae.steps=2",
        "train.sequence.steps=2",
        "train.sequence.log_every=1",
        *EVAL,
    ).to_dict()
    runs, trials = str(tmp_path / "runs"), []
    for latent in (8, 24):
        params = {"model.visual_latent": latent}
        sweep._trial(params, base=base, stage="all", data_uri=data_uri, runs_uri=runs)
        folders = sweep.trial_runs(runs, params, "all")
        assert sorted(folders) == ["sequence", "text_ae", "visual_ae"]
        assert all(f.startswith(storage.join(runs, f"visual_latent={latent}")) for f in folders.values())
        assert read_run(folders["visual_ae"])["config"]["model"]["visual_latent"] == latent
        sequence = read_run(folders["sequence"])
        assert sequence["init_from"] == [folders["visual_ae"], folders["text_ae"]], sequence.get("init_from")
        trials.append({"params": params})
    assert heard == [1, 2, 1, 2]  # the sequence stage's steps, not the autoencoders'
    result = sweep.compare_trials({"stage": "all", "trials": trials}, runs, data_uri, str(tmp_path / "sweep"))
    assert result["names"] == ["visual_latent=8", "visual_latent=24"]
    assert "| floor: best_input_oracle_l1 |" in (tmp_path / "sweep/compare.md").read_text()


def test_tune_reports_checkpoint_steps_only_once_saved(monkeypatch):
    """ASHA may stop a trial at any report: at a step the loop checkpoints, Tune hears of it only after the
    checkpoint is written, so a trial stopped there (or finishing) keeps that checkpoint for --evaluate."""
    from ray import tune

    from storymm.training.tune import TuneRuntime

    heard = []
    monkeypatch.setattr(tune, "report", lambda metrics: heard.append(metrics["step"]))
    runtime = TuneRuntime(name="tune", checkpoint_every=4, final_step=6)
    for step in range(1, 7):  # log_every 2, checkpoint_every 4, 6 steps: the loop's calls
        if step % 2 == 0:
            runtime.report({"step": step, "total": 1.0})
        if step % 4 == 0 or step == 6:
            runtime.report({"step": step, "total": 1.0}, f"step-{step}.pt")
    assert heard == [2, 4, 6]
