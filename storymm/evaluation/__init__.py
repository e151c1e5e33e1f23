"""Scoring trained runs: ``evaluate`` (a run on a whole split), ``metrics`` (accumulators, floors),
``report`` (report.json and its pages), ``compare`` (runs side by side) and ``nightly`` (scheduled
evaluation and regression checks)."""
