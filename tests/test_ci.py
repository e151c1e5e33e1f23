"""CI fails instead of skipping: with ``--fail-on-skip`` (what ``.ci/run`` passes), a run in which a
test skipped exits non-zero; without it, or with nothing skipped, it passes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _pytest(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "pytest", "-p", "skips", "-p", "no:cacheprovider", "-q", str(folder), *args]
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=120)


def test_a_skipped_test_fails_the_ci_run(tmp_path):
    (tmp_path / "test_one.py").write_text(
        "import pytest\n\ndef test_runs():\n    pass\n\n"
        "def test_needs_slurm():\n    pytest.skip('slurm-wlm is not installed')\n"
    )
    assert _pytest(tmp_path).returncode == 0
    failed = _pytest(tmp_path, "--fail-on-skip")
    assert failed.returncode == 1 and "1 test(s) skipped, so this run fails" in failed.stdout
    assert _pytest(tmp_path, "--fail-on-skip", "-k", "runs").returncode == 0  # deselected is not skipped


def test_ci_passes_fail_on_skip():
    assert "--fail-on-skip" in (TESTS.parent / ".ci/run").read_text()
