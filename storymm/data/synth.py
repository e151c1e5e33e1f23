"""Seeded synthetic stories in exactly the StoryReasoning source schema.

Why they exist: the demo, the tests and the benchmarks need data that is small, free to make, and
*learnable by construction*, so that a model that does not learn is caught at once (DESIGN §1-§2).

What a story is: two shots, A and B, edited like film dialogue. Each shot has its own background
(colour, optionally a gradient or stripes) and its own coloured shape moving with constant velocity
and bouncing off the borders. Time is global: the shape of shot A keeps moving while B is on screen.
Frames cut between the shots (mostly A-B-A-B), so the closest input to the next frame is usually two
frames back and copying the last frame is a weak baseline, as in the real data where 94% of
consecutive frames are cuts.

Two scenes (``synthesize(scene=...)``, ``storymm synth --scene``): ``shapes`` (above) and ``pan``,
where each shot is a camera window panning with constant velocity (and zooming mildly) over a large
procedurally textured world with a few static objects (``render_pan_story``). In ``pan`` no input
frame equals the next one even within a shot, so a model must predict the motion to beat the best
input frame (DESIGN §2, the oracle bar).

What the text says: one ``<gdi imageN>`` block per frame with one sentence naming the shape, its
direction of motion and the 3x3 grid cell of its centre, all computed from what was drawn, so the
sentence is predictable from the images. ``chain_of_thought`` carries the real dataset's markdown
tables with bounding boxes in source pixels.

Determinism: every story draws from its own generator seeded by ``(seed, index)``, PNGs are encoded by
Pillow without metadata and parquet files carry no timestamps, so the same arguments give
byte-identical files, and story ``i`` is the same story whatever the number of stories.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from storymm import storage
from storymm.progress import Progress

SOURCE_SCHEMA = pa.schema(
    [
        ("story_id", pa.string()),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("frame_count", pa.int32()),
        ("chain_of_thought", pa.string()),
        ("story", pa.string()),
    ]
)

# Saturated shape colours and muted background colours: a shape is only ever put on a background at
# least MIN_CONTRAST away (RGB distance), which stays true after the texture shifts the background by
# at most TEXTURE_MAX_SHIFT per channel, so the shape is always clearly visible and never shares an
# exact pixel value with its background.
SHAPE_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (40, 80, 230),
    "yellow": (245, 220, 30),
    "orange": (255, 140, 0),
    "purple": (150, 50, 200),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "pink": (255, 100, 180),
    "cyan": (0, 220, 230),
}
BACKGROUND_COLOURS = {
    "blue": (60, 90, 160),
    "grey": (128, 128, 128),
    "green": (70, 120, 70),
    "sand": (200, 180, 130),
    "brown": (120, 80, 50),
    "navy": (30, 35, 80),
    "teal": (40, 120, 120),
    "plum": (110, 60, 100),
    "olive": (120, 120, 50),
    "slate": (80, 90, 100),
}
PLACES = ("field", "room", "wall", "sky", "street", "hall", "garden", "stage")
TEXTURES = ("plain", "horizontal gradient", "vertical gradient", "vertical stripes", "horizontal stripes")
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
VERBS = ("moves", "drifts", "slides", "glides")
MIN_CONTRAST = 140.0
MIN_BACKGROUND_GAP = 80.0  # the two shots must look different, or a cut is not a cut
TEXTURE_MAX_SHIFT = 35

# Per story, how the editor cuts: strict alternation, alternation with an occasional held shot, or
# pairs. Weighted towards alternation so "two frames back" is the usual best input.
CUT_PATTERNS = ("alternate", "alternate_with_holds", "pairs")
CUT_WEIGHTS = (0.5, 0.35, 0.15)
HOLD_PROBABILITY = 0.2

# 3x3 grid of the shape's centre: (row, column) -> phrase.
LOCATIONS = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left side",
    (1, 1): "middle",
    (1, 2): "right side",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}

# The one tan(22.5 deg) that splits the compass into 8 sectors.
_SECTOR = math.tan(math.radians(22.5))


def _distance(a, b) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


def location_phrase(cx: float, cy: float, width: int, height: int) -> str:
    """The 3x3 grid cell of a point, as words ("top left", "middle", ...)."""
    col = min(2, int(3 * cx / width))
    row = min(2, int(3 * cy / height))
    return LOCATIONS[(row, col)]


def direction_phrase(vx: float, vy: float) -> str:
    """Compass direction of a velocity given in image fractions per step (y grows downwards)."""
    parts = []
    if abs(vy) > _SECTOR * abs(vx):
        parts.append("down" if vy > 0 else "up")
    if abs(vx) > _SECTOR * abs(vy):
        parts.append("right" if vx > 0 else "left")
    return " and ".join(parts)


def _render_background(rng: np.random.Generator, base, texture: str, width: int, height: int) -> np.ndarray:
    """An (H, W, 3) uint8 background: the base colour, shaded by a gradient or stripes."""
    sign = 1 if rng.random() < 0.5 else -1
    shift = sign * int(rng.integers(15, TEXTURE_MAX_SHIFT + 1))
    base = np.asarray(base, dtype=np.float32)
    if texture == "horizontal gradient":
        ramp = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    elif texture == "vertical gradient":
        ramp = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    elif texture.endswith("stripes"):
        half = int(rng.integers(5, 11))  # stripe width in pixels
        if texture == "vertical stripes":
            ramp = ((np.arange(width) // half) % 2).astype(np.float32)[None, :]
        else:
            ramp = ((np.arange(height) // half) % 2).astype(np.float32)[:, None]
    else:
        ramp = np.zeros((1, 1), dtype=np.float32)
    ramp = np.broadcast_to(ramp, (height, width))
    pixels = base[None, None, :] + shift * ramp[:, :, None]
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], colour) -> None:
    """Draw a shape that touches all four sides of its inclusive pixel box (so box == bounding box)."""
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    elif kind == "triangle":
        draw.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=colour)
    elif kind == "diamond":
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=colour)
    elif kind == "cross":
        arm = max(1, (x2 - x1 + 1) // 6)
        draw.rectangle((cx - arm, y1, cx + arm, y2), fill=colour)
        draw.rectangle((x1, cy - arm, x2, cy + arm), fill=colour)
    else:
        raise ValueError(f"unknown shape {kind!r}")


def _cut_sequence(rng: np.random.Generator, n_frames: int) -> list[int]:
    """Which shot (0 = A, 1 = B) each frame shows; always starts on A."""
    pattern = CUT_PATTERNS[int(rng.choice(len(CUT_PATTERNS), p=CUT_WEIGHTS))]
    shots = [0]
    for t in range(1, n_frames):
        if pattern == "pairs":
            shots.append((t // 2) % 2)
        elif pattern == "alternate_with_holds" and rng.random() < HOLD_PROBABILITY:
            shots.append(shots[-1])
        else:
            shots.append(1 - shots[-1])
    if n_frames >= 2 and 1 not in shots:
        shots[-1] = 1  # a two-shot story shows both shots
    return shots


def _make_shot(rng: np.random.Generator, number: int, width: int, height: int, taken: dict) -> dict:
    """One shot's background and moving shape, chosen so it differs from the shot already made."""
    bg_names = [
        name
        for name, rgb in BACKGROUND_COLOURS.items()
        if all(_distance(rgb, BACKGROUND_COLOURS[other]) >= MIN_BACKGROUND_GAP for other in taken.get("bg", []))
    ]
    bg_colour = bg_names[int(rng.integers(len(bg_names)))]
    shape_names = [
        name
        for name, rgb in SHAPE_COLOURS.items()
        if name not in taken.get("colour", []) and _distance(rgb, BACKGROUND_COLOURS[bg_colour]) >= MIN_CONTRAST
    ]
    colour = shape_names[int(rng.integers(len(shape_names)))]
    kinds = [k for k in SHAPES if k not in taken.get("kind", [])]
    kind = kinds[int(rng.integers(len(kinds)))]
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    place = PLACES[int(rng.integers(len(PLACES)))]
    for key, value in (("bg", bg_colour), ("colour", colour), ("kind", kind)):
        taken.setdefault(key, []).append(value)

    size = int(round(height * rng.uniform(0.2, 0.3)))  # visible at 125x60: 12-18 px tall there
    # Velocity in image fractions per step, in one of 8 compass directions with a little jitter that
    # never leaves the sector, so the phrase is stable until a bounce flips a component.
    angle = math.radians(45 * int(rng.integers(8)) + rng.uniform(-12, 12))
    speed = rng.uniform(0.04, 0.08)
    half = (size - 1) / 2
    return {
        "number": number,
        "entity": "char1" if number == 1 else f"obj{number}",
        "setting": f"bg{number}",
        "bg_name": f"{bg_colour} {place}",
        "texture": texture,
        "background": _render_background(rng, BACKGROUND_COLOURS[bg_colour], texture, width, height),
        "colour": colour,
        "kind": kind,
        "size": size,
        "verb": VERBS[int(rng.integers(len(VERBS)))],
        "x": rng.uniform(half, width - 1 - half),
        "y": rng.uniform(half, height - 1 - half),
        "vx": math.cos(angle) * speed * width,
        "vy": math.sin(angle) * speed * height,
        "bounds": ((half, width - 1 - half), (half, height - 1 - half)),
    }


