"""Windows per second delivered as decoded, batched tensors: storymm's loader vs a per-item reference.

The reference does what the course notebook did on every access: parse the story with an HTML
parser, decode and resize each image with PIL, tokenize each sentence, then collate. Both read the
same stories in the same run; the ratio is what we claim.

    python bench/data_throughput.py --data DATA_URI [--source SOURCE_URI] [--seconds 20]
    python bench/data_throughput.py            # synthesises and prepares 200 stories in a temp dir
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from html.parser import HTMLParser

import numpy as np
import torch
from PIL import Image

from storymm import storage
from storymm.config import load_config
from storymm.data import synth
from storymm.data.loader import PreparedDataset, WindowLoader
from storymm.data.prepare import prepare
from storymm.data.sources import open_source


class _StoryParser(HTMLParser):
    """The notebook's way: walk the tags, collect text per <gdi imageN> block."""

    def __init__(self):
        super().__init__()
        self.frames: dict[int, list[str]] = {}
        self.current: int | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "gdi" and attrs:
            self.current = int(attrs[0][0].replace("image", ""))
            self.frames[self.current] = []

    def handle_endtag(self, tag):
        if tag == "gdi":
            self.current = None

    def handle_data(self, data):
        if self.current is not None:
            self.frames[self.current].append(data)


class PerItemReference(torch.utils.data.Dataset):
    """One window per item, everything recomputed on access (no caching), like the course code."""

    def __init__(self, rows: list[dict], tokenizer, context: int, size: tuple[int, int], max_tokens: int):
        self.rows, self.tokenizer, self.context, self.size, self.max_tokens = rows, tokenizer, context, size, max_tokens
        self.index = [(r, s) for r, row in enumerate(rows) for s in range(len(row["images"]) - context)]

    def __len__(self):
        return len(self.index)

    def _image(self, data: bytes) -> torch.Tensor:
        picture = Image.open(io.BytesIO(data)).convert("RGB").resize((self.size[1], self.size[0]))
        return torch.from_numpy(np.asarray(picture)).permute(2, 0, 1).float() / 255.0

    def _tokens(self, sentence: str) -> torch.Tensor:
        ids = self.tokenizer.encode(sentence).ids[: self.max_tokens]
        return torch.tensor(ids + [0] * (self.max_tokens - len(ids)))

    def __getitem__(self, item):
        row_index, start = self.index[item]
        row = self.rows[row_index]
        parser = _StoryParser()
        parser.feed(row["story"])
        sentences = [" ".join("".join(parser.frames[n]).split()) for n in sorted(parser.frames)]
        frames = [self._image(row["images"][i]["bytes"]) for i in range(start, start + self.context + 1)]
        tokens = [self._tokens(sentences[i]) for i in range(start, start + self.context + 1)]
        return {
            "frames": torch.stack(frames[:-1]),
            "tokens": torch.stack(tokens[:-1]),
            "target_frame": frames[-1],
            "target_tokens": tokens[-1],
        }


def _rate(batches, seconds: float) -> tuple[float, int]:
    """Windows per second over at most ``seconds`` (after one warm-up batch)."""
    iterator = iter(batches)
    next(iterator)
    windows, start = 0, time.perf_counter()
    for batch in iterator:
        windows += len(batch["target_tokens"])
        if time.perf_counter() - start > seconds:
            break
    return windows / (time.perf_counter() - start), windows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="prepared dataset URI (default: synthesise 200 stories)")
    parser.add_argument("--source", help="source parquet URI (default: the dataset manifest's source)")
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15.0, help="time budget per side")
    args = parser.parse_args(argv)
    config = load_config(args.config)

    if args.data is None:
        scratch = tempfile.mkdtemp(prefix="storymm-bench-")
        args.source = os.path.join(scratch, "source")
        args.data = os.path.join(scratch, "data")
        synth.synthesize(args.source, 200, seed=0, progress=False)
        prepare(args.source, args.data, config, progress=False)
    dataset = PreparedDataset(args.data)
    source_uri = args.source or dataset.manifest["source"]
    height, width = dataset.height, dataset.width
    context = dataset.manifest["context_frames"]

    ours = WindowLoader(
        dataset,
        args.split,
        batch_size=args.batch_size,
        context_frames=context,
        max_tokens=config.data.max_tokens,
        seed=0,
        shuffle_buffer=config.data.shuffle_buffer,
    )
    ours_rate, ours_windows = _rate(_repeat(ours), args.seconds)

    rows = [row for batch in open_source(source_uri).iter_batches("train") for row in batch]
    reference = PerItemReference(rows, dataset.tokenizer.tokenizer, context, (height, width), config.data.max_tokens)
    loader = torch.utils.data.DataLoader(
        reference, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    ref_rate, ref_windows = _rate(_repeat(loader), args.seconds)

    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    print(f"data: {storage.redact(args.data)} ({args.split}, {height}x{width}, K={context}, B={args.batch_size})")
    print(f"storymm WindowLoader      : {ours_rate:10.1f} windows/s ({ours_windows} windows)")
    print(f"per-item reference (course): {ref_rate:10.1f} windows/s ({ref_windows} windows)")
    print(f"ratio: {ours_rate / ref_rate:.1f}x (target >= 10x)")
    return 0


def _repeat(loader):
    """Cycle epochs so short splits still fill the time budget."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


if __name__ == "__main__":
    sys.exit(main())
