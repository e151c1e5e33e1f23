"""The GPU-ready step on CPU: non-finite losses caught without a per-step host sync, bf16 autocast
on CPU when asked, torch.compile through the config, and DDP's find_unused_parameters only for a
config that leaves a branch without gradients (gloo, 2 ranks)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from storymm.training import checkpoint, loop
from storymm.training.loop import TrainingError, read_metrics, read_run, train
from storymm.training.runtime import Runtime
from storymm.training.stages import STAGES, TokenizerInfo, build_model, unused_parameters

from small import ROOT, SMALL, small_config, small_dataset


@pytest.fixture(scope="module")
def data_uri(tmp_path_factory):
    return small_dataset(str(tmp_path_factory.mktemp("step")), 24, seed=7, frames=(6, 9))


def test_a_nonfinite_loss_stops_training_at_the_next_check_naming_the_step(data_uri, tmp_path, monkeypatch):
    real = loop.batch_loss_fn

    def poisoned(stage, config, tokens):  # step 5's loss becomes NaN (fault injection into the real loop)
        fn, calls = real(stage, config, tokens), []

        def wrapped(model, batch):
            loss, terms = fn(model, batch)
            calls.append(1)
            return (loss * float("nan"), terms) if len(calls) == 6 else (loss, terms)

        return wrapped

    monkeypatch.setattr(loop, "batch_loss_fn", poisoned)
    run = str(tmp_path / "vis")
    config = small_config(
        "train.visual_ae.steps=20", "train.visual_ae.log_every=8", "train.visual_ae.checkpoint_every=4"
    )
    with pytest.raises(TrainingError, match=r"non-finite at step 5 \(checked steps 4\.\.7\)"):
        train(config, "visual_ae", data_uri, run, progress=False)
    # caught before the checkpoint of step 8: the newest checkpoint predates the bad step
    assert checkpoint.load_latest(run)["step"] == 4


def test_bf16_autocast_on_cpu_only_when_asked(data_uri, tmp_path):
    assert Runtime.from_environment("bf16").mixed_precision == "no"
    runtime = Runtime.from_environment("bf16", cpu_autocast=True)
    assert runtime.mixed_precision == "bf16"
    with runtime.autocast():
        assert torch.nn.Linear(4, 4)(torch.ones(2, 4)).dtype == torch.bfloat16
    # visual_ae: on this CPU (no native bf16) oneDNN has no bf16 LSTM, so the text stages cannot autocast here
    config = small_config(
        "train.mixed_precision=bf16",
        "train.autocast_on_cpu=true",
        "train.visual_ae.steps=3",
        "train.visual_ae.log_every=3",
    )
    train(config, "visual_ae", data_uri, str(tmp_path / "vis"), progress=False)
    assert torch.isfinite(torch.tensor(read_metrics(str(tmp_path / "vis"))[-1]["total"]))


@pytest.mark.slow  # ~30 s on 2 cores, nearly all of it inductor compiling
@pytest.mark.skipif(shutil.which("cc") is None, reason="inductor needs a C compiler")
def test_compile_true_trains_and_checkpoints_plain_weights(data_uri, tmp_path):
    run = str(tmp_path / "vis")
    config = small_config("train.compile=true", "train.visual_ae.steps=3", "train.visual_ae.log_every=1")
    train(config, "visual_ae", data_uri, run, progress=False)
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]
    keys = checkpoint.load_latest(run)["model"].keys()
    assert keys and not any("_orig_mod" in key for key in keys)  # loadable by an uncompiled model


def test_unused_parameters_only_where_a_zero_loss_weight_cuts_a_branch():
    tokens = TokenizerInfo(vocab_size=50, pad_id=0, bos_id=1, eos_id=2)
    for stage in STAGES:
        config = small_config()
        assert unused_parameters(stage, config, tokens, build_model(stage, config, tokens)) == [], stage
    config = small_config("loss.context=0")
    unused = unused_parameters("visual_ae", config, tokens, build_model("visual_ae", config, tokens))
    assert unused and all(name.startswith("context_head.") for name in unused)
    config = small_config("loss.text=0")
    unused = unused_parameters("sequence", config, tokens, build_model("sequence", config, tokens))
    assert unused and all(name.startswith(("text.", "pointer.")) for name in unused)  # the text head's branch
    assert any(name.startswith("pointer.") for name in unused) == (config.model.text_head == "pointer")


@pytest.mark.slow
def test_ddp_two_ranks_gloo_with_an_unused_branch_and_compile(data_uri, tmp_path):
    """loss.context=0 leaves the visual context head without gradients for the whole run: the loop
    finds it and only then asks DDP for find_unused_parameters (without it DDP fails on the second
    step); with train.compile the compiled DDP module trains. (DDP without find_unused_parameters,
    the default, runs in the Accelerate and Ray 2-rank tests.)"""
    run = str(tmp_path / "vis")
    sets = SMALL + [
        "loss.context=0",
        "train.visual_ae.steps=4",
        "train.visual_ae.log_every=2",
        "train.compile=true",
        "train.compile_backend=eager",
    ]
    args = [
        "train",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--stage",
        "visual_ae",
        "--data",
        data_uri,
        "--run",
        run,
        *sum((["--set", s] for s in sets), []),
    ]
    script = tmp_path / "train_rank.py"  # arguments inside the script: torchrun's parser rejects "--run"
    script.write_text(f"import sys\nfrom storymm.cli import main\nsys.exit(main({args!r}))\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_run(run)["world_size"] == 2
    assert [m["step"] for m in read_metrics(run)] == [2, 4]
