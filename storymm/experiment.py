"""Several configs on the same data, side by side: ``storymm experiment``.

    storymm experiment --data DATA_URI --work URI [--configs baseline,gate,gate_retrained] [--set k=v …]

For each config (a name under ``configs/`` or a YAML path) it trains ``visual_ae``, ``text_ae`` and
``sequence`` (``storymm.training.backends.train_stages``, the sequence stage started from the two
autoencoder runs) under ``WORK/runs/<name>/<stage>``, evaluates the sequence run on ``--split``
(``storymm.evaluation.evaluate.evaluate``) into ``WORK/reports/<name>/``, and writes the comparison of all
of them, every metric and every floor, to ``WORK/reports/comparison.md`` (plus ``comparison.html``
and ``comparison.json``) with the renderer of ``storymm compare``.

``--set`` overrides apply to every config (e.g. smaller sizes or fewer steps for a quick run); the
data must have been prepared at the configs' image size, which is checked for all configs before any
training starts, as is everything else that can fail early (unknown keys, missing VGG16 weights).
Rerunning continues: finished stages are skipped by the training loop's resume logic, so only the
evaluations are recomputed.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from storymm import storage
from storymm.config import Config, ConfigError, load_config
from storymm.data.loader import PreparedDataset
from storymm.errors import StorymmError
from storymm.evaluation.compare import comparison_rows, render
from storymm.training.stages import STAGES

log = logging.getLogger(__name__)

DEFAULT_CONFIGS = ("baseline", "gate", "gate_retrained")
COMPARISON = "comparison"


class ExperimentError(StorymmError, ValueError):
    pass


def config_path(name: str) -> Path:
    """``baseline`` -> ``configs/baseline.yaml`` (current folder first, then the repository's)."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise ExperimentError(f"config file not found: {name}")
        return path
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        path = root / "configs" / f"{name}.yaml"
        if path.is_file():
            return path
    raise ExperimentError(f"no config named {name!r} (looked for configs/{name}.yaml here and in the repository)")


def config_name(name: str) -> str:
    return Path(name).stem if name.endswith((".yaml", ".yml")) or "/" in name else name


def load_configs(names: list[str], overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Config]:
    configs: dict[str, Config] = {}
    for name in names:
        key = config_name(name)
        if key in configs:
            raise ExperimentError(f"config {key!r} is listed twice")
        try:
            configs[key] = load_config(config_path(name), list(overrides))
        except ConfigError as err:
            raise ExperimentError(f"{key}: {err}") from None
    if not configs:
        raise ExperimentError("experiment needs at least one config")
    return configs


def _preflight(configs: dict[str, Config], dataset: PreparedDataset) -> None:
    """Fail before hours of training: image size against the data, perceptual weights present."""
    from storymm.training.stages import build_perceptual

    size = list(dataset.manifest["image_size"])
    for name, config in configs.items():
        wanted = [config.data.image_height, config.data.image_width]
        if wanted != size:
            raise ExperimentError(
                f"{name}: the data was prepared at {size[0]}x{size[1]} but the config asks for "
                f"{wanted[0]}x{wanted[1]}: add --set data.image_height={size[0]} --set data.image_width={size[1]} "
                "or prepare the data with this config"
            )
        try:
            build_perceptual(config)
        except (FileNotFoundError, ValueError) as err:
            raise ExperimentError(f"{name}: {err}") from None


def write_comparison(names: list[str], reports: list[dict], sources: list[str], out_uri: str) -> dict:
    """``comparison.md/.html/.json`` under ``out_uri``, rendered like ``storymm compare``."""
    markdown, page = render(names, comparison_rows(reports), sources)
    files = {"html": storage.join(out_uri, f"{COMPARISON}.html")}
    storage.write_text(files["html"], page)
    storage.write_text(storage.join(out_uri, f"{COMPARISON}.md"), markdown)
    files["md"] = storage.join(out_uri, f"{COMPARISON}.md")
    summary = {
        "names": names,
        "sources": sources,
        "metrics": {n: r.get("metrics", {}) for n, r in zip(names, reports)},
        "floors": {n: r.get("floors", {}) for n, r in zip(names, reports)},
    }
    storage.write_text(storage.join(out_uri, f"{COMPARISON}.json"), json.dumps(summary, indent=2) + "\n")
    files["json"] = storage.join(out_uri, f"{COMPARISON}.json")
    return {"markdown": markdown, "files": files}


def run_experiment(
    data_uri: str,
    work_uri: str,
    configs: list[str] | tuple[str, ...] = DEFAULT_CONFIGS,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    split: str = "test",
    backend: str = "local",
    workers: int = 1,
    progress: bool = True,
    say=print,
) -> dict:
    """Train and evaluate every config on ``data_uri``; write ``WORK/reports/comparison.md``."""
    from storymm.evaluation.evaluate import evaluate, format_summary
    from storymm.training.backends import train_stages

    started = time.perf_counter()
    loaded = load_configs(list(configs), overrides)
    dataset = PreparedDataset(data_uri)
    _preflight(loaded, dataset)
    reports_uri = storage.join(work_uri, "reports")
    names, reports, sources = [], [], []
    for index, (name, config) in enumerate(loaded.items(), start=1):
        runs = {stage: storage.join(work_uri, "runs", name, stage) for stage in STAGES}
        prefix = f"[{index}/{len(loaded)} {name}]"
        train_stages(
            config,
            data_uri,
            runs,
            backend=backend,
            workers=workers,
            progress=progress,
            announce=lambda stage, uri, prefix=prefix: say(f"{prefix} training {stage} -> {storage.redact(uri)}"),
        )
        report_uri = storage.join(reports_uri, name)
        say(f"[{index}/{len(loaded)} {name}] evaluating on {split} -> {storage.redact(report_uri)}")
        report = evaluate(runs["sequence"], data_uri, split, report_uri, progress=progress)
        say(format_summary(report))
        names.append(name)
        reports.append(report)
        sources.append(storage.redact(report_uri))
    result = write_comparison(names, reports, sources, reports_uri)
    say(result["markdown"])
    say(f"comparison: {storage.redact(result['files']['md'])}  ({time.perf_counter() - started:.0f} s in all)")
    return {"names": names, "reports": dict(zip(names, reports)), **result}