def _step(shot: dict) -> None:
    """Advance one time step with constant velocity, reflecting off the borders."""
    for pos, vel, (lo, hi) in (("x", "vx", shot["bounds"][0]), ("y", "vy", shot["bounds"][1])):
        value = shot[pos] + shot[vel]
        if value < lo:
            value, shot[vel] = 2 * lo - value, -shot[vel]
        elif value > hi:
            value, shot[vel] = 2 * hi - value, -shot[vel]
        shot[pos] = min(max(value, lo), hi)


def _a(phrase: str) -> str:
    return f"{'An' if phrase[0] in 'aeiou' else 'A'} {phrase}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_story(rng: np.random.Generator, index: int, n_frames: int) -> dict:
    """One source row (a plain dict in :data:`SOURCE_SCHEMA`) drawn from ``rng``."""
    story_id = f"synth-{index:08d}"
    width = int(rng.integers(160, 257))
    height = int(np.clip(round(width * rng.uniform(0.42, 0.58)), 80, 128))
    taken: dict = {}
    shots = [_make_shot(rng, 1, width, height, taken), _make_shot(rng, 2, width, height, taken)]
    sequence = _cut_sequence(rng, n_frames)

    images, sentences, sections = [], [], []
    for t, which in enumerate(sequence):
        if t > 0:
            for shot in shots:  # global time: the unseen shot moves too
                _step(shot)
        shot = shots[which]
        x1 = int(round(shot["x"] - (shot["size"] - 1) / 2))
        y1 = int(round(shot["y"] - (shot["size"] - 1) / 2))
        box = (x1, y1, x1 + shot["size"] - 1, y1 + shot["size"] - 1)

        image = Image.fromarray(shot["background"])
        _draw_shape(ImageDraw.Draw(image), shot["kind"], box, SHAPE_COLOURS[shot["colour"]])
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)  # fast; files stay small
        images.append({"bytes": buffer.getvalue(), "path": f"{story_id}/frame_{t + 1:02d}.png"})

        # Words from what was drawn: the box centre and the current velocity.
        where = location_phrase((box[0] + box[2] + 1) / 2, (box[1] + box[3] + 1) / 2, width, height)
        action = f"{shot['verb']} {direction_phrase(shot['vx'] / width, shot['vy'] / height)}"
        name = f"{shot['colour']} {shot['kind']}"
        ent, bg = shot["entity"], shot["setting"]
        place = "in the middle of" if where == "middle" else f"near the {where} of"
        sentences.append(
            f"<gdi image{t + 1}> The <gdo {ent}>{name}</gdo> <gda {ent}>{action}</gda> "
            f"{place} the <gdl {bg}>{shot['bg_name']}</gdl>. </gdi>"
        )

        heading, id_column = ("Characters", "Character ID") if shot["number"] == 1 else ("Objects", "Object ID")
        entity_table = f"### {heading}\n" + _table(
            [id_column, "Name", "Description", "Bounding Box"],
            [[ent, name, f"{_a(name)} about {shot['size']} pixels wide that {action}", ",".join(map(str, box))]],
        )
        look = (
            f"plain {shot['bg_name']}"
            if shot["texture"] == "plain"
            else (f"{shot['bg_name']} with a {shot['texture']} texture")
        )
        setting = "### Setting\n" + _table(["Setting ID", "Name", "Description"], [[bg, shot["bg_name"], _a(look)]])
        sections.append(f"## Image {t + 1}\n\n{entity_table}\n\n{setting}")

    return {
        "story_id": story_id,
        "images": images,
        "frame_count": n_frames,
        "chain_of_thought": "\n\n".join(sections) + "\n",
        "story": "\n".join(sentences),
    }


