"""Pages checked as a reader sees them: a screenshot in Debian's headless Chromium (skipped, loudly,
where it is not installed) and measures of what it shows."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(page: Path, png: Path, height: int) -> np.ndarray:
    """``page`` rendered 1200 pixels wide and ``height`` high, as ``[height, 1200, 3]`` int16."""
    binary = _chromium()
    if binary is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y --no-install-recommends chromium)")
    profile = png.parent / f"{png.stem}-profile"
    done = subprocess.run(
        [
            binary,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            f"--window-size=1200,{height}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert png.exists(), f"chromium wrote no screenshot (rc {done.returncode}):\n{done.stderr[-3000:]}"
    return np.asarray(Image.open(png).convert("RGB")).astype(np.int16)


def colourful(pixels) -> float:
    """Fraction of clearly coloured pixels (channel spread > 60): plots and frames, not text/tables."""
    return float(((pixels.max(axis=-1) - pixels.min(axis=-1)) > 60).mean())


def non_white(pixels) -> float:
    return float((pixels.min(axis=-1) < 200).mean())


def table_header(pixels) -> float:
    """Fraction of pixels in the table headers' background colour (#f2f2f2 in the pages' CSS)."""
    return float((pixels == 242).all(axis=-1).mean())
