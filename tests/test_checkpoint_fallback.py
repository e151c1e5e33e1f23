"""A damaged latest checkpoint: resume from the previous one (the loop keeps two), with the loss curve
of a clean resume from that step; stop with a clear error only when no checkpoint loads."""

from __future__ import annotations

import logging
import shutil

import pytest
from runs import curve

from storymm.training import checkpoint
from storymm.training.loop import read_metrics, train
from storymm.training.run import RunFolder

from small import small_config, small_dataset

SETTINGS = [
    "train.visual_ae.steps=8",
    "train.visual_ae.log_every=1",
    "train.visual_ae.checkpoint_every=3",
    "train.visual_ae.warmup_steps=2",
]


@pytest.fixture(scope="module")
def data_uri(tmp_path_factory):
    return small_dataset(str(tmp_path_factory.mktemp("fallback")), 20, seed=11, frames=(6, 9))


def test_truncated_latest_resumes_from_previous_checkpoint(data_uri, tmp_path, caplog):
    config = small_config(*SETTINGS)
    damaged, clean = tmp_path / "damaged", tmp_path / "clean"
    # Stop at step 7 (checkpoints 6 and 7, latest -> 7), then keep two copies of that run.
    train(
        small_config(*[s.replace("steps=8", "steps=7") for s in SETTINGS]),
        "visual_ae",
        data_uri,
        str(damaged),
        progress=False,
    )
    assert sorted(p.name for p in (damaged / "checkpoints").glob("*.pt")) == ["step-00000006.pt", "step-00000007.pt"]
    shutil.copytree(damaged, clean)

    # damaged: the latest checkpoint loses its second half; clean: it never existed (latest -> 6)
    latest = damaged / "checkpoints/step-00000007.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    (clean / "checkpoints/step-00000007.pt").unlink()
    (clean / "checkpoints/latest").write_text("step-00000006.pt\n")

    with caplog.at_level(logging.WARNING, logger="storymm.training.checkpoint"):
        summary = train(config, "visual_ae", data_uri, str(damaged), progress=False)
    assert summary["step"] == 8
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step-00000007.pt is unreadable" in w for w in warnings), warnings
    assert any("resuming from" in w and w.split()[2].endswith("step-00000006.pt") for w in warnings), warnings
    train(config, "visual_ae", data_uri, str(clean), progress=False)

    # steps 7 and 8 were redone from step 6, exactly as a clean resume from step 6 does them
    assert [m["step"] for m in read_metrics(str(damaged))] == list(range(1, 9))
    assert curve(read_metrics(str(damaged))) == curve(read_metrics(str(clean)))
    assert [a["start_step"] for a in RunFolder(str(damaged)).read_attempts()] == [0, 6]  # what train() restored
    assert (damaged / "checkpoints/latest").read_text().strip() == "step-00000008.pt"


def test_no_loadable_checkpoint_is_a_clear_error_and_tampered_stays_refused(data_uri, tmp_path):
    run = tmp_path / "run"
    train(small_config(*SETTINGS), "visual_ae", data_uri, str(run), progress=False)
    files = sorted((run / "checkpoints").glob("*.pt"))
    assert [p.name for p in files] == ["step-00000006.pt", "step-00000008.pt"]
    files[0].write_bytes(b"")
    files[1].write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint of .* loads") as err:
        checkpoint.load_latest(str(run))
    assert "step-00000006.pt" in str(err.value) and "step-00000008.pt" in str(err.value)
    assert "delete its checkpoints/ folder" in str(err.value)

    # A marker that names nothing usable: the newest file that loads is used.
    (run / "checkpoints/latest").write_text("\x00garbage")
    shutil.rmtree(run / "checkpoints")
    train(
        small_config(*[s.replace("steps=8", "steps=3") for s in SETTINGS]),
        "visual_ae",
        data_uri,
        str(run),
        progress=False,
    )
    (run / "checkpoints/latest").write_bytes(b"\xff\xfe junk")
    assert checkpoint.load_latest(str(run))["step"] == 3