# ---- textured camera-pan scenes ---------------------------------------------------------------
# Each shot is a large procedurally textured world (multi-scale value noise between two colours, a
# stripes or checker pattern on top, a few static objects) seen through a camera window that pans with
# constant velocity and zooms mildly (constant rate). Copying an input frame is then never exact: the
# closest input (usually two frames back) is shifted by two steps of the pan, which a model can only
# undo by predicting the motion.
PATTERNS = ("vertical stripes", "horizontal stripes", "diagonal stripes", "checks", "no pattern")
PATTERN_WORDS = {
    "vertical stripes": "striped",
    "horizontal stripes": "banded",
    "diagonal stripes": "hatched",
    "checks": "checked",
    "no pattern": "mottled",
}
OBJECT_KINDS = ("box", "disc")
NOISE_OCTAVES = ((40.0, 1.0), (20.0, 0.6), (10.0, 0.4), (5.0, 0.25))  # (cell size in px, amplitude)
PAN_SPEED = (0.02, 0.04)  # view widths per step
ZOOM_RATE = (0.01, 0.02)  # relative scale change per step, when the shot zooms
ZOOM_PROBABILITY = 0.4


def _value_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W) float32 multi-scale value noise in about [-1, 1]: bilinearly upsampled random grids."""
    total = np.zeros((height, width), dtype=np.float32)
    norm = 0.0
    for cell, amplitude in NOISE_OCTAVES:
        gh, gw = int(height / cell) + 2, int(width / cell) + 2
        grid = rng.uniform(-1.0, 1.0, size=(gh, gw)).astype(np.float32)
        ys, xs = np.arange(height, dtype=np.float32) / cell, np.arange(width, dtype=np.float32) / cell
        total += amplitude * _bilinear(grid[:, :, None], ys, xs)[:, :, 0]
        norm += amplitude
    return total / norm * 1.8  # the sum of octaves rarely reaches its bound; stretch to use the range


def _bilinear(image: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """``image[ys][:, xs]`` at fractional, axis-aligned coordinates (separable bilinear, edges clamped)."""
    h, w = image.shape[:2]
    ys = np.clip(ys, 0, h - 1)
    xs = np.clip(xs, 0, w - 1)
    y0 = np.minimum(ys.astype(np.int64), h - 2) if h > 1 else np.zeros(len(ys), np.int64)
    x0 = np.minimum(xs.astype(np.int64), w - 2) if w > 1 else np.zeros(len(xs), np.int64)
    fy = (ys - y0)[:, None, None].astype(np.float32)
    fx = (xs - x0)[None, :, None].astype(np.float32)
    rows = image[y0] * (1 - fy) + image[np.minimum(y0 + 1, h - 1)] * fy
    return rows[:, x0] * (1 - fx) + rows[:, np.minimum(x0 + 1, w - 1)] * fx


def _pattern(rng: np.random.Generator, kind: str, height: int, width: int) -> np.ndarray:
    """(H, W) float32 in {-1, 1} (or zeros): the shot's stripes or checks."""
    period = float(rng.uniform(12, 26))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "vertical stripes":
        phase = xs
    elif kind == "horizontal stripes":
        phase = ys
    elif kind == "diagonal stripes":
        phase = (xs + ys) / math.sqrt(2)
    elif kind == "checks":
        return np.where(((xs // (period / 2)) + (ys // (period / 2))) % 2 == 0, 1.0, -1.0).astype(np.float32)
    else:
        return np.zeros((height, width), dtype=np.float32)
    return np.where((phase // (period / 2)) % 2 == 0, 1.0, -1.0).astype(np.float32)


def _make_pan_shot(
    rng: np.random.Generator, number: int, width: int, height: int, n_frames: int, taken: dict, next_object: list[int]
) -> dict:
    """One shot: its textured world (big enough for the whole trajectory), camera path and objects."""
    bg_names = [
        name
        for name, rgb in BACKGROUND_COLOURS.items()
        if all(_distance(rgb, BACKGROUND_COLOURS[other]) >= MIN_BACKGROUND_GAP for other in taken.get("bg", []))
    ]
    bg_colour = bg_names[int(rng.integers(len(bg_names)))]
    taken.setdefault("bg", []).append(bg_colour)
    pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
    place = PLACES[int(rng.integers(len(PLACES)))]

    angle = math.radians(45 * int(rng.integers(8)) + rng.uniform(-12, 12))
    speed = rng.uniform(*PAN_SPEED) * width
    vx, vy = math.cos(angle) * speed, math.sin(angle) * speed
    zoom = 0.0
    if rng.random() < ZOOM_PROBABILITY:
        zoom = float(rng.uniform(*ZOOM_RATE)) * (1 if rng.random() < 0.5 else -1)
    scale0 = float(rng.uniform(0.9, 1.1))  # world pixels per view pixel
    steps = max(1, n_frames - 1)
    max_scale = scale0 * max(1.0, (1 + zoom) ** steps)
    margin = 4
    world_w = int(math.ceil(width * max_scale + abs(vx) * steps)) + 2 * margin
    world_h = int(math.ceil(height * max_scale + abs(vy) * steps)) + 2 * margin
    # Centre of the view at t = 0, so that every frame of the trajectory stays inside the world.
    cx0 = margin + width * max_scale / 2 + (abs(vx) * steps if vx < 0 else 0.0)
    cy0 = margin + height * max_scale / 2 + (abs(vy) * steps if vy < 0 else 0.0)

    base = np.asarray(BACKGROUND_COLOURS[bg_colour], dtype=np.float32)
    other = np.clip(base + rng.uniform(-90, 90, size=3), 0, 255).astype(np.float32)
    mix = 0.5 + 0.5 * np.tanh(1.5 * _value_noise(rng, world_h, world_w))
    world = base[None, None] * (1 - mix[..., None]) + other[None, None] * mix[..., None]
    world += 28.0 * _pattern(rng, pattern, world_h, world_w)[..., None]
    world = Image.fromarray(np.clip(np.rint(world), 0, 255).astype(np.uint8))

    objects = []
    draw = ImageDraw.Draw(world)
    colours = [c for c, rgb in SHAPE_COLOURS.items() if _distance(rgb, base) >= MIN_CONTRAST * 0.75]
    for _ in range(min(len(colours), int(rng.integers(3, 6)))):
        colour = colours.pop(int(rng.integers(len(colours))))  # distinct within the shot
        kind = OBJECT_KINDS[int(rng.integers(len(OBJECT_KINDS)))]
        size = int(round(height * rng.uniform(0.18, 0.32)))
        x1, y1 = int(rng.integers(0, world_w - size)), int(rng.integers(0, world_h - size))
        box = (x1, y1, x1 + size - 1, y1 + size - 1)
        (draw.rectangle if kind == "box" else draw.ellipse)(box, fill=SHAPE_COLOURS[colour])
        next_object[0] += 1
        objects.append({"id": f"obj{next_object[0]}", "name": f"{colour} {kind}", "box": box})
    return {
        "number": number,
        "entity": f"char{number}",
        "setting": f"bg{number}",
        "bg_name": f"{PATTERN_WORDS[pattern]} {bg_colour} {place}",
        "pattern": pattern,
        "world": np.asarray(world, dtype=np.float32),
        "objects": objects,
        "cx0": cx0,
        "cy0": cy0,
        "vx": vx,
        "vy": vy,
        "scale0": scale0,
        "zoom": zoom,
        "verb": ("pans", "moves", "drifts", "glides")[int(rng.integers(4))],
    }


def _pan_view(shot: dict, t: int, width: int, height: int) -> tuple[np.ndarray, float, float, float]:
    """The shot's camera view at time ``t``: (H, W, 3) uint8 and the view's centre and scale."""
    scale = shot["scale0"] * (1 + shot["zoom"]) ** t
    cx, cy = shot["cx0"] + shot["vx"] * t, shot["cy0"] + shot["vy"] * t
    xs = cx + (np.arange(width, dtype=np.float64) - (width - 1) / 2) * scale
    ys = cy + (np.arange(height, dtype=np.float64) - (height - 1) / 2) * scale
    pixels = _bilinear(shot["world"], ys, xs)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), cx, cy, scale


def _visible_objects(shot: dict, cx: float, cy: float, scale: float, width: int, height: int) -> list[dict]:
    """Objects at least half inside the view, with their clipped box in view pixels, largest first."""
    out = []
    for obj in shot["objects"]:
        x1, y1, x2, y2 = obj["box"]
        vx1, vx2 = (x1 - cx) / scale + (width - 1) / 2, (x2 - cx) / scale + (width - 1) / 2
        vy1, vy2 = (y1 - cy) / scale + (height - 1) / 2, (y2 - cy) / scale + (height - 1) / 2
        full = (vx2 - vx1) * (vy2 - vy1)
        cx1, cx2 = max(vx1, 0.0), min(vx2, width - 1.0)
        cy1, cy2 = max(vy1, 0.0), min(vy2, height - 1.0)
        if cx2 <= cx1 or cy2 <= cy1 or (cx2 - cx1) * (cy2 - cy1) < 0.5 * full:
            continue
        box = tuple(int(round(v)) for v in (cx1, cy1, cx2, cy2))
        out.append({**obj, "view_box": box, "area": (cx2 - cx1) * (cy2 - cy1)})
    return sorted(out, key=lambda o: -o["area"])


def _camera_action(shot: dict) -> str:
    # The camera moving left makes the scene slide right; the words describe the camera.
    action = f"{shot['verb']} {direction_phrase(shot['vx'], shot['vy'])}"
    if shot["zoom"]:
        action += " and zooms " + ("out" if shot["zoom"] > 0 else "in")  # a larger scale sees more: out
    return action


def render_pan_story(rng: np.random.Generator, index: int, n_frames: int) -> dict:
    """One source row of the textured camera-pan scene (see the constants above)."""
    story_id = f"synth-{index:08d}"
    width = int(rng.integers(160, 257))
    height = int(np.clip(round(width * rng.uniform(0.42, 0.58)), 80, 128))
    taken: dict = {}
    next_object = [0]
    shots = [_make_pan_shot(rng, n, width, height, n_frames, taken, next_object) for n in (1, 2)]
    sequence = _cut_sequence(rng, n_frames)

    images, sentences, sections = [], [], []
    for t, which in enumerate(sequence):
        shot = shots[which]
        pixels, cx, cy, scale = _pan_view(shot, t, width, height)  # global time: the unseen camera moves too
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        images.append({"bytes": buffer.getvalue(), "path": f"{story_id}/frame_{t + 1:02d}.png"})

        ent, bg, action = shot["entity"], shot["setting"], _camera_action(shot)
        visible = _visible_objects(shot, cx, cy, scale, width, height)
        sentence = (
            f"<gdi image{t + 1}> The <gdo {ent}>camera</gdo> <gda {ent}>{action}</gda> "
            f"over the <gdl {bg}>{shot['bg_name']}</gdl>"
        )
        if visible:
            obj = visible[0]
            x1, y1, x2, y2 = obj["view_box"]
            where = location_phrase((x1 + x2 + 1) / 2, (y1 + y2 + 1) / 2, width, height)
            place = "in the middle" if where == "middle" else f"near the {where}"
            sentence += f" with a <gdo {obj['id']}>{obj['name']}</gdo> {place}"
        sentences.append(sentence + ". </gdi>")

        camera = "### Characters\n" + _table(
            ["Character ID", "Name", "Description", "Bounding Box"],
            [[ent, "camera", f"A camera that {action}", f"0,0,{width - 1},{height - 1}"]],
        )
        parts = [camera]
        if visible:
            parts.append(
                "### Objects\n"
                + _table(
                    ["Object ID", "Name", "Description", "Bounding Box"],
                    [
                        [o["id"], o["name"], f"{_a(o['name'])} standing still", ",".join(map(str, o["view_box"]))]
                        for o in visible
                    ],
                )
            )
        parts.append(
            "### Setting\n"
            + _table(
                ["Setting ID", "Name", "Description"], [[bg, shot["bg_name"], _a(shot["bg_name"]) + " seen from above"]]
            )
        )
        sections.append(f"## Image {t + 1}\n\n" + "\n\n".join(parts))

    return {
        "story_id": story_id,
        "images": images,
        "frame_count": n_frames,
        "chain_of_thought": "\n\n".join(sections) + "\n",
        "story": "\n".join(sentences),
    }


SCENES = {"shapes": render_story, "pan": render_pan_story}


def story_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of story ``index``: independent of how many stories are made."""
    return np.random.default_rng([0, seed, index])  # first entry names the stream: 0 = stories


def _test_indices(seed: int, stories: int, test_fraction: float) -> set[int]:
    """A seeded ~test_fraction of stories, with at least one story in each split when stories >= 2."""
    if stories < 2:
        return set()
    n_test = min(max(1, int(round(stories * test_fraction))), stories - 1)
    order = np.random.default_rng([1, seed]).permutation(stories)  # stream 1 = the split
    return {int(i) for i in order[:n_test]}


def _parquet_bytes(rows: list[dict]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA), buffer)
    return buffer.getvalue()


def synthesize(
    out_uri: str,
    stories: int,
    seed: int = 0,
    frames: tuple[int, int] = (8, 14),
    test_fraction: float = 0.15,
    rows_per_file: int = 256,
    progress: bool = True,
    scene: str = "shapes",
) -> dict:
    """Write ``stories`` synthetic stories as ``<out_uri>/{train,test}/part-NNNNN.parquet``.

    ``frames`` is the inclusive range of frames per story; ``scene`` is ``"shapes"`` (a shape moving
    over a flat background per shot) or ``"pan"`` (a camera panning over a textured world). Older
    ``part-*.parquet`` files left in the split folders by a bigger earlier run are deleted, so
    readers never mix two runs.
    Returns ``{"train": n_train, "test": n_test, "files": [uris...], "out": out_uri}``.
    """
    lo, hi = int(frames[0]), int(frames[1])
    if stories < 1:
        raise ValueError("stories must be at least 1")
    if not 1 <= lo <= hi:
        raise ValueError(f"frames must be MIN-MAX with 1 <= MIN <= MAX, got {frames}")
    if seed < 0:
        raise ValueError("seed must be non-negative")
    if rows_per_file < 1:
        raise ValueError("rows_per_file must be at least 1")
    if scene not in SCENES:
        raise ValueError(f"unknown scene {scene!r} (choose from {', '.join(SCENES)})")
    render = SCENES[scene]

    test = _test_indices(seed, stories, test_fraction)
    buffers: dict[str, list[dict]] = {"train": [], "test": []}
    counts = {"train": 0, "test": 0}
    parts = {"train": 0, "test": 0}
    files: list[str] = []

    def flush(split: str) -> None:
        uri = storage.join(out_uri, split, f"part-{parts[split]:05d}.parquet")
        storage.write_bytes(uri, _parquet_bytes(buffers[split]))
        files.append(uri)
        parts[split] += 1
        buffers[split] = []

    bar = Progress(stories, desc="synth", unit="story", enabled=progress)
    for index in range(stories):
        rng = story_rng(seed, index)
        split = "test" if index in test else "train"
        buffers[split].append(render(rng, index, int(rng.integers(lo, hi + 1))))
        counts[split] += 1
        if len(buffers[split]) >= rows_per_file:
            flush(split)
        bar.update(1)
    for split in ("train", "test"):
        if buffers[split]:
            flush(split)
    bar.close()

    written = set(files)
    for split in ("train", "test"):
        for uri in storage.list_files(storage.join(out_uri, split), suffix=".parquet"):
            if storage.basename(uri).startswith("part-") and uri not in written:
                storage.delete(uri)

    return {"train": counts["train"], "test": counts["test"], "files": files, "out": out_uri}
