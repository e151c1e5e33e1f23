"""Several evaluations side by side: ``storymm compare RUN_OR_REPORT_URI… --out URI [--names a,b,c]``.

Each source is a report folder (with ``report.json``), a ``report.json`` URI, or a sequence run
folder; a run is evaluated first (on ``--data``, split ``--split``, report written under
``OUT/reports/<name>/``) and without ``--data`` it is a clear error. Writes ``compare.md``,
``compare.html`` and ``compare.json`` under ``--out``: one column per source, one row per metric
(the best value of each row marked, in the metric's direction from
:data:`storymm.evaluation.metrics.HIGHER_IS_BETTER`), then one row per floor, then the run metadata.
All text from the reports (names, run URIs) is HTML-escaped in both pages.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
from typing import Any

from storymm import storage
from storymm.errors import StorymmError
from storymm.evaluation.metrics import CONTROL_METRICS, HIGHER_IS_BETTER
from storymm.evaluation.render import CSS, fmt, is_finite_number, md_cell, to_jsonable
from storymm.training.run import RunFolder

INFO_KEYS = ("verdict", "run", "step", "checkpoint", "split", "windows", "created")
MODEL_KEYS = ("fusion", "copy_path", "image_head", "text_head", "visual_latent", "text_latent")


class CompareError(StorymmError, ValueError):
    pass


def _report_json_uri(uri: str) -> str | None:
    if str(uri).endswith(".json") and storage.is_file(uri):
        return uri
    candidate = storage.join(uri, "report.json")
    return candidate if storage.exists(candidate) else None


def _default_name(uri: str, report: dict | None) -> str:
    base = storage.basename(storage.redact(uri))
    if base == "report.json":
        base = storage.basename(storage.redact(uri).rsplit("/", 1)[0])
    return base or "report"


def load_sources(
    sources: list[str],
    out_uri: str,
    *,
    names: list[str] | None = None,
    data_uri: str | None = None,
    split: str = "test",
    evaluate_fn=None,
) -> list[tuple[str, str, dict]]:
    """``[(name, source, report)]``: reports read, runs evaluated (with ``data_uri``)."""
    if not sources:
        raise CompareError("compare needs at least one report or run URI")
    if names is not None and len(names) != len(sources):
        raise CompareError(f"--names gives {len(names)} names for {len(sources)} sources")
    given = names or [None] * len(sources)
    loaded = []
    for uri, name in zip(sources, given):
        report_uri = _report_json_uri(uri)
        report = json.loads(storage.read_text(report_uri)) if report_uri else None
        loaded.append([uri, name, report])
    final = storage.unique_names([name or _default_name(uri, report) for uri, name, report in loaded])
    out = []
    for (uri, _, report), name in zip(loaded, final):
        if report is None:
            if not RunFolder(uri).exists():
                raise CompareError(f"{storage.redact(uri)} holds neither a report.json nor a run (run.json)")
            if data_uri is None:
                raise CompareError(
                    f"{storage.redact(uri)} is a run without a report: give --data DATA_URI to evaluate it "
                    f"on the {split} split first, or pass its report folder"
                )
            if evaluate_fn is None:
                from storymm.evaluation.evaluate import evaluate as evaluate_fn
            report = evaluate_fn(
                uri, data_uri, split, storage.join(out_uri, "reports", storage.safe_name(name)), progress=False
            )
        out.append((name, storage.redact(uri), report))
    return out


def _best(values: list[Any], higher: bool | None) -> set[int]:
    if higher is None:
        return set()
    finite = [(i, v) for i, v in enumerate(values) if is_finite_number(v)]
    if len(finite) < 2:
        return set()
    target = max(v for _, v in finite) if higher else min(v for _, v in finite)
    return {i for i, v in finite if v == target}


def comparison_rows(reports: list[dict]) -> list[dict]:
    """Rows ``{label, kind, higher_is_better, values, best}``: metrics, then floors, then metadata."""

    def union(key: str) -> list[str]:
        seen: list[str] = []
        for report in reports:
            for name in report.get(key) or {}:
                if name not in seen:
                    seen.append(name)
        return seen

    metrics = union("metrics")
    metrics = [m for m in HIGHER_IS_BETTER if m in metrics] + [m for m in metrics if m not in HIGHER_IS_BETTER]
    rows = []
    for name in metrics:
        values = [(r.get("metrics") or {}).get(name) for r in reports]
        higher = HIGHER_IS_BETTER.get(name)
        best = [] if name in CONTROL_METRICS else sorted(_best(values, higher))
        rows.append({"label": name, "kind": "metric", "higher_is_better": higher, "values": values, "best": best})
    for name in union("floors"):
        rows.append(
            {
                "label": f"floor: {name}",
                "kind": "floor",
                "higher_is_better": None,
                "values": [(r.get("floors") or {}).get(name) for r in reports],
                "best": [],
            }
        )
    for key in INFO_KEYS:
        if any(key in r for r in reports):
            rows.append(
                {
                    "label": key,
                    "kind": "info",
                    "higher_is_better": None,
                    "values": [r.get(key) for r in reports],
                    "best": [],
                }
            )
    for key in MODEL_KEYS:
        if any(key in (r.get("model") or {}) for r in reports):
            rows.append(
                {
                    "label": f"model.{key}",
                    "kind": "info",
                    "higher_is_better": None,
                    "values": [(r.get("model") or {}).get(key) for r in reports],
                    "best": [],
                }
            )
    return rows


def _arrow(higher: bool | None) -> str:
    return "" if higher is None else " ↑" if higher else " ↓"


def render(names: list[str], rows: list[dict], sources: list[str]) -> tuple[str, str]:
    """``(markdown, html)`` of the comparison table; the best value per metric row in bold with ★."""
    generated = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    note = "↑ higher is better, ↓ lower is better; ★ marks the best value of each metric row."
    header = ["metric", *names]
    md = [
        "# storymm comparison",
        "",
        f"Generated {generated}. {note}",
        "",
        "| " + " | ".join(md_cell(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for row in rows:
        cells = [md_cell(row["label"]) + _arrow(row["higher_is_better"])]
        for i, value in enumerate(row["values"]):
            cells.append(f"**{md_cell(value)}** ★" if i in row["best"] else md_cell(value))
        md.append("| " + " | ".join(cells) + " |")
    md += ["", "## Sources", ""] + [f"- {md_cell(n)}: `{md_cell(s)}`" for n, s in zip(names, sources)] + [""]

    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = []
    for row in rows:
        cls = f' class="{row["kind"]}"'
        cells = [f"<th{cls}>{html.escape(row['label'] + _arrow(row['higher_is_better']))}</th>"]
        for i, value in enumerate(row["values"]):
            text = html.escape(fmt(value))
            cells.append(f'<td class="best"><strong>{text}</strong> ★</td>' if i in row["best"] else f"<td>{text}</td>")
        body.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    css = CSS + "td.best { background: #e3f4e5; } tr.floor th, tr.floor td { color: #555; font-style: italic; }"
    page = (
        "\n".join(
            [
                "<!DOCTYPE html>",
                '<html lang="en"><head><meta charset="utf-8">',
                "<title>storymm comparison</title>",
                f"<style>{css}</style></head><body>",
                "<h1>storymm comparison</h1>",
                f"<p>Generated {html.escape(generated)}. {html.escape(note)}</p>",
                f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>",
                *body,
                "</tbody>\n</table>",
                "<h2>Sources</h2>",
                "<ul>",
                *[f"<li>{html.escape(n)}: <code>{html.escape(s)}</code></li>" for n, s in zip(names, sources)],
                "</ul>",
                "</body></html>",
            ]
        )
        + "\n"
    )
    return "\n".join(md), page


def compare(
    sources: list[str],
    out_uri: str,
    *,
    names: list[str] | None = None,
    data_uri: str | None = None,
    split: str = "test",
    evaluate_fn=None,
) -> dict:
    """Write ``compare.md``, ``compare.html`` and ``compare.json`` under ``out_uri``; returns the json dict."""
    loaded = load_sources(sources, out_uri, names=names, data_uri=data_uri, split=split, evaluate_fn=evaluate_fn)
    column_names = [name for name, _, _ in loaded]
    shown = [source for _, source, _ in loaded]
    rows = comparison_rows([report for _, _, report in loaded])
    md, page = render(column_names, rows, shown)
    result = to_jsonable(
        {
            "names": column_names,
            "sources": shown,
            "rows": rows,
            "files": {k: storage.join(storage.redact(out_uri), f"compare.{k}") for k in ("md", "html", "json")},
        }
    )
    storage.write_text(storage.join(out_uri, "compare.md"), md)
    storage.write_text(storage.join(out_uri, "compare.html"), page)
    storage.write_text(storage.join(out_uri, "compare.json"), json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    result["markdown"] = md
    return result
