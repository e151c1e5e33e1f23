"""A pytest plugin: ``--fail-on-skip`` makes a run in which any test skipped fail (exit 1).

CI passes it (``.ci/run``): a skipped SLURM, browser, S3 or multi-node test means the run did not test
what the README claims, and CI must say so with its exit status, not only in the summary. Loaded by
``conftest.py``; ``make test`` and ``make test-fast`` run without it, so a laptop that cannot install
SLURM still runs the rest (and the summary lists what did not run). A test that cannot run on the CI
machine by design (hardware it does not have) belongs behind a marker CI deselects, not a skip.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--fail-on-skip", action="store_true", help="fail the run (exit 1) when any test skipped (CI: .ci/run)"
    )


def pytest_sessionfinish(session, exitstatus):
    if not session.config.getoption("--fail-on-skip") or exitstatus != pytest.ExitCode.OK:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if reporter is not None:
            reporter.write_line(f"--fail-on-skip: {len(skipped)} test(s) skipped, so this run fails", red=True)
