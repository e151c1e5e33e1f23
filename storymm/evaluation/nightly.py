"""Nightly evaluation: score the latest checkpoint of each tracked run, keep a history, raise alarms.

``storymm nightly --runs RUN_URI… --data DATA_URI --reports REPORTS_URI [--tolerance F] [--date D]``
writes, under ``REPORTS_URI/nightly/`` (a local folder or ``s3://``):

- ``<date>/<run-name>/``: the evaluation report of each run (``report.json``, ``report.html``, …);
  ``run-name`` is the last path component of the run URI (``-2``, ``-3`` appended on a clash),
- ``<date>/night.json``: every run's status (``ok`` / ``failed`` with the redacted error), checkpoint
  step, metrics, floors, the night it was compared with and the metrics that regressed; written
  last, so its presence means the night is complete,
- ``index.json``, ``index.md``, ``index.html``: every night, newest first, with per-run status, and
  ``trends/<metric>.png``: one plot per metric across nights (embedded in ``index.html``, so the
  page is self-contained; ``index.md`` points at the PNGs beside it).

The index is rebuilt from the ``night.json`` files, so rerunning a date replaces that night (its
folder is cleared first) and the index keeps one entry per date.

Each run is compared with its previous night: the latest earlier date on which the same run (by
URI) was evaluated successfully. A metric regressed when it is worse, in its direction
(:data:`storymm.evaluation.metrics.HIGHER_IS_BETTER`), by more than ``max(absolute, relative * |previous|)``
from the tolerance file (or became non-finite). Exit codes: :data:`EXIT_OK`, :data:`EXIT_REGRESSION`,
:data:`EXIT_FAILED` (an evaluation failed; takes precedence over a regression, both are printed).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from storymm import storage
from storymm.evaluation.metrics import CONTROL_METRICS, HIGHER_IS_BETTER
from storymm.evaluation.render import (
    CSS,
    escaped,
    figure_png,
    fmt,
    is_finite_number,
    md_cell,
    new_figure,
    plain_text,
    to_jsonable,
)

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_REGRESSION = 3
EXIT_FAILED = 4

NIGHTLY_DIR = "nightly"
NIGHT_FILE = "night.json"
TRENDS_DIR = "trends"
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

#: Metrics that describe the data or serve as a reference, not the model's quality: not compared.
DEFAULT_IGNORE = tuple(sorted(CONTROL_METRICS))
DEFAULT_RELATIVE = 0.05
DEFAULT_ABSOLUTE = 0.0


# ------------------------------------------------------------------------------- tolerances


@dataclass(frozen=True)
class Tolerance:
    relative: float = DEFAULT_RELATIVE
    absolute: float = DEFAULT_ABSOLUTE

    def allowed(self, previous: float) -> float:
        return max(self.absolute, self.relative * abs(previous))


@dataclass
class Tolerances:
    """``default`` for every metric, per-metric overrides, metrics never compared, extra directions."""

    default: Tolerance = field(default_factory=Tolerance)
    metrics: dict[str, Tolerance] = field(default_factory=dict)
    ignore: frozenset[str] = frozenset(DEFAULT_IGNORE)
    directions: dict[str, bool] = field(default_factory=dict)

    def for_metric(self, name: str) -> Tolerance:
        return self.metrics.get(name, self.default)

    def higher_is_better(self, name: str) -> bool | None:
        return self.directions.get(name, HIGHER_IS_BETTER.get(name))

    def as_dict(self) -> dict:
        return {
            "default": {"relative": self.default.relative, "absolute": self.default.absolute},
            "metrics": {k: {"relative": v.relative, "absolute": v.absolute} for k, v in sorted(self.metrics.items())},
            "ignore": sorted(self.ignore),
        }


def _tolerance(value: Any, where: str, base: Tolerance) -> tuple[Tolerance, bool | None]:
    if value is None:
        return base, None
    if not isinstance(value, dict):
        raise ValueError(f"tolerance {where}: expected a mapping like {{relative: 0.05, absolute: 0.0}}")
    unknown = set(value) - {"relative", "absolute", "higher_is_better"}
    if unknown:
        raise ValueError(f"tolerance {where}.{sorted(unknown)[0]}: unknown key (relative, absolute, higher_is_better)")
    numbers = {}
    for key in ("relative", "absolute"):
        if key in value:
            number = value[key]
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not number >= 0:
                raise ValueError(f"tolerance {where}.{key}: expected a number >= 0, got {number!r}")
            numbers[key] = float(number)
    direction = value.get("higher_is_better")
    if direction is not None and not isinstance(direction, bool):
        raise ValueError(f"tolerance {where}.higher_is_better: expected true or false, got {direction!r}")
    return Tolerance(numbers.get("relative", base.relative), numbers.get("absolute", base.absolute)), direction


def parse_tolerances(data: Any) -> Tolerances:
    """Tolerances from the YAML structure ``{default: {...}, metrics: {name: {...}}, ignore: [...]}``.

    A metric's entry overrides only the keys it names (the rest come from ``default``).
    """
    if data is None:
        return Tolerances()
    if not isinstance(data, dict):
        raise ValueError("tolerance file: expected a mapping with default / metrics / ignore")
    unknown = set(data) - {"default", "metrics", "ignore"}
    if unknown:
        raise ValueError(f"tolerance {sorted(unknown)[0]}: unknown key (default, metrics, ignore)")
    default, _ = _tolerance(data.get("default"), "default", Tolerance())
    metrics: dict[str, Tolerance] = {}
    directions: dict[str, bool] = {}
    per_metric = data.get("metrics") or {}
    if not isinstance(per_metric, dict):
        raise ValueError("tolerance metrics: expected a mapping of metric name to {relative, absolute}")
    for name, value in per_metric.items():
        metrics[str(name)], direction = _tolerance(value, f"metrics.{name}", default)
        if direction is not None:
            directions[str(name)] = direction
    ignore = data.get("ignore", list(DEFAULT_IGNORE))
    if ignore is None:
        ignore = []
    if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
        raise ValueError("tolerance ignore: expected a list of metric names")
    return Tolerances(default, metrics, frozenset(ignore), directions)


def load_tolerances(uri: str | None) -> Tolerances:
    if uri is None:
        return Tolerances()
    try:
        data = yaml.safe_load(storage.read_text(uri))
    except yaml.YAMLError as err:
        raise ValueError(f"tolerance file {storage.redact(uri)} is not valid YAML: {err}") from None
    return parse_tolerances(data)


# ------------------------------------------------------------------------------- comparison


def compare_metrics(previous: dict, current: dict, tolerances: Tolerances) -> list[dict]:
    """The metrics of ``current`` worse than ``previous`` beyond tolerance (in metric order)."""
    regressions = []
    for name, before in previous.items():
        if name in tolerances.ignore or not is_finite_number(before):
            continue
        higher = tolerances.higher_is_better(name)
        if higher is None:
            continue  # direction unknown: never an alarm
        after = current.get(name)
        tol = tolerances.for_metric(name)
        entry = {
            "metric": name,
            "previous": before,
            "current": after,
            "higher_is_better": higher,
            "allowed": tol.allowed(before),
        }
        if not is_finite_number(after):
            if name in current:  # became NaN/inf (stored as null): a regression
                regressions.append({**entry, "change": None, "relative_change": None})
            continue
        worse = (before - after) if higher else (after - before)
        if worse > 0 and worse > tol.allowed(before):
            change = after - before
            entry.update(change=change, relative_change=(change / abs(before)) if before else None)
            regressions.append(entry)
    return regressions


def regression_line(name: str, regressions: list[dict]) -> str:
    """``REGRESSION: <run>: bleu 0.41 -> 0.3 (-26.8%), image_l1 …``"""
    parts = []
    for r in regressions:
        rel = r.get("relative_change")
        pct = f" ({rel * 100:+.1f}%)" if rel is not None else ""
        shown = [fmt(v) if is_finite_number(v) else "n/a" for v in (r["previous"], r["current"])]
        parts.append(f"{r['metric']} {shown[0]} -> {shown[1]}{pct}")
    return f"REGRESSION: {name}: " + ", ".join(parts)


# ------------------------------------------------------------------------------- the night


def today_utc() -> str:
    return _dt.datetime.now(_dt.UTC).date().isoformat()


def check_date(text: str) -> str:
    if not _DATE.match(str(text)):
        raise ValueError(f"--date expects YYYY-MM-DD, got {text!r}")
    try:
        return _dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise ValueError(f"--date expects a real calendar date (YYYY-MM-DD), got {text!r}") from None


def run_names(run_uris: list[str]) -> list[str]:
    """Folder names for the runs: last path component, made filesystem-safe and unique."""
    bases = [storage.safe_name(storage.basename(storage.redact(uri))) for uri in run_uris]
    return storage.unique_names(bases, reserved=(NIGHT_FILE, TRENDS_DIR))


def _safe_error(err: BaseException) -> str:
    """The error as one redacted string, with any credential from the environment masked."""
    text = storage.redact(f"{type(err).__name__}: {err}")
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(var)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "REDACTED")
    return text


def nightly_root(reports_uri: str) -> str:
    return storage.join(reports_uri, NIGHTLY_DIR)


def read_nights(reports_uri: str) -> list[dict]:
    """Every complete night under ``REPORTS_URI/nightly`` (those with a night.json), oldest first."""
    root = nightly_root(reports_uri)
    nights = []
    for name in storage.list_dirs(root):
        if not _DATE.match(name):
            continue
        uri = storage.join(root, name, NIGHT_FILE)
        try:
            nights.append(json.loads(storage.read_text(uri)))
        except FileNotFoundError:
            log.warning("night %s has no %s (interrupted?): left out of the index", name, NIGHT_FILE)
        except json.JSONDecodeError as err:
            log.warning("night %s: unreadable %s (%s): left out of the index", name, NIGHT_FILE, err)
    return sorted(nights, key=lambda n: n["date"])


def previous_result(nights: list[dict], date: str, run: str) -> tuple[str, dict] | None:
    """``(date, entry)`` of the latest night before ``date`` on which ``run`` was evaluated ok."""
    for night in sorted(nights, key=lambda n: n["date"], reverse=True):
        if night["date"] >= date:
            continue
        for entry in night.get("runs", []):
            if entry.get("run") == run and entry.get("status") == "ok":
                return night["date"], entry
    return None


def run_nightly(
    run_uris: list[str],
    data_uri: str,
    reports_uri: str,
    *,
    tolerance_uri: str | None = None,
    date: str | None = None,
    split: str = "test",
    evaluate_fn=None,
) -> dict:
    """Evaluate every run for one night, write the night and the index; returns the night dict.

    The night dict carries ``exit_code`` and ``lines`` (what the command prints).
    """
    if not run_uris:
        raise ValueError("nightly needs at least one run URI (--runs)")
    if evaluate_fn is None:
        from storymm.evaluation.evaluate import evaluate as evaluate_fn
    date = check_date(date) if date else today_utc()
    tolerances = load_tolerances(tolerance_uri)
    root = nightly_root(reports_uri)
    night_uri = storage.join(root, date)
    history = read_nights(reports_uri)
    storage.delete(night_uri)  # rerunning a date replaces it

    entries = []
    for run_uri, name in zip(run_uris, run_names(run_uris)):
        shown = storage.redact(run_uri)
        entry: dict[str, Any] = {
            "name": name,
            "run": shown,
            "status": "ok",
            "error": None,
            "step": None,
            "report": f"{name}/report.html",
            "previous": None,
            "regressions": [],
        }
        log.info("nightly %s: evaluating %s", date, shown)
        try:
            report = evaluate_fn(run_uri, data_uri, split, storage.join(night_uri, name), progress=False)
            entry.update(
                step=report.get("step"),
                windows=report.get("windows"),
                metrics=report.get("metrics") or {},
                floors=report.get("floors") or {},
                verdict=report.get("verdict"),
            )
        except Exception as err:  # recorded, never skipped
            log.error("nightly %s: evaluating %s failed: %s", date, shown, _safe_error(err))
            entry.update(status="failed", error=_safe_error(err), report=None)
        if entry["status"] == "ok":
            found = previous_result(history, date, shown)
            if found is not None:
                prev_date, prev = found
                entry["previous"] = {"date": prev_date, "step": prev.get("step")}
                entry["regressions"] = compare_metrics(prev.get("metrics") or {}, entry["metrics"], tolerances)
        entries.append(entry)

    failed = [e for e in entries if e["status"] == "failed"]
    regressed = [e for e in entries if e["regressions"]]
    exit_code = EXIT_FAILED if failed else EXIT_REGRESSION if regressed else EXIT_OK
    lines = []
    for e in entries:
        if e["status"] == "ok":
            vs = f", compared with {e['previous']['date']}" if e["previous"] else ", no earlier night to compare"
            lines.append(f"ok: {e['name']}: step {e['step']}{vs}")
    lines += [regression_line(e["name"], e["regressions"]) for e in regressed]
    lines += [f"FAILED: {e['name']}: {e['error']}" for e in failed]
    night = {
        "date": date,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "data": storage.redact(data_uri),
        "split": split,
        "status": "failed" if failed else "regression" if regressed else "ok",
        "exit_code": exit_code,
        "tolerances": tolerances.as_dict(),
        "runs": entries,
    }
    night = to_jsonable(night)
    storage.write_text(storage.join(night_uri, NIGHT_FILE), json.dumps(night, indent=2, ensure_ascii=False) + "\n")
    nights = [n for n in history if n["date"] != date] + [night]
    write_index(reports_uri, nights)
    night["lines"] = lines + [f"index: {storage.redact(storage.join(root, 'index.html'))}"]
    return night


# ------------------------------------------------------------------------------- the index


def _metric_order(nights: list[dict]) -> list[str]:
    seen: list[str] = []
    for night in nights:
        for entry in night.get("runs", []):
            for name, value in (entry.get("metrics") or {}).items():
                if name not in seen and (is_finite_number(value) or value is None):
                    seen.append(name)
    known = [m for m in HIGHER_IS_BETTER if m in seen]
    return known + [m for m in seen if m not in known]


def _floor_order(nights: list[dict]) -> list[str]:
    """Every floor any run reported, in first-seen order (shown beside the metrics, never compared:
    a floor is a property of the data, not of the model)."""
    seen: list[str] = []
    for night in nights:
        for entry in night.get("runs", []):
            seen += [name for name in (entry.get("floors") or {}) if name not in seen]
    return seen


def plot_trend(metric: str, nights: list[dict]) -> bytes | None:
    """PNG: one line per run, the metric's value on each night the run was evaluated ok."""
    series: dict[str, tuple[list, list]] = {}
    for night in sorted(nights, key=lambda n: n["date"]):
        day = _dt.date.fromisoformat(night["date"])
        for entry in night.get("runs", []):
            value = (entry.get("metrics") or {}).get(metric)
            if entry.get("status") != "ok" or not is_finite_number(value):
                continue
            xs, ys = series.setdefault(entry["name"], ([], []))
            xs.append(day)
            ys.append(float(value))
    if not series:
        return None
    import matplotlib.dates as mdates

    fig = new_figure(figsize=(6.0, 3.2))
    ax = fig.subplots()
    for name, (xs, ys) in sorted(series.items()):
        ax.plot(xs, ys, marker="o", linewidth=1.4, label=plain_text(name))
    direction = HIGHER_IS_BETTER.get(metric)
    hint = "" if direction is None else " (higher is better)" if direction else " (lower is better)"
    ax.set_title(plain_text(metric + hint))
    days = sorted({d for xs, _ in series.values() for d in xs})
    if len(days) <= 10:  # one tick per night, never hours
        ax.set_xticks(days)
    else:
        ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=3, maxticks=10))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))
    if len(days) == 1:
        ax.set_xlim(days[0] - _dt.timedelta(days=1), days[0] + _dt.timedelta(days=1))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    return figure_png(fig)


