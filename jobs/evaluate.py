"""`ray job submit --working-dir . -- python jobs/evaluate.py …`: same arguments as `storymm evaluate`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the working dir's storymm

from storymm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
