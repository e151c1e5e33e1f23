"""`ray job submit --working-dir . -- python jobs/nightly_eval.py …`: same arguments as `storymm nightly`.

Exits with `storymm nightly`'s code: 0 nothing regressed, 3 a metric regressed beyond tolerance,
4 an evaluation failed, 2 bad arguments. (`ray job submit` turns any non-zero code into a failed
job; the `REGRESSION:` / `FAILED:` line in the job log says which.)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the working dir's storymm

from storymm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