_STATUS_STYLE = """
.ok { color: #17692e; font-weight: 600; } .failed { color: #b00020; font-weight: 600; }
.regression { color: #b35c00; font-weight: 600; } td.worse { background: #fde2e1; }
.trends img { width: 560px; margin: 4px; }
.scroll { overflow-x: auto; } td.error { min-width: 280px; max-width: 420px; color: #b00020; }
"""


def _regressed_names(entry: dict) -> set[str]:
    return {r["metric"] for r in entry.get("regressions") or []}


def _latest_html(nights: list[dict]) -> list[str]:
    if not nights:
        return ["<p>No night yet.</p>"]
    night = nights[0]
    runs = night.get("runs", [])
    counts = {
        "ok": sum(e.get("status") == "ok" and not e.get("regressions") for e in runs),
        "regression": sum(bool(e.get("regressions")) for e in runs),
        "failed": sum(e.get("status") == "failed" for e in runs),
    }
    status = str(night.get("status"))
    summary = ", ".join(f'<span class="{k}">{v} {k}</span>' for k, v in counts.items())
    return [
        f'<p><strong>Latest night {html.escape(night["date"])}: <span class="{html.escape(status)}">'
        f"{html.escape(status)}</span></strong> ({summary}).</p>"
    ]


def write_index(reports_uri: str, nights: list[dict]) -> dict:
    """Write ``index.json``, ``index.md``, ``index.html`` and ``trends/*.png``; returns index.json's dict."""
    root = nightly_root(reports_uri)
    nights = sorted(nights, key=lambda n: n["date"], reverse=True)
    metrics = _metric_order(nights)
    trends: dict[str, bytes] = {}
    for metric in metrics:
        png = plot_trend(metric, nights)
        if png is not None:
            trends[metric] = png
            storage.write_bytes(storage.join(root, TRENDS_DIR, f"{metric}.png"), png)

    index = {
        "updated": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "nights": [
            {
                "date": n["date"],
                "status": n.get("status"),
                "exit_code": n.get("exit_code"),
                "runs": [
                    {
                        k: e.get(k)
                        for k in (
                            "name",
                            "run",
                            "status",
                            "error",
                            "step",
                            "report",
                            "previous",
                            "metrics",
                            "floors",
                            "verdict",
                            "regressions",
                        )
                    }
                    for e in n.get("runs", [])
                ],
            }
            for n in nights
        ],
        "trends": {m: f"{TRENDS_DIR}/{m}.png" for m in trends},
    }
    index = to_jsonable(index)

    # ---- Markdown (images beside the page)
    md = ["# storymm nightly evaluation", "", f"Updated {index['updated']}. {len(nights)} night(s), newest first.", ""]
    floors = _floor_order(nights)
    columns = [
        "run",
        "status",
        "step",
        "report / error",
        "regressed",
        *metrics,
        *(f"floor: {f}" for f in floors),
        "verdict",
    ]
    for night in index["nights"]:
        md += [f"## {md_cell(night['date'])}: {md_cell(night['status'])}", ""]
        md.append("| " + " | ".join(md_cell(c) for c in columns) + " |")
        md.append("|" + "|".join("---" for _ in columns) + "|")
        for e in night["runs"]:
            bad = _regressed_names(e)
            cells = [md_cell(e["name"]), md_cell(e["status"]), md_cell(e["step"])]
            cells.append(f"[report]({night['date']}/{e['report']})" if e.get("report") else md_cell(e.get("error")))
            cells.append(md_cell(", ".join(sorted(bad)) or None))
            cells += [
                ("**" + md_cell(v) + "**") if m in bad else md_cell(v)
                for m, v in ((m, (e.get("metrics") or {}).get(m)) for m in metrics)
            ]
            cells += [md_cell((e.get("floors") or {}).get(f)) for f in floors] + [md_cell(e.get("verdict"))]
            md.append("| " + " | ".join(cells) + " |")
        md.append("")
    md += ["## Trends", ""]
    md += [f"![{md_cell(m)}]({TRENDS_DIR}/{m}.png)" for m in trends] or ["No successful evaluation yet."]
    md.append("")

    # ---- HTML (self-contained: trend plots embedded)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)

    def night_table(night: dict) -> list[str]:
        rows = [f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>']
        for e in night["runs"]:
            bad = _regressed_names(e)
            cells = [
                f'<td title="{html.escape(str(e["run"]))}">{html.escape(str(e["name"]))}</td>',
                f'<td class="{html.escape(str(e["status"]))}">{html.escape(str(e["status"]))}</td>',
                f"<td>{escaped(e['step'])}</td>",
            ]
            if e.get("report"):
                href = html.escape(f"{night['date']}/{e['report']}", quote=True)
                cells.append(f'<td><a href="{href}">report</a></td>')
            else:
                cells.append(f'<td class="error">{html.escape(str(e.get("error") or "—"))}</td>')
            cells.append(f"<td>{html.escape(', '.join(sorted(bad)) or '—')}</td>")
            for m in metrics:
                value = (e.get("metrics") or {}).get(m)
                cells.append(f'<td class="worse">{escaped(value)}</td>' if m in bad else f"<td>{escaped(value)}</td>")
            cells += [f'<td class="floor">{escaped((e.get("floors") or {}).get(f))}</td>' for f in floors]
            cells.append(f"<td>{html.escape(str(e.get('verdict') or '—'))}</td>")
            rows.append("<tr>" + "".join(cells) + "</tr>")
        rows.append("</tbody>\n</table></div>")
        return rows

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>storymm nightly evaluation</title>",
        f"<style>{CSS}{_STATUS_STYLE}</style></head><body>",
        "<h1>storymm nightly evaluation</h1>",
        f"<p>Updated {html.escape(index['updated'])}. {len(nights)} night(s), newest first. "
        "Cells shaded red regressed against the run's previous night beyond tolerance.</p>",
        *_latest_html(index["nights"]),
    ]
    if index["nights"]:  # the newest night's table right under its summary, above the trends
        parts += night_table(index["nights"][0])
    parts += ["<h2>Trends</h2>", '<div class="trends">']
    for metric, png in trends.items():
        b64 = base64.b64encode(png).decode("ascii")
        parts.append(f'<img alt="{html.escape(metric)} trend" src="data:image/png;base64,{b64}">')
    if not trends:
        parts.append("<p>No successful evaluation yet.</p>")
    parts.append("</div>")
    parts.append("<h2>Every night</h2>")
    for night in index["nights"]:
        status = str(night["status"])
        parts.append(
            f'<h3>{html.escape(night["date"])}: <span class="{html.escape(status)}">{html.escape(status)}</span></h3>'
        )
        parts += night_table(night)
    parts.append("</body></html>")

    storage.write_text(storage.join(root, "index.md"), "\n".join(md))
    storage.write_text(storage.join(root, "index.html"), "\n".join(parts) + "\n")
    storage.write_text(storage.join(root, "index.json"), json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    return index
