"""``storymm pipeline``: everything end to end in one work folder (local or s3://).

work/source  synthetic stories (made only if the folder has none)
work/data    prepared shards (re-prepared when the config's data settings changed)
work/runs/   visual_ae, text_ae, sequence-<fusion> runs (each resumes where it stopped)
work/reports/<fusion>/  the evaluation report of the sequence run on the test split

Each step is skipped or resumed when its output is already complete, so rerunning after an
interruption continues instead of starting over.
"""

from __future__ import annotations

import json
import logging
import time

from storymm import storage
from storymm.config import Config
from storymm.data.prepare import MANIFEST_FILE, prepare, summarize
from storymm.evaluation.evaluate import evaluate, format_summary
from storymm.training.backends import train_stages

log = logging.getLogger(__name__)


def _needs_prepare(data_uri: str, config: Config) -> bool:
    manifest_uri = storage.join(data_uri, MANIFEST_FILE)
    if not storage.exists(manifest_uri):
        return True
    manifest = json.loads(storage.read_text(manifest_uri))
    wanted = {
        "image_size": [config.data.image_height, config.data.image_width],
        "context_frames": config.data.context_frames,
        "split_seed": config.seed,
        "val_fraction": config.data.val_fraction,
        "tokenizer_spec": config.data.tokenizer,
        "requested_vocab_size": config.data.tokenizer_vocab_size if config.data.tokenizer == "train" else None,
    }
    have = {
        "image_size": manifest["image_size"],
        "context_frames": manifest["context_frames"],
        "split_seed": manifest["split_seed"],
        "val_fraction": manifest["val_fraction"],
        "tokenizer_spec": manifest["tokenizer"]["spec"],
        "requested_vocab_size": manifest["tokenizer"].get("requested_vocab_size"),
    }
    return wanted != have


def run_pipeline(
    config: Config, work_uri: str, backend: str = "local", workers: int = 1, say=print, progress: bool = True
) -> dict:
    started = time.perf_counter()
    source = storage.join(work_uri, "source")
    data = storage.join(work_uri, "data")
    runs = storage.join(work_uri, "runs")
    fusion = config.model.fusion
    report_uri = storage.join(work_uri, "reports", fusion)

    if not storage.list_files(storage.join(source, "train"), suffix=".parquet"):
        from storymm.data.synth import synthesize

        say(f"[1/6] synthesising {config.synth.stories} {config.synth.scene} stories into {storage.redact(source)}")
        synthesize(
            source,
            config.synth.stories,
            seed=config.seed,
            frames=(config.synth.frames_min, config.synth.frames_max),
            scene=config.synth.scene,
            progress=progress,
        )
    else:
        say(f"[1/6] source stories already in {storage.redact(source)}")

    if _needs_prepare(data, config):
        say(f"[2/6] preparing {storage.redact(data)}")
        say(summarize(prepare(source, data, config, progress=progress), data))
    else:
        say(f"[2/6] prepared data already in {storage.redact(data)}")

    stage_runs = {
        "visual_ae": storage.join(runs, "visual_ae"),
        "text_ae": storage.join(runs, "text_ae"),
        "sequence": storage.join(runs, f"sequence-{fusion}"),
    }
    numbers = {"visual_ae": 3, "text_ae": 4, "sequence": 5}
    train_stages(
        config,
        data,
        stage_runs,
        backend=backend,
        workers=workers,
        progress=progress,
        announce=lambda stage, uri: say(f"[{numbers[stage]}/6] training {stage} -> {storage.redact(uri)}"),
    )

    say(f"[6/6] evaluating on the test split -> {storage.redact(report_uri)}")
    report = evaluate(stage_runs["sequence"], data, "test", report_uri, progress=progress)
    say(format_summary(report))
    page = storage.join(report_uri, "report.html")
    say(f"report: {storage.redact(page)}  ({time.perf_counter() - started:.0f} s in all)")
    say(
        f"use the model: storymm export --run {storage.redact(stage_runs['sequence'])} --out MODEL_DIR, then "
        "storymm predict --model MODEL_DIR --story FOLDER --out OUT (README: Use a trained model)"
    )
    return {"report": report, "report_uri": report_uri, "runs": stage_runs, "data": data}
