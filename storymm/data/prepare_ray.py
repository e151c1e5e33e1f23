"""``prepare --backend ray``: the decode/resize/tokenize work of prepare as Ray tasks.

Why this split: decoding and resizing images is nearly all of prepare's CPU time and is
independent per row, while the rest (duplicate ids, split assignment, shard boundaries, the
manifest's accounting) depends on the order of rows and is cheap. So each task reads its own slice
of a source parquet file straight from storage (a row group, cut into ``ROWS_PER_TASK`` rows),
checks and decodes the rows and tokenizes the kept sentences; the driver consumes the results in
source order and runs exactly the code the local backend runs, so shards, checksums and the
manifest are byte-identical. At most ``2 x workers`` tasks are in flight, which bounds the
driver's memory to that many slices of decoded frames.

Connects to the cluster in ``RAY_ADDRESS`` (e.g. under ``ray job submit``), otherwise starts a
local Ray with ``workers`` CPUs and shuts it down at the end. Sources must be parquet files at a
URI (a hub id is read through ``datasets`` on one machine: download its parquet files first).
Workers reach S3 through their own environment (``AWS_*``), as every storymm process does.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator

import pyarrow.parquet as pq

from storymm import storage
from storymm.data.sources import SOURCE_COLUMNS, SOURCE_SPLITS

log = logging.getLogger(__name__)

ROWS_PER_TASK = 64  # a task decodes ~64 stories (~800 frames): seconds of work against ~ms of overhead


def slices(source) -> list[tuple[str, str, int, int, int]]:
    """``(source split, file URI, row group, first row, end row)`` covering every source row in order."""
    files = getattr(source, "files", None)
    if files is None:
        raise ValueError(
            f"prepare --backend ray reads parquet files at a URI; {source.description} is not one "
            "(download the dataset's parquet files and pass their folder)"
        )
    out = []
    for split in SOURCE_SPLITS:
        for uri in files.get(split, []):
            metadata = pq.ParquetFile(storage.open_input_file(uri)).metadata
            for group in range(metadata.num_row_groups):
                rows = metadata.row_group(group).num_rows
                out += [
                    (split, uri, group, start, min(start + ROWS_PER_TASK, rows))
                    for start in range(0, rows, ROWS_PER_TASK)
                ]
    return out


def check_slice(uri: str, group: int, start: int, end: int, check: dict, tokenizer_json: str) -> list:
    """Runs in a Ray task: read rows ``start:end`` of one row group, check/decode each, tokenize kept rows."""
    from tokenizers import Tokenizer

    from storymm.data.prepare import check_row
    from storymm.data.tokenizer import SentenceTokenizer

    parquet = pq.ParquetFile(storage.open_input_file(uri))
    present = [c for c in SOURCE_COLUMNS if c in parquet.schema_arrow.names]
    rows = parquet.read_row_group(group, columns=present).slice(start, end - start).to_pylist()
    tokenizer = SentenceTokenizer(Tokenizer.from_str(tokenizer_json))
    outcomes = [check_row(row, **check) for row in rows]
    for outcome in outcomes:
        if outcome.reason is None:
            outcome.token_ids = tokenizer.encode_batch([text.sentence for text in outcome.texts])
    return outcomes


def _connect(ray, workers: int) -> bool:
    """Join ``RAY_ADDRESS``'s cluster or start a local one; True when this call started Ray."""
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto", log_to_driver=False)
        return False
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray binds to 127.0.0.1
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    return True


def checked_on_ray(source, check: dict, tokenizer, workers: int) -> Iterator[tuple[str, list]]:
    """(source split, outcomes) per slice in source order, the slices checked by Ray tasks."""
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    import ray

    plan = slices(source)
    started = _connect(ray, workers)
    try:
        task = ray.remote(num_cpus=1, max_retries=3)(check_slice)
        tokenizer_ref = ray.put(tokenizer.to_json())
        log.info("prepare on Ray: %d slices of <= %d rows, %d in flight", len(plan), ROWS_PER_TASK, 2 * workers)
        pending: deque = deque()
        todo = iter(plan)
        for split, uri, group, first, end in todo:
            pending.append((split, task.remote(uri, group, first, end, check, tokenizer_ref)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            split, ref = pending.popleft()
            outcomes = ray.get(ref)
            for split_next, uri, group, first, end in todo:  # refill one
                pending.append((split_next, task.remote(uri, group, first, end, check, tokenizer_ref)))
                break
            yield split, outcomes
    finally:
        if started:
            ray.shutdown()
