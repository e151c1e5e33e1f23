"""The human page next to ``report.json``: metrics against the floors, loss curves, sample grid.

:func:`write_report` writes, under ``out_uri`` (local path or ``s3://``, via :mod:`storymm.storage`):

- ``report.html``: self-contained (images embedded as base64 ``data:`` URIs),
- ``report.md``: the same tables, pointing at the PNGs beside it,
- ``loss_curves.png``: small multiples, per training stage one panel per loss term (train and val),
- ``time_breakdown.png``: per stage a stacked bar per rank (seconds per step in each part) and the
  goodput line, when the runs logged their time breakdown (``training/timing.py``),
- ``samples.png``: one row per sample: the K input frames, the target, the prediction,
- ``report.json``: the report dict, written LAST because its presence means "complete".

Every piece of text that came from data or from users (sentences, run names, metric names, any
value in the report) is escaped with :func:`html.escape` before it reaches HTML or Markdown.
"""

from __future__ import annotations

import base64
import html
import json
import math
from datetime import UTC, datetime

import numpy as np

from storymm import storage
from storymm.evaluation.render import (
    CSS,
    figure_png,
    image_uint8,
    images_uint8,
    is_finite_number,
    new_figure,
    plain_text,
    render_table,
    to_jsonable,
)
from storymm.training import timing
from storymm.training.metrics_store import is_timing_key

#: Keys in a metrics-history step dict that are not loss terms (not drawn as curves).
NON_LOSS_KEYS = frozenset(
    {
        "step",
        "global_step",
        "epoch",
        "lr",
        "learning_rate",
        "time",
        "wall_time",
        "elapsed",
        "elapsed_s",
        "timestamp",
        "samples",
        "samples_per_s",
        "samples_per_sec",
        "throughput",
        "tokens",
        "grad_norm",
        "rank",
        "world_size",
        "batch_size",
        "val_windows",
    }
)

# (metric, floor key or metric key, floor label, higher is better): the metric beats its floor when it
# is lower (errors, cross-entropy) or higher (SSIM, BLEU, recall).
_FLOOR_CHECKS = (
    ("image_l1", "median_image_l1", "median image", False),
    ("image_l1", "copy_last_l1", "copy last input", False),
    ("image_l1", "copy_two_back_l1", "copy input two back", False),
    ("image_l1", "mean_of_inputs_l1", "mean of the inputs", False),
    ("image_l1", "best_input_oracle_l1", "oracle best input", False),
    ("image_mse", "median_image_mse", "median image", False),
    ("image_mse", "copy_last_mse", "copy last input", False),
    ("image_mse", "copy_two_back_mse", "copy input two back", False),
    ("image_mse", "mean_of_inputs_mse", "mean of the inputs", False),
    ("image_mse", "best_input_oracle_mse", "oracle best input", False),
    ("ssim", "copy_two_back_ssim", "copy input two back", True),
    ("ssim", "best_input_oracle_ssim", "oracle best input", True),
    ("text_ce_true", "text_ce_shuffled", "shuffled condition", False),
    ("text_ce_true", "text_ce_copy_last", "repeat last sentence", False),
    ("text_ce_true", "text_ce_copy_two_back", "repeat sentence two back", False),
    ("bleu", "bleu_copy_last", "repeat last sentence", True),
    ("bleu", "bleu_copy_two_back", "repeat sentence two back", True),
    ("retrieval_r1", "retrieval_r1_chance", "chance (1/N)", True),
    ("retrieval_r10", "retrieval_r10_chance", "chance (10/N)", True),
)

#: The image floors the verdict weighs (L1 keys), all of which a predicting model should beat.
IMAGE_FLOORS = ("median_image", "copy_last", "copy_two_back", "mean_of_inputs", "best_input_oracle")
ORACLE = "best_input_oracle"


