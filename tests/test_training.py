"""The training loop on real shards: metrics, checkpoints, resume (also after SIGKILL, with the
uninterrupted loss curve), refusal of tampered checkpoints, and determinism on CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from runs import curve

from storymm.cli import main as cli_main
from storymm.training import checkpoint
from storymm.training.loop import TrainingError, read_metrics, read_run, train
from storymm.training.run import RunFolder

from small import SMALL, small_config, small_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_uri(tmp_path_factory):
    return small_dataset(str(tmp_path_factory.mktemp("training")), 40, seed=3, frames=(6, 10))


def test_train_writes_metrics_checkpoints_and_resumes(data_uri, tmp_path):
    run = str(tmp_path / "vis")
    config = small_config(
        "train.visual_ae.steps=6", "train.visual_ae.log_every=2", "train.visual_ae.checkpoint_every=4"
    )
    summary = train(config, "visual_ae", data_uri, run, progress=False)
    assert summary["status"] == "completed" and summary["step"] == 6
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [2, 4, 6]
    for term in ("total", "l1", "gradient", "context", "samples_per_s", "lr"):
        assert term in metrics[-1], term
    assert metrics[-1]["samples_per_s"] > 0
    names = sorted(p.name for p in (tmp_path / "vis/checkpoints").iterdir())
    assert names == ["latest", "step-00000004.pt", "step-00000006.pt"]
    assert (tmp_path / "vis/checkpoints/latest").read_text().strip() == "step-00000006.pt"
    assert read_run(run)["stage"] == "visual_ae"

    # Same command with more steps continues the count instead of starting over.
    longer = small_config(
        "train.visual_ae.steps=10", "train.visual_ae.log_every=2", "train.visual_ae.checkpoint_every=4"
    )
    summary = train(longer, "visual_ae", data_uri, run, progress=False)
    assert summary["step"] == 10
    assert [m["step"] for m in read_metrics(run)] == [2, 4, 6, 8, 10]
    # Only the newest KEEP checkpoints stay.
    assert sorted(p.name for p in (tmp_path / "vis/checkpoints").glob("*.pt")) == [
        "step-00000008.pt",
        "step-00000010.pt",
    ]


def test_training_is_deterministic_and_resume_matches_uninterrupted(data_uri, tmp_path):
    settings = ["train.text_ae.steps=8", "train.text_ae.log_every=1", "train.text_ae.checkpoint_every=3"]
    train(small_config(*settings), "text_ae", data_uri, str(tmp_path / "a"), progress=False)
    train(small_config(*settings), "text_ae", data_uri, str(tmp_path / "b"), progress=False)
    a = [m["total"] for m in read_metrics(str(tmp_path / "a"))]
    b = [m["total"] for m in read_metrics(str(tmp_path / "b"))]
    assert a == b

    # Stop after 5 steps (checkpoint at 3 and 5), then finish: identical to the uninterrupted curve.
    short = [s.replace("steps=8", "steps=5") for s in settings]
    train(small_config(*short), "text_ae", data_uri, str(tmp_path / "c"), progress=False)
    train(small_config(*settings), "text_ae", data_uri, str(tmp_path / "c"), progress=False)
    c = [m["total"] for m in read_metrics(str(tmp_path / "c"))]
    assert c == pytest.approx(a, rel=1e-5)


def test_sequence_stage_starts_from_autoencoder_runs(data_uri, tmp_path):
    vis, txt, seq = (str(tmp_path / n) for n in ("vis", "txt", "seq"))
    config = small_config(
        "train.visual_ae.steps=2", "train.text_ae.steps=2", "train.sequence.steps=3", "train.sequence.log_every=1"
    )
    train(config, "visual_ae", data_uri, vis, progress=False)
    train(config, "text_ae", data_uri, txt, progress=False)
    train(config, "sequence", data_uri, seq, init_from=[vis, txt], progress=False)
    state = checkpoint.load_latest(seq)
    assert state["step"] == 3
    run = read_run(seq)
    assert run["init_from"] == [vis, txt]
    terms = read_metrics(seq)[-1]
    for term in ("l1", "text", "text_accuracy", "alignment", "total"):
        assert term in terms, term

    with pytest.raises(TrainingError, match="holds a sequence run"):
        train(config, "visual_ae", data_uri, seq, progress=False)
    with pytest.raises(TrainingError, match="takes visual_ae or text_ae"):
        train(config, "sequence", data_uri, str(tmp_path / "seq2"), init_from=[seq], progress=False)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/storymm-pwned",))


def test_tampered_checkpoint_is_refused(data_uri, tmp_path, capsys):
    run = str(tmp_path / "vis")
    config = small_config("train.visual_ae.steps=2")
    train(config, "visual_ae", data_uri, run, progress=False)
    target = tmp_path / "vis/checkpoints/step-00000002.pt"
    state = torch.load(target, weights_only=True)
    state["payload"] = _Exploit()
    with open(target, "wb") as handle:
        torch.save(state, handle)
    Path("/tmp/storymm-pwned").unlink(missing_ok=True)

    with pytest.raises(checkpoint.CheckpointError, match="refusing to load"):
        checkpoint.load_latest(run)
    code = cli_main(
        [
            "train",
            "--config",
            str(ROOT / "configs/tiny.yaml"),
            "--stage",
            "visual_ae",
            "--data",
            data_uri,
            "--run",
            run,
            *sum((["--set", s] for s in SMALL), []),
            "--set",
            "train.visual_ae.steps=4",
        ]
    )
    assert code == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not Path("/tmp/storymm-pwned").exists()


def test_bad_stage_and_missing_run_have_clear_errors(data_uri, tmp_path, capsys):
    with pytest.raises(TrainingError, match="unknown stage"):
        train(small_config(), "decoder", data_uri, str(tmp_path / "x"), progress=False)
    with pytest.raises(TrainingError, match="not a storymm run"):
        read_run(str(tmp_path / "nothing"))


def _train_command(data_uri: str, run: str, steps: int) -> list[str]:
    # the sequence stage with per-sample skip dropout (RNG every step), past a 2-step warm-up
    sets = SMALL + [
        f"train.sequence.steps={steps}",
        "train.sequence.checkpoint_every=5",
        "train.sequence.log_every=1",
        "train.sequence.warmup_steps=2",
        "model.decoder_skips=true",
        "model.skip_dropout=0.5",
    ]
    return [
        sys.executable,
        "-m",
        "storymm.cli",
        "train",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--stage",
        "sequence",
        "--data",
        data_uri,
        "--run",
        run,
        *sum((["--set", s] for s in sets), []),
    ]


@pytest.mark.slow
def test_sigkilled_run_resumes_with_the_uninterrupted_curve(data_uri, tmp_path):
    """SIGKILL twice, each time after a checkpoint and with steps logged past it; rerunning the same
    command resumes from that checkpoint, replaces the metrics lines logged after it, and the final
    curve equals an uninterrupted run's: every term at every step."""
    steps, env = 30, {**os.environ, "OMP_NUM_THREADS": "1"}
    reference, run = str(tmp_path / "reference"), str(tmp_path / "seq")
    done = subprocess.run(
        _train_command(data_uri, reference, steps), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    marker = tmp_path / "seq/checkpoints/latest"

    def checkpointed() -> int:
        return int(marker.read_text().strip()[5:13]) if marker.exists() else 0

    killed, stale, resumed_output = [], [], ""
    for least in (10, 20):
        proc = subprocess.Popen(
            _train_command(data_uri, run, steps),
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while not (checkpointed() >= least and read_metrics(run)[-1]["step"] > checkpointed()):
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, f"no checkpoint at step {least} within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        resumed_output += proc.communicate()[1]
        killed.append(checkpointed())
        stale.append([m["step"] for m in read_metrics(run) if m["step"] > killed[-1]])
        assert killed[-1] < steps
    assert f"step-{killed[0]:08d}.pt" in resumed_output  # the second attempt resumed from the first kill's checkpoint
    assert any(stale), "no metrics were logged past a checkpoint before the kill"

    done = subprocess.run(
        _train_command(data_uri, run, steps), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stderr and f"step-{killed[1]:08d}.pt" in done.stderr
    assert f"sequence: completed at step {steps}" in done.stdout
    assert [m["step"] for m in read_metrics(run)] == list(range(1, steps + 1)), "a gap or a repeat after a resume"
    assert curve(read_metrics(run)) == curve(read_metrics(reference))
    assert [a["start_step"] for a in RunFolder(run).read_attempts()] == [0, *killed]  # resumed, never restarted
