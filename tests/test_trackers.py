"""Experiment trackers against the real thing: a real MLflow tracking server (sqlite backend, artifacts
on the test S3 server; one per session, ~17 s to start) and TensorBoard's own event reader. A run
that crashes between checkpoints and is resumed is one MLflow run and one TensorBoard run whose
points equal the metrics log exactly, each step once; an unreachable server costs one warning and
never the run, and the next run of the command sends what it missed. (A Ray run that loses a worker:
tests/test_ray.py.)"""

from __future__ import annotations

import json
import logging
import time

import pytest
from netlink import SlowLink

from storymm import storage
from storymm.training.loop import read_metrics, train
from storymm.training.run import RunFolder
from storymm.training.runtime import Runtime

from small import free_port, logged_points, mlflow_points, small_config, small_dataset, tensorboard_points

TRACKERS_LOG = "storymm.training.trackers"
pytestmark = pytest.mark.slow  # a real MLflow server


@pytest.fixture(scope="module")
def data_uri(tmp_path_factory):
    return small_dataset(str(tmp_path_factory.mktemp("trackers")), 40, seed=7, frames=(6, 10))


@pytest.fixture
def mlflow_env(mlflow_server, monkeypatch, request):
    """MLFLOW_TRACKING_URI at the shared server, and an experiment of this test's own."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", request.node.name)
    return mlflow_server


class _Crash(RuntimeError):
    pass


class _Hook(Runtime):
    """The in-process runtime with something done after step ``at`` (the loop asks ``should_stop``
    once after every step that does not finish the run): a crash, or cutting a connection."""

    def __init__(self, at: int, action):
        super().__init__()
        self.at, self.action, self.steps = at, action, 0

    def should_stop(self) -> bool:
        self.steps += 1
        if self.steps == self.at:
            self.action()
        return False


def _crash():
    raise _Crash("killed between checkpoints")


def _experiment_runs(tracking_uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def _mlflow_state(run: str) -> dict:
    uri = RunFolder(run).tracker_file()
    return json.loads(storage.read_text(uri))["mlflow"] if storage.exists(uri) else {}


def _wait_sent(run: str, step: int, timeout: float = 60) -> dict:
    """The MLflow thread is asynchronous: wait until it holds ``step`` (``trackers.json``)."""
    deadline = time.monotonic() + timeout
    while _mlflow_state(run).get("through_step", -1) < step:
        assert time.monotonic() < deadline, f"MLflow never got step {step}: {_mlflow_state(run)}"
        time.sleep(0.1)
    return _mlflow_state(run)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == TRACKERS_LOG and r.levelno >= logging.WARNING]


def test_a_crashed_and_resumed_run_is_one_tracker_run_with_each_step_once(data_uri, tmp_path, mlflow_env, request):
    """Sequence stage with validation: crashed at step 7 (checkpoints every 4), resumed by the same
    call. Before the resume TensorBoard shows steps 1-7 and MLflow only 1-4 (what no resume can redo);
    after it both equal the metrics log, every key, every step once, in one run each; the MLflow run
    has the resolved config as parameters and run.json as an artifact on the server's S3 store."""
    run = str(tmp_path / "seq")
    config = small_config(
        "train.sequence.steps=12",
        "train.sequence.log_every=1",
        "train.sequence.checkpoint_every=4",
        "train.sequence.warmup_steps=2",
        "train.trackers=[tensorboard,mlflow]",
        "eval.median_windows=50",
    )
    with pytest.raises(_Crash):
        train(config, "sequence", data_uri, run, _Hook(7, _crash), progress=False)
    state = _wait_sent(run, 4)
    assert max(s for points in tensorboard_points(run).values() for s, _ in points) == 7
    held = mlflow_points(mlflow_env.uri, state["run_id"])
    assert max(s for points in held.values() for s, _ in points) == 4 == _mlflow_state(run)["through_step"]

    assert train(config, "sequence", data_uri, run, progress=False)["status"] == "completed"
    expected = logged_points(run)
    assert [m["step"] for m in read_metrics(run)] == list(range(1, 13))
    assert {"total", "val_total", "lr", "samples_per_s"} <= set(expected)
    assert [s for s, _ in expected["val_total"]] == [4, 8, 12]
    assert tensorboard_points(run) == expected
    runs = _experiment_runs(mlflow_env.uri, request.node.name)
    assert [r.info.run_id for r in runs] == [state["run_id"]]  # one MLflow run through the resume
    assert runs[0].info.status == "FINISHED"
    assert mlflow_points(mlflow_env.uri, state["run_id"]) == expected
    params = runs[0].data.params
    assert params["train.sequence.checkpoint_every"] == "4" and params["data.batch_size"] == "8"
    keys = [o["Key"] for o in mlflow_env.s3.client().list_objects_v2(Bucket=mlflow_env.bucket)["Contents"]]
    assert any(k.endswith(f"{state['run_id']}/artifacts/storymm/run.json") for k in keys), keys


def test_an_unreachable_mlflow_costs_one_warning_and_the_next_run_sends_what_it_missed(
    data_uri, tmp_path, mlflow_env, monkeypatch, caplog, request
):
    """Down at start (nothing listens) and cut off mid-run (the connection to the real server closed
    after step 3): each run finishes with one warning; rerunning the command with the server
    reachable completes each MLflow run from the metrics log, each step once."""
    config = small_config(
        "train.text_ae.steps=8",
        "train.text_ae.log_every=1",
        "train.text_ae.checkpoint_every=2",
        "train.trackers=[mlflow]",
    )
    down, cut = str(tmp_path / "down"), str(tmp_path / "cut")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with caplog.at_level(logging.INFO, logger=TRACKERS_LOG):
        assert train(config, "text_ae", data_uri, down, progress=False)["status"] == "completed"
    assert len(_warnings(caplog)) == 1, _warnings(caplog)
    assert "cannot reach" in _warnings(caplog)[0]

    caplog.clear()
    with SlowLink(mlflow_env.port) as proxy:

        def cut_off():  # once MLflow holds the first checkpoint's steps: the server was reachable
            _wait_sent(cut, 2)
            proxy.close()

        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{proxy.port}")
        with caplog.at_level(logging.INFO, logger=TRACKERS_LOG):
            summary = train(config, "text_ae", data_uri, cut, _Hook(3, cut_off), progress=False)
    assert summary["status"] == "completed"
    assert len(_warnings(caplog)) == 1, _warnings(caplog)
    assert 2 <= _mlflow_state(cut)["through_step"] < 8

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_env.uri)
    for run in (down, cut):
        assert train(config, "text_ae", data_uri, run, progress=False)["step"] == 8  # nothing left to train
        run_id = json.loads(storage.read_text(RunFolder(run).tracker_file()))["mlflow"]["run_id"]
        assert mlflow_points(mlflow_env.uri, run_id) == logged_points(run)
    assert len(_experiment_runs(mlflow_env.uri, request.node.name)) == 2
