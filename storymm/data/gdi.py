"""Parse StoryReasoning's grounded story text into per-frame sentences and tag features.

A story holds one ``<gdi imageN> … </gdi>`` block per frame. Inside, ``<gdo ids>`` marks entities,
``<gda ids>`` actions and ``<gdl ids>`` locations. The sentence is the text with every tag
stripped; the tagged spans become structured features. Parsing is a small regular-language scan
(not an HTML parser): the tags never nest in ways an HTML tree would help with, and the scan is
what makes prepare fast and gives exact reject reasons.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_GDI_OPEN = re.compile(r"<gdi\s+image\s*(\d+)\s*>", re.IGNORECASE)
_GDI_CLOSE = re.compile(r"</gdi\s*>", re.IGNORECASE)
_SPAN = re.compile(r"<(gdo|gda|gdl)\b([^>]*)>(.*?)</\1\s*>", re.IGNORECASE | re.DOTALL)
_ANY_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_SPACE = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,!?;:])")


class StoryParseError(ValueError):
    """The story text cannot be aligned with its frames; ``reason`` is the manifest key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class FrameText:
    sentence: str
    objects: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    locations: list[str] = field(default_factory=list)


def clean_text(text: str) -> str:
    text = _ANY_TAG.sub(" ", text)
    text = _SPACE.sub(" ", text).strip()
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


def _frame_text(body: str) -> FrameText:
    frame = FrameText(sentence=clean_text(body))
    for kind, _ids, span in _SPAN.findall(body):
        words = clean_text(span)
        if not words:
            continue
        {"gdo": frame.objects, "gda": frame.actions, "gdl": frame.locations}[kind.lower()].append(words)
    return frame


def parse_story(story: str | None) -> dict[int, FrameText]:
    """Map 1-based image numbers to their frame text.

    Raises :class:`StoryParseError` with reason ``no_gdi_tags`` or ``unclosed_gdi_tag``. Several
    blocks for the same image are joined, as the real data occasionally splits one frame's text.
    """
    if not story or not _GDI_OPEN.search(story):
        raise StoryParseError("no_gdi_tags")
    bodies: dict[int, list[str]] = {}
    position = 0
    while True:
        opening = _GDI_OPEN.search(story, position)
        if opening is None:
            break
        closing = _GDI_CLOSE.search(story, opening.end())
        next_open = _GDI_OPEN.search(story, opening.end())
        if closing is None or (next_open is not None and next_open.start() < closing.start()):
            raise StoryParseError("unclosed_gdi_tag", f"image{opening.group(1)}")
        bodies.setdefault(int(opening.group(1)), []).append(story[opening.end() : closing.start()])
        position = closing.end()
    return {number: _frame_text(" ".join(parts)) for number, parts in bodies.items()}


def frame_texts(story: str | None, n_frames: int) -> list[FrameText]:
    """One :class:`FrameText` per frame, in order; ``fewer_sentences_than_frames`` otherwise."""
    parsed = parse_story(story)
    missing = [n for n in range(1, n_frames + 1) if n not in parsed or not parsed[n].sentence]
    if missing:
        raise StoryParseError("fewer_sentences_than_frames", f"{n_frames} frames, no text for image(s) {missing[:5]}")
    return [parsed[n] for n in range(1, n_frames + 1)]
