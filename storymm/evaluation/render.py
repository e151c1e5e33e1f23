"""One place that turns numbers into pages, shared by the report, ``compare`` and ``nightly``:
the number format, escaping, Markdown/HTML tables, the page style, strict-JSON values and the
matplotlib helpers (headless, thread-safe figures; images as ``[H,W,3]`` uint8)."""

from __future__ import annotations

import html
import io
import math
from typing import Any

import numpy as np


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v == 0:
            return "0"
        if abs(v) >= 1e5 or abs(v) < 1e-4:
            return f"{v:.3e}"
        return f"{v:.4g}" if abs(v) < 1 else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(value)


def is_finite_number(value: Any) -> bool:
    """A real, finite number (not a bool, None, NaN or inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def escaped(value: Any) -> str:
    """A value as HTML text: formatted with :func:`fmt`, then escaped."""
    return html.escape(fmt(value))


def md_cell(value: Any) -> str:
    text = html.escape(fmt(value))
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def render_table(rows: list[dict], columns: list[str]) -> tuple[str, str]:
    """A comparison table as ``(markdown, html)``; missing cells show ``—``, all text escaped."""
    md_lines = [
        "| " + " | ".join(md_cell(c) for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        md_lines.append("| " + " | ".join(md_cell(row.get(c)) for c in columns) + " |")
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(fmt(row.get(c)))}</td>" for c in columns) + "</tr>" for row in rows
    )
    table_html = f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"
    return "\n".join(md_lines) + "\n", table_html


def to_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None  # strict JSON has no NaN/inf
    if value is None or isinstance(value, str):
        return value
    if hasattr(value, "tolist"):
        return to_jsonable(value.tolist())
    return str(value)


CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; line-height: 1.4; padding: 0 1em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
img { max-width: 100%; border: 1px solid #ddd; }
.meta td:first-child { font-weight: 600; }
"""


def image_uint8(img: Any) -> np.ndarray:
    """One image as ``[H,W,3]`` uint8 from uint8 HWC arrays or float CHW/HWC tensors in [0,1]."""
    try:
        import torch

        if isinstance(img, torch.Tensor):
            is_tensor = True
            img = img.detach().to("cpu")
            img = img.float().numpy() if img.dtype != torch.uint8 else img.numpy()
        else:
            is_tensor = False
    except ImportError:  # pragma: no cover - torch is a dependency
        is_tensor = False
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3:
        raise ValueError(f"an image must be [3,H,W] or [H,W,3], got shape {arr.shape}")
    channels_first = arr.shape[0] in (1, 3) and (is_tensor or arr.shape[-1] not in (1, 3))
    if channels_first:
        arr = np.moveaxis(arr, 0, -1)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.dtype == np.uint8:
        return arr
    return (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def images_uint8(images: Any) -> list[np.ndarray]:
    if isinstance(images, (list, tuple)):
        return [image_uint8(x) for x in images]
    arr = images
    n = arr.shape[0]
    return [image_uint8(arr[i]) for i in range(n)]


def new_figure(**kwargs):
    # A bare Figure renders with the Agg canvas, whatever pyplot's backend is, and leaves no global
    # state behind (no pyplot figure manager), so it is safe on headless workers and in threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def plain_text(text: Any) -> str:
    """Text for matplotlib drawn literally (a ``$`` would otherwise start mathtext)."""
    return str(text).replace("$", r"\$")


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
