"""The ``storymm`` command: argument parsing only; every subcommand calls into the library."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import traceback

from storymm.training.exits import EXIT_HUNG, EXIT_STOPPED  # noqa: F401 - `storymm train`'s exit codes

DEFAULT_WORK = "./storymm-work"


def _frames_range(text: str) -> tuple[int, int]:
    try:
        low, high = (int(part) for part in text.split("-", 1)) if "-" in text else (int(text), int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--frames expects MIN-MAX, e.g. 8-14, not {text!r}") from None
    if not 2 <= low <= high:
        raise argparse.ArgumentTypeError(f"--frames needs 2 <= MIN <= MAX, got {text!r}")
    return low, high


def _number(kind, accept, expected: str):
    """An argparse type: ``kind(text)`` that ``accept`` takes, else one line saying what is expected."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, not {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a whole number >= 1")
_temperature = _number(float, lambda v: 0 <= v < math.inf, "a finite number >= 0 (0 = greedy)")
_top_p = _number(float, lambda v: 0 < v <= 1, "a probability mass in (0, 1] (1 = no nucleus cut)")
_expires = _number(int, lambda v: 1 <= v <= 7 * 24 * 3600, "seconds between 1 and 604800 (7 days)")


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line, like every other storymm error (no usage block)."""

    def error(self, message: str):
        command = self.prog.partition(" ")[2]  # "storymm train" -> "train"
        self.exit(2, f"storymm: error: {command + ': ' if command else ''}{message} (see `{self.prog} --help`)\n")


def _workers(text: str) -> int | tuple[int, int]:
    from storymm.training.ray_backend import parse_workers

    try:
        return parse_workers(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (configs/*.yaml); defaults when omitted")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set data.batch_size=16 (repeatable)",
    )


def cmd_synth(args) -> int:
    from storymm.data.synth import synthesize

    summary = synthesize(
        args.out, args.stories, seed=args.seed, frames=args.frames, scene=args.scene, unseen_words=args.unseen_words
    )
    words = " (test stories name things with words no train story uses)" if args.unseen_words else ""
    print(f"synthesised {summary['train']} train and {summary['test']} test stories under {summary['out']}{words}")
    return 0


def cmd_prepare(args) -> int:
    from storymm.config import load_config
    from storymm.data.prepare import prepare, summarize

    config = load_config(args.config, args.overrides)
    manifest = prepare(args.source, args.out, config, backend=args.backend, workers=args.workers)
    print(summarize(manifest, args.out))
    return 0


def cmd_train(args) -> int:
    from storymm.config import load_config
    from storymm.training.backends import run_training

    config = load_config(args.config, args.overrides)
    summary = run_training(
        config,
        args.stage,
        args.data,
        args.run,
        backend=args.backend,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        init_from=args.init_from,
    )
    print(f"{summary['stage']}: {summary['status']} at step {summary['step']} -> {summary['run']}")
    return EXIT_STOPPED if summary["status"] == "stopped" else 0


def cmd_evaluate(args) -> int:
    from storymm.evaluation.evaluate import evaluate, format_summary

    report = evaluate(
        args.run,
        args.data,
        args.split,
        args.out,
        temperature=args.temperature,
        top_p=args.top_p,
        checkpoint_name=args.checkpoint,
    )
    if report:
        print(format_summary(report))
        if args.out:
            print(f"report: {args.out}")
    return 0


def cmd_predict(args) -> int:
    from storymm.predict import predict

    result = predict(
        args.story,
        args.out,
        run=args.run,
        model_dir=args.model,
        checkpoint=args.checkpoint,
        steps=args.steps,
        temperature=args.temperature,
        top_p=args.top_p,
    )
    model = result["model"]
    print(
        f"{result['story']}: {len(result['predictions'])} frame(s) predicted after its last {len(result['inputs'])} "
        f"by {model['origin']} (step {model['step']}, on {model['device']}):"
    )
    for frame in result["predictions"]:
        print(f"  {frame['image']}: {frame['sentence']}")
    print(f"page: {result['files']['index.html']}")
    return 0


def cmd_export(args) -> int:
    from storymm import storage
    from storymm.export import export_model

    export = export_model(args.run, args.out, checkpoint=args.checkpoint)
    print(
        f"exported {export['run']} ({export['checkpoint']} checkpoint, step {export['step']}, "
        f"{export['parameters']:,} parameters) -> {storage.redact(args.out)}"
    )
    print(f"use it: storymm predict --model {storage.redact(args.out)} --story FOLDER --out OUT")
    return 0


def cmd_pipeline(args) -> int:
    from storymm.config import load_config
    from storymm.pipeline import run_pipeline

    config = load_config(args.config, args.overrides)
    run_pipeline(config, args.work, backend=args.backend, workers=args.workers)
    return 0


def cmd_experiment(args) -> int:
    from storymm.experiment import run_experiment

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    run_experiment(
        args.data, args.work, names, args.overrides, split=args.split, backend=args.backend, workers=args.workers
    )
    return 0


def cmd_tune(args) -> int:
    from storymm.config import load_config
    from storymm.training.tune import parse_grid, results_markdown, run_tune

    config = load_config(args.config, args.overrides)
    summary = run_tune(
        config,
        args.stage,
        args.data,
        args.runs,
        args.out,
        grid=parse_grid(args.grid) or None,
        max_concurrent=args.max_concurrent,
        grace_steps=args.grace_steps,
        gpus_per_trial=args.gpus_per_trial,
    )
    print(results_markdown(summary))
    print(f"results: {args.out}")
    if args.evaluate:
        from storymm.training.tune import compare_trials

        result = compare_trials(summary, args.runs, args.data, args.out, split=args.split)
        print(result["markdown"])
        print(f"comparison: {result['files']['md']}")
    return 0 if summary["best"] is not None else 1


def cmd_nightly(args) -> int:
    from storymm.errors import UsageError
    from storymm.evaluation.nightly import check_date, load_tolerances, run_nightly

    try:  # the arguments, checked before any work (both raise ValueError naming the bad value)
        if args.date:
            check_date(args.date)
        load_tolerances(args.tolerance)
    except ValueError as err:
        raise UsageError(str(err)) from None

    night = run_nightly(
        args.runs, args.data, args.reports, tolerance_uri=args.tolerance, date=args.date, split=args.split
    )
    print("\n".join(night["lines"]))
    return night["exit_code"]


def cmd_compare(args) -> int:
    from storymm.evaluation.compare import compare

    names = [n.strip() for n in args.names.split(",")] if args.names else None
    result = compare(args.sources, args.out, names=names, data_uri=args.data, split=args.split)
    print(result["markdown"])
    print(f"comparison: {result['files']['html']}")
    return 0


def cmd_report_url(args) -> int:
    from storymm.evaluation.report import report_url

    print(report_url(args.uri, expires=args.expires))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="storymm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="write synthetic stories in the StoryReasoning schema")
    synth.add_argument("--out", required=True, help="folder or URI (train/ and test/ parquet beneath)")
    synth.add_argument("--stories", type=_positive_int, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--frames", type=_frames_range, default=(8, 14), help="frames per story, MIN-MAX")
    synth.add_argument(
        "--scene",
        choices=("shapes", "pan"),
        default="shapes",
        help="shapes: a shape moving over a flat background per shot; pan: a camera panning "
        "(and zooming) over a textured world",
    )
    synth.add_argument(
        "--unseen-words",
        action="store_true",
        help="the test split names its subjects, colours and places with words that never occur in "
        "the train split (a text head must copy them from the input sentences)",
    )
    synth.set_defaults(handler=cmd_synth)

    prep = commands.add_parser("prepare", help="validate, resize and tokenize stories into shards")
    prep.add_argument("--source", required=True, help="hub id (hf:NAME or owner/name) or a folder/URI of parquet")
    prep.add_argument("--out", required=True, help="dataset folder or URI")
    prep.add_argument(
        "--backend",
        choices=["local", "ray"],
        default="local",
        help="local: threads in this process; ray: decode/resize/tokenize as Ray tasks (same output)",
    )
    prep.add_argument("--workers", type=int, default=None, help="ray: tasks at a time (and CPUs of a local Ray)")
    _add_config_args(prep)
    prep.set_defaults(handler=cmd_prepare)

    train = commands.add_parser("train", help="train one stage (resumes from the run's latest checkpoint)")
    train.add_argument("--stage", required=True, choices=["visual_ae", "text_ae", "sequence"])
    train.add_argument("--data", required=True, help="prepared dataset URI")
    train.add_argument("--run", required=True, help="run URI (checkpoints, metrics)")
    train.add_argument("--backend", default="local", choices=["local", "ray", "accelerate"])
    train.add_argument(
        "--workers",
        type=_workers,
        default=1,
        help="data-parallel workers (ray): N, or MIN-MAX for elastic training (Ray Train v2)",
    )
    train.add_argument("--gpus-per-worker", type=float, default=0.0, help="ray: GPUs per worker (default 0: CPU)")
    train.add_argument(
        "--cpus-per-worker",
        type=_positive_int,
        help="ray: CPUs (and torch threads) per worker; default 1, or 4 with --gpus-per-worker",
    )
    train.add_argument(
        "--init-from",
        nargs="*",
        default=[],
        metavar="RUN_URI",
        help="visual_ae / text_ae runs whose weights the sequence stage starts from",
    )
    _add_config_args(train)
    train.set_defaults(handler=cmd_train)

    evaluate = commands.add_parser("evaluate", help="score a sequence run on a whole split and write its report")
    evaluate.add_argument("--run", required=True, help="sequence run URI")
    evaluate.add_argument("--data", required=True, help="prepared dataset URI")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"])
    evaluate.add_argument("--out", help="report folder or URI (report.json, report.html, plots)")
    evaluate.add_argument("--temperature", type=_temperature, help="sampling temperature (default: greedy)")
    evaluate.add_argument("--top-p", type=_top_p, help="nucleus sampling mass, in (0, 1]")
    evaluate.add_argument(
        "--checkpoint",
        default="latest",
        choices=["latest", "best"],
        help="the latest checkpoint, or the best by validation loss (train.sequence.eval_every)",
    )
    evaluate.set_defaults(handler=cmd_evaluate)

    predict = commands.add_parser(
        "predict",
        help="continue a story of your own (images + sentences.txt) with a trained model",
        description="Reads the last K frames of STORY (a folder of images in name order with sentences.txt, "
        "one sentence per image, or parquet:URI#story_id) and writes OUT/next-1.png ... next-N.png, "
        "OUT/story.json and OUT/index.html.",
    )
    which = predict.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="sequence run URI (its dataset must be readable: the tokenizer lives there)")
    which.add_argument("--model", help="export folder (storymm export): needs no run, no data")
    predict.add_argument("--story", required=True, help="folder or URI of images + sentences.txt, or parquet:URI#id")
    predict.add_argument("--out", required=True, help="folder or URI for the PNGs, story.json and index.html")
    predict.add_argument("--steps", type=_positive_int, default=1, help="frames to predict, each fed back as input")
    predict.add_argument(
        "--checkpoint", choices=["latest", "best"], help="with --run: the latest checkpoint (default) or the best"
    )
    predict.add_argument("--temperature", type=_temperature, help="sampling temperature (default: greedy)")
    predict.add_argument("--top-p", type=_top_p, help="nucleus sampling mass, in (0, 1]")
    predict.set_defaults(handler=cmd_predict)

    export = commands.add_parser(
        "export", help="write a sequence run's model as safetensors + config + tokenizer + card, usable alone"
    )
    export.add_argument("--run", required=True, help="sequence run URI")
    export.add_argument("--out", required=True, help="export folder or URI")
    export.add_argument("--checkpoint", default="latest", choices=["latest", "best"])
    export.set_defaults(handler=cmd_export)

    pipeline = commands.add_parser("pipeline", help="synthesise if needed, prepare, train 3 stages, evaluate")
    pipeline.add_argument("--work", default=DEFAULT_WORK, help=f"work folder or URI (default {DEFAULT_WORK})")
    pipeline.add_argument("--backend", default="local", choices=["local", "ray", "accelerate"])
    pipeline.add_argument("--workers", type=_positive_int, default=1)
    _add_config_args(pipeline)
    pipeline.set_defaults(handler=cmd_pipeline)

    experiment = commands.add_parser(
        "experiment", help="train and evaluate several configs on the same data; WORK/reports/comparison.md"
    )
    experiment.add_argument("--data", required=True, help="prepared dataset URI (shared by every config)")
    experiment.add_argument("--work", required=True, help="work URI: runs/<config>/<stage>, reports/<config>/")
    experiment.add_argument(
        "--configs",
        default="baseline,gate,gate_retrained",
        help="comma-separated config names (configs/<name>.yaml) or YAML paths",
    )
    experiment.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override applied to every config (repeatable)",
    )
    experiment.add_argument("--split", default="test", choices=["train", "val", "test"])
    experiment.add_argument("--backend", default="local", choices=["local", "ray", "accelerate"])
    experiment.add_argument("--workers", type=_positive_int, default=1)
    experiment.set_defaults(handler=cmd_experiment)

    tune = commands.add_parser("tune", help="Ray Tune sweep: each trial a short training run, ASHA early stopping")
    tune.add_argument(
        "--stage",
        default="visual_ae",
        choices=["visual_ae", "text_ae", "sequence", "all"],
        help="the stage each trial trains; all: its own autoencoders, then the sequence model from them",
    )
    tune.add_argument("--data", required=True, help="prepared dataset URI")
    tune.add_argument("--runs", required=True, help="URI under which each trial gets its run folder")
    tune.add_argument("--out", required=True, help="reports folder or URI for tune.md and tune.json")
    tune.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="config key and values to sweep (repeatable; all combinations); default model.visual_latent=16,32,64,128",
    )
    tune.add_argument("--max-concurrent", type=_positive_int, default=2, help="trials running at once")
    tune.add_argument(
        "--gpus-per-trial",
        type=float,
        help="GPUs per trial (default: 1 when the Ray cluster has GPUs, else 0: CPU)",
    )
    tune.add_argument("--grace-steps", type=_positive_int, help="ASHA grace period in steps (default steps/4)")
    tune.add_argument(
        "--evaluate",
        action="store_true",
        help="sequence and all sweeps: evaluate every trial with a checkpoint and write OUT/compare.md "
        "(all metrics and floors side by side)",
    )
    tune.add_argument("--split", default="test", choices=["train", "val", "test"], help="split for --evaluate")
    _add_config_args(tune)
    tune.set_defaults(handler=cmd_tune)
    nightly = commands.add_parser(
        "nightly",
        help="evaluate each run's latest checkpoint, update the nightly index, flag regressions",
        description="Exit codes: 0 nothing regressed, 3 a metric regressed beyond tolerance, "
        "4 an evaluation failed (recorded as failed), 2 bad arguments.",
    )
    nightly.add_argument("--runs", nargs="+", required=True, metavar="RUN_URI", help="sequence runs to evaluate")
    nightly.add_argument("--data", required=True, help="prepared dataset URI")
    nightly.add_argument("--reports", required=True, help="reports URI; nights go under REPORTS/nightly/<date>/")
    nightly.add_argument("--tolerance", metavar="FILE", help="YAML {default: {relative, absolute}, metrics: {...}}")
    nightly.add_argument("--date", help="night to write, YYYY-MM-DD (default: today, UTC)")
    nightly.add_argument("--split", default="test", choices=["train", "val", "test"])
    nightly.set_defaults(handler=cmd_nightly)

    comp = commands.add_parser("compare", help="side-by-side table of reports (or runs) as Markdown and HTML")
    comp.add_argument(
        "sources",
        nargs="+",
        metavar="RUN_OR_REPORT_URI",
        help="report folders (report.json) or sequence runs (evaluated on --data first)",
    )
    comp.add_argument("--out", required=True, help="folder or URI for compare.md, compare.html, compare.json")
    comp.add_argument("--names", help="column names, comma-separated (default: last path component)")
    comp.add_argument("--data", help="prepared dataset URI, to evaluate sources that are runs")
    comp.add_argument("--split", default="test", choices=["train", "val", "test"])
    comp.set_defaults(handler=cmd_compare)

    report = commands.add_parser("report", help="report helpers")
    report_commands = report.add_subparsers(dest="report_command", required=True)
    url = report_commands.add_parser("url", help="print a link to a report page (presigned for s3://)")
    url.add_argument("uri", metavar="REPORT_URI", help="report folder, nightly folder or .html page")
    url.add_argument(
        "--expires", type=_expires, default=3600, help="seconds the presigned link is valid (default 3600)"
    )
    url.set_defaults(handler=cmd_report_url)
    return parser


def _close_progress_bars() -> None:
    """A bar interrupted by the error would leave the cursor mid-line: end it first."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    """Run one command. A :class:`~storymm.errors.StorymmError` (bad input or environment) or a
    missing file is printed as one line, ``storymm: error: ...``, exit 2 (``-v``: with traceback);
    anything else is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):  # their DEBUG logs signed requests (key id)
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger(name).level))
    from storymm.errors import StorymmError

    try:
        return args.handler(args)
    except (StorymmError, FileNotFoundError) as err:
        if args.verbose:
            traceback.print_exc()
        _close_progress_bars()
        message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"storymm: error: {message or type(err).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