def verdict_line(report: dict) -> str:
    """One line on the image L1 against every image floor: the floors the model does not beat,
    strongest (lowest error) first, or, when it beats all but the oracle, how far it is from it."""
    value = (report.get("metrics") or {}).get("image_l1")
    floors = report.get("floors") or {}
    present = {name: floors.get(f"{name}_l1") for name in IMAGE_FLOORS if is_finite_number(floors.get(f"{name}_l1"))}
    if not is_finite_number(value) or not present:
        return "verdict: not available (no image L1 or no floors)"
    failed = sorted((v, name) for name, v in present.items() if value >= v)
    head = f"verdict: image L1 {value:.4f}"
    if not failed:
        if ORACLE in present:
            oracle = present[ORACLE]
            return (
                f"{head} beats every floor, {ORACLE} ({oracle:.4f}) included, "
                f"by {(oracle - value) / oracle:.1%}: it predicts beyond copying an input"
            )
        return f"{head} beats every floor given ({', '.join(sorted(present))})"
    if [name for _, name in failed] == [ORACLE]:
        oracle = present[ORACLE]
        return (
            f"{head} beats every floor but {ORACLE} ({oracle:.4f}): {value - oracle:.4f} above it "
            f"({value / oracle:.2f}x the oracle's error)"
            if oracle > 0
            else f"{head} beats every floor but {ORACLE} (0: some input equals every target)"
        )
    strongest_value, strongest = failed[0]
    others = ", ".join(f"{name} ({v:.4f})" for v, name in failed[1:])
    beaten = sorted(name for name in present if value < present[name])
    return (
        f"{head} does not beat {strongest} ({strongest_value:.4f}), the strongest floor it fails"
        + (f"; nor {others}" if others else "")
        + (f"; beats {', '.join(beaten)}" if beaten else "; beats no floor")
    )


TABLE_COLUMNS = ["metric", "value", "floor", "floor value", "better than floor"]


# ------------------------------------------------------------------------------------ tables


def metrics_rows(report: dict) -> list[dict]:
    """Rows of the metrics table: each metric; floors and a ✓/✗ where the metric has one."""
    metrics = dict(report.get("metrics") or {})
    floors = dict(report.get("floors") or {})
    rows: list[dict] = []
    checked = {m for m, _, _, _ in _FLOOR_CHECKS}
    for name, value in metrics.items():
        if name not in checked:
            if name == "prediction_spread":
                ok = None if value is None else value > 0
                rows.append(
                    {
                        "metric": name,
                        "value": value,
                        "floor": "constant output",
                        "floor value": 0.0,
                        "better than floor": None if ok is None else ("✓" if ok else "✗"),
                    }
                )
            else:
                rows.append({"metric": name, "value": value})
            continue
        before = len(rows)
        for metric, floor_key, label, higher in _FLOOR_CHECKS:
            if metric != name:
                continue
            if floor_key not in floors and floor_key not in metrics:
                continue  # an older report without this floor
            floor_value = floors.get(floor_key, metrics.get(floor_key))
            mark = None
            if is_finite_number(value) and is_finite_number(floor_value):
                better = value > floor_value if higher else value < floor_value
                mark = "✓" if better else "✗"
            rows.append(
                {
                    "metric": name,
                    "value": value,
                    "floor": f"{label} ({floor_key})",
                    "floor value": floor_value,
                    "better than floor": mark,
                }
            )
        if len(rows) == before:  # no floor of this metric in the report
            rows.append({"metric": name, "value": value})
    return rows


# ------------------------------------------------------------------------------------ images


