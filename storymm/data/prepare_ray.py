"""``prepare --backend ray``: prepare's decoding, tokenizing and shard writing as Ray tasks.

Why this split: decoding and resizing images is nearly all of prepare's CPU time and is
independent per row, and encoding and writing a shard depends only on its rows; what depends on the
order of rows (duplicate ids, split assignment, which shard and row each kept story lands in, the
manifest's accounting) is cheap. So:

1. each *check* task reads its own slice of a source parquet file straight from storage (a row
   group, cut into ``ROWS_PER_TASK`` rows), checks, decodes and tokenizes the rows, and returns two
   objects: the rows' outcomes without pixels (to the driver) and the finished shard records of the
   kept rows (left in the object store of the node that made them);
2. the driver reads the outcomes in source order and runs the local backend's accounting
   (``prepare.Accounting``), which fixes every kept story's split, shard and row: a shard's rows
   are known as soon as ``rows_per_shard`` stories of its split are counted;
3. a *write* task per shard fetches its records from the check tasks' objects, encodes the shard
   and publishes it at its name (``prepare.write_shard``, the code the local backend runs), and
   returns its manifest entry. The driver writes only the tokenizer and the manifest.

Same rows, same order, same code: the output is byte-identical to the local backend's. At most
``2 x workers`` check tasks are in flight; a check task's records are freed once the shards that
take its rows are written.

Connects to the cluster in ``RAY_ADDRESS`` (e.g. under ``ray job submit``), otherwise starts a
local Ray with ``workers`` CPUs and shuts it down at the end. Sources must be parquet files at a
URI (a hub id is read through ``datasets`` on one machine: download its parquet files first).
Workers reach S3 through their own environment (``AWS_*``), as every storymm process does.
"""

from __future__ import annotations

import logging
import os
from collections import deque

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


def check_slice(
    source_split: str, uri: str, group: int, start: int, end: int, check: dict, tokenizer_json: str
) -> tuple[list, list]:
    """Runs in a Ray task: read rows ``start:end`` of one row group, check/decode and tokenize each.
    Returns (outcomes without pixels or texts, for the driver's accounting; per row its shard record,
    None for a rejected row)."""
    from tokenizers import Tokenizer

    from storymm.data.prepare import check_row, shard_record
    from storymm.data.tokenizer import SentenceTokenizer

    parquet = pq.ParquetFile(storage.open_input_file(uri))
    present = [c for c in SOURCE_COLUMNS if c in parquet.schema_arrow.names]
    rows = parquet.read_row_group(group, columns=present).slice(start, end - start).to_pylist()
    tokenizer = SentenceTokenizer(Tokenizer.from_str(tokenizer_json))
    outcomes, records = [check_row(row, **check) for row in rows], []
    for outcome in outcomes:
        record = None
        if outcome.reason is None:
            ids = tokenizer.encode_batch([text.sentence for text in outcome.texts])
            record = shard_record(outcome, source_split, ids)
            outcome.frames, outcome.texts = [], []  # the driver counts; the pixels stay here
        records.append(record)
    return outcomes, records


def write_shard_of(data_uri: str, split: str, index: int, image_size: tuple[int, int], parts: list) -> dict:
    """Runs in a Ray task: shard ``index`` of ``split`` from ``parts``, ``[(records ref, [row, ...])]``
    in shard order; returns its manifest entry."""
    import ray

    from storymm.data.prepare import shard_schema, write_shard

    records = [record for ref, rows in parts for record in _rows(ray.get(ref), rows)]
    return write_shard(data_uri, split, index, records, shard_schema(*image_size))


def _rows(records: list, rows: list[int]) -> list[dict]:
    return [records[row] for row in rows]


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


class _OpenShards:
    """Per split, the kept stories counted but not yet in a launched shard, as (records ref, row)."""

    def __init__(self, launch):
        self.launch = launch
        self.rows: dict[str, list] = {}
        self.count: dict[str, int] = {}

    def add(self, split: str, ref, row: int, rows_per_shard: int) -> None:
        self.rows.setdefault(split, []).append((ref, row))
        if len(self.rows[split]) == rows_per_shard:
            self.flush(split)

    def flush(self, split: str) -> None:
        rows = self.rows.pop(split, [])
        if rows:
            parts: list = []
            for ref, row in rows:  # consecutive rows of one check task travel as one part
                if parts and parts[-1][0] is ref:
                    parts[-1][1].append(row)
                else:
                    parts.append((ref, [row]))
            index = self.count.get(split, 0)
            self.count[split] = index + 1
            self.launch(split, index, parts)


def written_on_ray(
    source, data_uri: str, check: dict, tokenizer, workers: int, image_size, rows_per_shard, accounting, split_of, bar
) -> dict[str, list[dict]]:
    """Check, tokenize and write every shard with Ray tasks; count in source order with
    ``accounting`` (``prepare.Accounting``); return the manifest's shard entries per split."""
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    import ray

    plan = slices(source)
    started = _connect(ray, workers)
    try:
        checker = ray.remote(num_cpus=1, max_retries=3, num_returns=2)(check_slice)
        writer = ray.remote(num_cpus=1, max_retries=3)(write_shard_of)
        tokenizer_ref = ray.put(tokenizer.to_json())
        log.info("prepare on Ray: %d slices of <= %d rows, %d in flight", len(plan), ROWS_PER_TASK, 2 * workers)
        written: dict[str, list] = {}

        def launch(split: str, index: int, parts: list) -> None:
            written.setdefault(split, []).append(writer.remote(data_uri, split, index, tuple(image_size), parts))

        shards = _OpenShards(launch)
        pending: deque = deque()
        todo = iter(plan)

        def submit_next() -> None:
            for split, uri, group, first, end in todo:
                outcomes, records = checker.remote(split, uri, group, first, end, check, tokenizer_ref)
                pending.append((split, outcomes, records))
                return

        for _ in range(2 * workers):
            submit_next()
        while pending:
            source_split, outcomes_ref, records_ref = pending.popleft()
            outcomes = ray.get(outcomes_ref)
            submit_next()
            for row, outcome in enumerate(outcomes):
                if accounting.admit(source_split, outcome):
                    shards.add(split_of(outcome, source_split), records_ref, row, rows_per_shard)
            bar.update(len(outcomes))
        for split in list(shards.rows):
            shards.flush(split)
        entries = {split: ray.get(refs) for split, refs in written.items()}
        log.info("prepare on Ray: %d shards written by Ray tasks", sum(len(e) for e in entries.values()))
        return entries
    finally:
        if started:
            ray.shutdown()
