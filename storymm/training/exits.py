"""How a training process ended, for the job scripts that restart it.

``storymm train`` exits 0 (done), 2 (a user error: retrying cannot help), ``EXIT_STOPPED`` (stopped
at a checkpoint on a signal: rerun to resume) or ``EXIT_HUNG`` (its watchdog found no progress and
wrote an incident); anything else is a crash. Launchers hide these codes (torch elastic, which
``accelerate launch`` runs, reports any failed worker as exit 1), so when ``STORYMM_OUTCOME_DIR`` is
set each rank also leaves a one-line file there naming its code, which ``slurm/train_gate.sh`` reads
to decide between retrying, requeueing and giving up.
"""

from __future__ import annotations

import os
import socket

EXIT_USER_ERROR = 2
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early on a signal, checkpointed
EXIT_HUNG = 85  # the progress watchdog declared this rank hung (RUN/incidents/ says where)

OUTCOME_DIR_ENV = "STORYMM_OUTCOME_DIR"

MEANING = {0: "completed", EXIT_USER_ERROR: "error", EXIT_STOPPED: "stopped", EXIT_HUNG: "hung"}


def describe(code: int) -> str:
    return MEANING.get(code, "crashed")


def record_outcome(code: int) -> None:
    """Leave ``<STORYMM_OUTCOME_DIR>/rank-R-HOST`` = "CODE MEANING" for the job script (no-op when
    unset). Must never raise: it runs on the way out, also from the watchdog thread."""
    folder = os.environ.get(OUTCOME_DIR_ENV)
    if not folder:
        return
    rank = os.environ.get("RANK", "0")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"rank-{rank}-{socket.gethostname()}"), "w") as handle:
            handle.write(f"{code} {describe(code)}\n")
    except OSError:
        pass
