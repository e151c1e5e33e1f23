"""`ray job submit --working-dir . -- python jobs/train.py …`: same arguments as `storymm train`.

Also the script `accelerate launch` runs in every process of `slurm/train_gate.sh`. There, when
training stopped early on SLURM's warning signal (`storymm train` returns `EXIT_STOPPED`), each
process touches the file named by `STORYMM_STOPPED_MARKER` and exits 0: the launcher (torch elastic)
turns any non-zero worker exit into a generic failure, so the job script reads the marker instead of
an exit code to decide to requeue. For the same reason every process records how it ended (its exit
code) in `STORYMM_OUTCOME_DIR` when that is set (storymm/training/exits.py); the progress watchdog
does the same before it ends a hung process.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the working dir's storymm

from storymm.cli import EXIT_STOPPED, main  # noqa: E402
from storymm.training.exits import record_outcome  # noqa: E402

if __name__ == "__main__":
    try:
        code = main(["train", *sys.argv[1:]])
    except SystemExit as stop:  # an argument error
        record_outcome(stop.code if isinstance(stop.code, int) else 1)
        raise
    except BaseException:  # a crash: the traceback follows
        record_outcome(1)
        raise
    record_outcome(code)
    marker = os.environ.get("STORYMM_STOPPED_MARKER")
    if code == EXIT_STOPPED and marker:
        with open(marker, "a"):
            pass
        code = 0
    sys.exit(code)
