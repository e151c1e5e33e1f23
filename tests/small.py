"""Model sizes small enough that a training step takes milliseconds, and small prepared datasets,
shared by the tests that train."""

from __future__ import annotations

from pathlib import Path

from storymm import storage
from storymm.config import Config, load_config
from storymm.data import synth
from storymm.data.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]

#: ``--set`` overrides shrinking every model of configs/tiny.yaml (and of the seed configs).
SMALL = [
    "data.batch_size=8",
    "model.visual_channels=[8,16,16]",
    "model.visual_latent=16",
    "model.text_latent=16",
    "model.embed_dim=16",
    "model.text_hidden=32",
    "model.sequence_hidden=32",
]


def small_config(*extra: str, base: str = "tiny") -> Config:
    """``configs/<base>.yaml`` with ``SMALL`` and then ``extra`` applied."""
    return load_config(ROOT / f"configs/{base}.yaml", SMALL + list(extra))


def small_dataset(
    root: str, stories: int, seed: int, frames: tuple[int, int], config: Config | None = None, scene: str = "shapes"
) -> str:
    """Synthesise ``stories`` of ``scene`` into ``<root>/src`` and prepare them into ``<root>/data``
    (local or s3://) with ``config`` (default ``small_config()``); returns the data URI."""
    src, data = storage.join(root, "src"), storage.join(root, "data")
    synth.synthesize(src, stories, seed=seed, frames=frames, progress=False, scene=scene)
    prepare(src, data, config or small_config(), progress=False)
    return data
