"""The ``storymm`` command: argument parsing only; every subcommand calls into the library."""

from __future__ import annotations

import argparse
import logging
import sys

DEFAULT_WORK = "./storymm-work"


def _frames_range(text: str) -> tuple[int, int]:
    try:
        low, high = (int(part) for part in text.split("-", 1)) if "-" in text else (int(text), int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--frames expects MIN-MAX, e.g. 8-14, not {text!r}") from None
    if not 2 <= low <= high:
        raise argparse.ArgumentTypeError(f"--frames needs 2 <= MIN <= MAX, got {text!r}")
    return low, high


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (configs/*.yaml); defaults when omitted")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set data.batch_size=16 (repeatable)",
    )


def cmd_synth(args) -> int:
    from storymm.synth import synthesize

    summary = synthesize(args.out, args.stories, seed=args.seed, frames=args.frames)
    print(f"synthesised {summary['train']} train and {summary['test']} test stories under {summary['out']}")
    return 0


def cmd_prepare(args) -> int:
    from storymm.config import load_config
    from storymm.data.prepare import prepare, summarize

    config = load_config(args.config, args.overrides)
    manifest = prepare(args.source, args.out, config)
    print(summarize(manifest, args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="storymm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="write synthetic stories in the StoryReasoning schema")
    synth.add_argument("--out", required=True, help="folder or URI (train/ and test/ parquet beneath)")
    synth.add_argument("--stories", type=int, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--frames", type=_frames_range, default=(8, 14), help="frames per story, MIN-MAX")
    synth.set_defaults(run=cmd_synth)

    prep = commands.add_parser("prepare", help="validate, resize and tokenize stories into shards")
    prep.add_argument("--source", required=True, help="hub id (hf:NAME or owner/name) or a folder/URI of parquet")
    prep.add_argument("--out", required=True, help="dataset folder or URI")
    _add_config_args(prep)
    prep.set_defaults(run=cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from storymm.config import ConfigError
    from storymm.data.loader import DatasetError
    from storymm.data.tokenizer import TokenizerError

    try:
        return args.run(args)
    except (ConfigError, DatasetError, TokenizerError, FileNotFoundError, ValueError) as err:
        print(f"storymm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
