"""What several tests read back from a run or a cluster, in one place: the loss curve, JSON lines,
the windows trained per step, a Ray job id, a system binary."""

from __future__ import annotations

import json
import shutil

from storymm.training.metrics_store import learned


def curve(metrics: list[dict]) -> list[dict]:
    """Every logged term at every logged step, but those that measure time (throughput, timestamps,
    the time breakdown): what a resumed and an uninterrupted run share."""
    return [learned(m) for m in metrics]


def totals(metrics: list[dict]) -> list[tuple[int, float]]:
    """(step, total loss) per logged step."""
    return [(m["step"], m["total"]) for m in metrics]


def jsonl(text: str | None) -> list[dict]:
    return [json.loads(line) for line in (text or "").splitlines() if line.strip()]


def windows_per_step(lines: list[dict]) -> dict[int, list]:
    """``windows.jsonl`` (``train.record_windows``) as step -> the sorted windows of all ranks: the
    global batch, which does not depend on the number of ranks it was split over."""
    return {w["step"]: sorted(tuple(x) for rank in w["windows"] for x in rank) for w in lines}


def ray_job_id(output: str) -> str:
    """The ``raysubmit_...`` id in ``ray job submit``'s output."""
    for token in output.replace("'", " ").split():
        if token.startswith("raysubmit_"):
            return token.strip(".,")
    raise AssertionError(f"no job id in:\n{output}")


def which(name: str) -> str | None:
    """``name`` on PATH or in the sbin folders (SLURM's daemons, iproute2)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")
