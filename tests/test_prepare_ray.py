"""`storymm prepare --backend ray --workers 2` (a real local Ray, tasks per row-group slice) writes
byte-for-byte what the local prepare writes: the same shards, checksums, manifest and summary."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_prepare import _bad_rows, _good

from storymm.data import synth

ROOT = Path(__file__).resolve().parents[1]


def _source(root: Path) -> None:
    """Two train files in row groups of 8 (several Ray tasks), bad rows of every kind, and a
    duplicate story id whose twin sits in another file (so another task) than its first copy."""
    good = [_good(i) for i in range(30)]
    bad = [row for row, _ in _bad_rows()]
    files = {"train": [good[:18], good[18:] + bad + [dict(good[3])]], "test": [[_good(i) for i in range(200, 206)]]}
    for split, parts in files.items():
        os.makedirs(root / split, exist_ok=True)
        for index, rows in enumerate(parts):
            table = pa.Table.from_pylist(rows, schema=synth.SOURCE_SCHEMA)
            pq.write_table(table, root / split / f"part-{index:05d}.parquet", row_group_size=8)


def _prepare(source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    command = [
        sys.executable,
        "-m",
        "storymm.cli",
        "prepare",
        "--source",
        str(source),
        "--out",
        str(out),
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--set",
        "data.rows_per_shard=7",
        "--set",
        "data.val_fraction=0.2",
        *extra,
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_ray_prepare_is_byte_identical_to_local(tmp_path):
    _source(tmp_path / "source")
    local = _prepare(tmp_path / "source", tmp_path / "local")
    ray = _prepare(tmp_path / "source", tmp_path / "ray", "--backend", "ray", "--workers", "2")

    groups = sum(pq.ParquetFile(f).metadata.num_row_groups for f in (tmp_path / "source").rglob("*.parquet"))
    assert groups >= 6 and f"prepare on Ray: {groups} slices" in ray.stderr  # one task per row group here
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    manifest = json.loads((tmp_path / "ray/manifest.json").read_text())
    assert manifest == json.loads((tmp_path / "local/manifest.json").read_text())
    assert manifest["rejected"]["duplicate_story_id"] == 2 and manifest["dropped_frames"]  # within and across tasks
    assert manifest["source_rows"] == sum(manifest["kept_stories"].values()) + sum(manifest["rejected"].values())
    # the same summary, and the same progress total (stderr is a pipe here: plain progress lines, not a bar)
    assert ray.stdout.replace(str(tmp_path / "ray"), "OUT") == local.stdout.replace(str(tmp_path / "local"), "OUT")
    bars = [re.findall(r"prepare: story (\d+)/(\d+) \(100%\)", run.stderr)[-1] for run in (local, ray)]
    assert bars[0] == bars[1] == (str(manifest["source_rows"]),) * 2