def loss_terms(steps: list[dict]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """``{term: {"train": (steps, values), "val": (steps, values)}}``: ``val_l1`` is ``l1``'s validation
    curve. Keys that are not loss terms (step, lr, throughput, the time breakdown) are left out."""
    terms: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for i, record in enumerate(steps or []):
        x = record.get("step", i)
        for key, value in record.items():
            if key in NON_LOSS_KEYS or is_timing_key(key) or isinstance(value, bool):
                continue
            if not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(float(value)):
                continue
            split, term = ("val", key[4:]) if key.startswith("val_") else ("train", key)
            xs, ys = terms.setdefault(term, {}).setdefault(split, ([], []))
            xs.append(float(x))
            ys.append(float(value))
    return terms


#: panels per row of the loss curves' small multiples
PANELS_PER_ROW = 4


def plot_loss_curves(metrics_history: dict[str, list[dict]]) -> bytes | None:
    """PNG of small multiples: per stage, one panel per loss term with its training curve and, where
    the run validated, its validation curve; ``total`` first. ``None`` if nothing to draw."""
    stages = [(stage, loss_terms(steps)) for stage, steps in metrics_history.items()]
    stages = [(stage, terms) for stage, terms in stages if terms]
    if not stages:
        return None
    rows = [(stage, chunk) for stage, terms in stages for chunk in _rows(sorted(terms, key=_term_order), terms)]
    fig = new_figure(figsize=(3.2 * PANELS_PER_ROW, 2.4 * len(rows)))
    axes = fig.subplots(len(rows), PANELS_PER_ROW, squeeze=False)
    for (stage, chunk), row in zip(rows, axes):
        for ax, item in zip(row, chunk + [None] * (PANELS_PER_ROW - len(chunk))):
            if item is None:
                ax.axis("off")
                continue
            term, curves = item
            values = [y for _, ys in curves.values() for y in ys]
            for split, style in (("train", "-"), ("val", "--")):
                if split in curves:
                    xs, ys = curves[split]
                    ax.plot(xs, ys, style, label=split, marker="." if len(xs) < 30 else None, linewidth=1.2)
            if values and all(y > 0 for y in values):
                ax.set_yscale("log")
            ax.set_title(plain_text(f"{stage}: {term}"), fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
            if "val" in curves:
                ax.legend(fontsize=7)
        row[0].set_ylabel("loss", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def _term_order(term: str) -> tuple[int, str]:
    return (0 if term == "total" else 1, term)


def _rows(order: list[str], terms: dict) -> list[list[tuple[str, dict]]]:
    items = [(term, terms[term]) for term in order]
    return [items[i : i + PANELS_PER_ROW] for i in range(0, len(items), PANELS_PER_ROW)]


def time_summaries(metrics_history: dict[str, list[dict]]) -> dict[str, dict]:
    """Per stage, where its time went (``timing.run_summary``), for the stages whose log has it."""
    out = {}
    for stage, steps in (metrics_history or {}).items():
        summary = timing.run_summary(steps or [])
        if summary is not None:
            out[stage] = summary
    return out


def plot_time_breakdown(summaries: dict[str, dict]) -> bytes | None:
    """PNG: per stage, a stacked bar per rank (seconds per step in each part) and the goodput line."""
    if not summaries:
        return None
    fig = new_figure(
        figsize=(12, 0.5 + max(2.6, 0.2 * max(len(s["ranks"]) for s in summaries.values())) * len(summaries))
    )
    axes = fig.subplots(len(summaries), 2, squeeze=False, gridspec_kw={"width_ratios": [3, 2]})
    for (stage, summary), (bars, line) in zip(summaries.items(), axes):
        labels = [plain_text(f"rank {r['rank']} ({r['host']})") for r in summary["ranks"]]
        left = np.zeros(len(labels))
        for part in timing.PARTS:
            widths = np.array([r[part] for r in summary["ranks"]])
            if widths.sum() > 0:
                bars.barh(labels, widths, left=left, label=timing.LABELS[part])
                left += widths
        bars.invert_yaxis()
        bars.set_xlabel("seconds per step", fontsize=8)
        bars.set_title(plain_text(f"{stage}: where each rank's time went"), fontsize=9)
        bars.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=4, frameon=False)
        bars.tick_params(labelsize=7)
        if summary["goodput"]:
            xs, ys = zip(*summary["goodput"])
            line.plot(xs, ys, marker="." if len(xs) < 30 else None, linewidth=1.2)
        line.set_ylim(0, 1.05)
        line.set_xlabel("step", fontsize=8)
        line.set_title(plain_text(f"{stage}: goodput (productive step time / wall time)"), fontsize=9)
        line.grid(True, alpha=0.3)
        line.tick_params(labelsize=7)
    fig.tight_layout()
    return figure_png(fig)


def plot_samples(samples: list[dict]) -> bytes | None:
    """PNG grid: one row per sample, columns = input frames, target, prediction."""
    if not samples:
        return None
    rows = []
    for sample in samples:
        inputs = images_uint8(sample["inputs"])
        rows.append(inputs + [image_uint8(sample["target"]), image_uint8(sample["prediction"])])
    k = max(len(r) for r in rows) - 2
    h, w = rows[0][0].shape[:2]
    cell_w = 2.2
    cell_h = max(0.8, cell_w * h / w) + 0.35
    fig = new_figure(figsize=(cell_w * (k + 2), cell_h * len(rows)))
    axes = fig.subplots(len(rows), k + 2, squeeze=False)
    titles = [f"input {j + 1}" for j in range(k)] + ["target", "prediction"]
    for r, images in enumerate(rows):
        n_in = len(images) - 2
        placed = [None] * (k - n_in) + images[:n_in] + images[n_in:]  # right-align the inputs
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            image = placed[c]
            if image is None:
                ax.axis("off")
                continue
            ax.imshow(image, interpolation="nearest")
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(f"sample {r + 1}", fontsize=9)
    fig.tight_layout()
    return figure_png(fig)


# ------------------------------------------------------------------------------------ report


def _sample_rows(samples: list[dict]) -> list[dict]:
    rows = []
    for i, s in enumerate(samples):
        inputs = s.get("input_sentences") or []
        rows.append(
            {
                "sample": i + 1,
                "input sentences": " / ".join(str(x) for x in inputs),
                "target sentence": s.get("target_sentence", ""),
                "generated sentence": s.get("generated_sentence", ""),
            }
        )
    return rows


def write_report(
    report: dict,
    out_uri: str,
    *,
    metrics_history: dict[str, list[dict]] | None = None,
    samples: list[dict] | None = None,
    title: str = "storymm evaluation",
) -> dict:
    """Write the report files under ``out_uri``; returns ``{name: uri}`` of what was written.

    ``report`` is the evaluation dict (``{"windows", "metrics", "floors", ...}`` plus any run
    metadata); ``metrics_history`` maps stage name to per-step dicts; ``samples`` are dicts with
    ``inputs`` ([K,H,W,3] uint8 or [K,3,H,W] float), ``target``, ``prediction``,
    ``input_sentences``, ``target_sentence``, ``generated_sentence``. ``loss_curves.png`` and
    ``samples.png`` are written only when there is something to draw. ``report.json`` is last.
    """
    written: dict[str, str] = {}

    def put(name: str, data: bytes) -> str:
        uri = storage.join(out_uri, name)
        storage.write_bytes(uri, data)
        written[name] = uri
        return uri

    clean = to_jsonable(report)
    report_json = json.dumps(clean, indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    loss_png = plot_loss_curves(metrics_history) if metrics_history else None
    times = time_summaries(metrics_history)
    time_png = plot_time_breakdown(times)
    stragglers = [f"{stage}: {text}" for stage, summary in times.items() for text in summary["stragglers"]]
    speeds = [_speed(stage, summary) for stage, summary in times.items() if summary["flops_per_s"]]
    samples_png = plot_samples(samples) if samples else None

    # metadata: every top-level scalar of the report (run names, checkpoint, split, windows...)
    meta_rows = [
        {"field": key, "value": value}
        for key, value in clean.items()
        if key not in ("metrics", "floors", "verdict") and not isinstance(value, (dict, list))
    ]
    verdict = clean.get("verdict") or (verdict_line(clean) if clean.get("metrics") else None)
    notes = [f"{name}: {text}" for name, text in (clean.get("notes") or {}).items()]
    meta_md, meta_html = render_table(meta_rows, ["field", "value"])
    table_md, table_html = render_table(metrics_rows(clean), TABLE_COLUMNS)
    sample_md, sample_html = render_table(
        _sample_rows(samples or []),
        ["sample", "input sentences", "target sentence", "generated sentence"],
    )
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    safe_title = html.escape(str(title))

    # ---- HTML (self-contained)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{safe_title}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{safe_title}</h1>",
        f"<p>Generated {html.escape(generated)}. Metric definitions: see the README "
        "(<code>storymm.evaluation.metrics</code>). ✓ means better than the floor (lower error; higher for SSIM, BLEU "
        "and recall).</p>",
    ]
    if meta_rows:
        parts += ["<h2>Run</h2>", meta_html.replace("<table>", '<table class="meta">', 1)]
    parts.append("<h2>Metrics against the floors</h2>")
    if verdict:
        parts.append(f'<p class="verdict"><strong>{html.escape(str(verdict))}</strong></p>')
    parts.append(table_html)
    parts += [f"<p>{html.escape(note)}</p>" for note in notes]
    parts.append("<h2>Loss curves</h2>")
    if loss_png is not None:
        b64 = base64.b64encode(loss_png).decode("ascii")
        parts.append(f'<img alt="loss curves" src="data:image/png;base64,{b64}">')
    else:
        parts.append("<p>No training history was given.</p>")
    if time_png is not None:
        b64 = base64.b64encode(time_png).decode("ascii")
        parts.append("<h2>Where the time went</h2>")
        parts.append(_TIME_NOTE_HTML)
        parts.append(f'<img alt="time breakdown" src="data:image/png;base64,{b64}">')
        parts.append(_stragglers_html(stragglers))
        parts += [f"<p>{html.escape(s)}</p>" for s in speeds]
    parts.append("<h2>Sample predictions</h2>")
    if samples_png is not None:
        b64 = base64.b64encode(samples_png).decode("ascii")
        parts.append(
            "<p>Each row: the input frames, the target frame, the predicted frame.</p>"
            f'<img alt="sample predictions" src="data:image/png;base64,{b64}">'
        )
        parts.append(sample_html)
    else:
        parts.append("<p>No samples were given.</p>")
    parts.append("</body></html>")
    page_html = "\n".join(parts) + "\n"

    # ---- Markdown
    md = [f"# {html.escape(str(title))}", "", f"Generated {generated}.", ""]
    if meta_rows:
        md += ["## Run", "", meta_md]
    md += ["## Metrics against the floors", ""]
    if verdict:
        md += [f"**{html.escape(str(verdict))}**", ""]
    md += ["✓ means better than the floor (lower error; higher for SSIM, BLEU and recall).", "", table_md]
    md += [html.escape(note) + "\n" for note in notes]
    md += ["## Loss curves", ""]
    md += ["![loss curves](loss_curves.png)", ""] if loss_png is not None else ["No training history was given.", ""]
    if time_png is not None:
        md += ["## Where the time went", "", _TIME_NOTE, "", "![time breakdown](time_breakdown.png)", ""]
        md += [f"- slowest rank: {html.escape(s)}" for s in stragglers] or ["- no straggler: no rank was slower"]
        md += [f"- {html.escape(s)}" for s in speeds] + [""]
    md += ["## Sample predictions", ""]
    if samples_png is not None:
        md += [
            "Each row: the input frames, the target frame, the predicted frame.",
            "",
            "![sample predictions](samples.png)",
            "",
            sample_md,
        ]
    else:
        md += ["No samples were given.", ""]
    page_md = "\n".join(md)

    if loss_png is not None:
        put("loss_curves.png", loss_png)
    if time_png is not None:
        put("time_breakdown.png", time_png)
    if samples_png is not None:
        put("samples.png", samples_png)
    put("report.md", page_md.encode("utf-8"))
    put("report.html", page_html.encode("utf-8"))
    put("report.json", report_json.encode("utf-8"))  # last: the completion marker
    return written


# ------------------------------------------------------------------------------------ links


_TIME_NOTE = (
    "Seconds per training step in each part, per rank, over the whole run (from each rank's phase clock); "
    "goodput is productive step time over wall time since the run started, restarts included "
    "(docs/monitoring.md)."
)
_TIME_NOTE_HTML = f"<p>{html.escape(_TIME_NOTE)}</p>"


def _speed(stage: str, summary: dict) -> str:
    """'sequence: 12.3 GFLOP/s achieved (model FLOPs of forward and backward), MFU 41.0%'."""
    mfu = f", MFU {100 * summary['mfu']:.1f}%" if summary.get("mfu") is not None else " (no MFU: not on a known GPU)"
    rate = summary["flops_per_s"] / 1e9
    return f"{stage}: {rate:.3g} GFLOP/s achieved (median; model FLOPs of forward and backward){mfu}"


def _stragglers_html(stragglers: list[str]) -> str:
    if not stragglers:
        return f"<p>{html.escape(f'No straggler: no rank was {100 * timing.STRAGGLER_THRESHOLD:.0f}% slower.')}</p>"
    items = "".join(f"<li>slowest rank: {html.escape(s)}</li>" for s in stragglers)
    return f"<ul>{items}</ul>"


def report_page_uri(uri: str) -> str:
    """The page to open for ``uri``: the URI itself if it names an ``.html`` file, else the folder's
    ``report.html``, else its ``index.html`` (a nightly folder), else ``compare.html``."""
    uri = str(uri).rstrip("/")
    if uri.endswith(".html"):
        if not storage.is_file(uri):
            raise FileNotFoundError(f"no such page: {storage.redact(uri)}")
        return uri
    for name in ("report.html", "index.html", "compare.html"):
        candidate = storage.join(uri, name)
        if storage.is_file(candidate):
            return candidate
    raise FileNotFoundError(f"no report.html, index.html or compare.html under {storage.redact(uri)}")


def report_url(uri: str, expires: int = 3600) -> str:
    """A link a browser can open: a presigned ``GET`` URL for an ``s3://`` page (valid ``expires``
    seconds; see :func:`storymm.storage.presigned_url`), or the ``file://`` URI of a local page.
    Pages are self-contained (images embedded), so the one signed object is all a browser needs."""
    from pathlib import Path

    if not 1 <= int(expires) <= 7 * 24 * 3600:
        raise ValueError(f"--expires must be between 1 s and 7 days (604800 s), got {expires}")
    page = report_page_uri(uri)
    if not storage.is_remote(page):
        return Path(storage.locate(page).path).resolve().as_uri()
    return storage.presigned_url(page, int(expires), content_type="text/html; charset=utf-8")
