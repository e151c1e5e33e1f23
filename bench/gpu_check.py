"""The steps of ``bench/gpu_check.sh`` that are Python: each prints one ``RESULT: ...`` line (the
summary table's detail) and exits non-zero when its check fails. Run through the shell script.

    python bench/gpu_check.py versions [--gpu]
    python bench/gpu_check.py dtypes|syncs --config F --data DATA [--set K=V ...] [--gpu]
    python bench/gpu_check.py rng [--gpu]
    python bench/gpu_check.py expect RUN --step N --status S [--resumed-from M --log FILE]
    python bench/gpu_check.py stop-resume --run RUN --marker FILE [--gpu] -- TRAIN_ARGS...
    python bench/gpu_check.py report REPORT_DIR | bench BENCH_JSON | table RESULTS_TSV [--out FILE]
    python bench/gpu_check.py predict --run RUN --source SOURCE --out DIR [--gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from storymm.config import load_config
from storymm.training import checkpoint
from storymm.training.devices import driver_version, require_cuda
from storymm.training.loop import read_metrics

REPO = Path(__file__).resolve().parents[1]
EPOCHS_TARGET_S = 60.0  # issue 25: 5 epochs of the gate config at StoryReasoning size on one H100


def _device(gpu: bool) -> torch.device:
    if gpu:
        require_cuda("bench/gpu_check.sh (without --cpu)")
        return torch.device("cuda", 0)
    return torch.device("cpu")


def _result(text: str, ok: bool = True) -> int:
    print(f"RESULT: {text}")
    return 0 if ok else 1


def _config_and_tokens(args):
    from storymm.data.loader import PreparedDataset
    from storymm.training.stages import TokenizerInfo

    config = load_config(args.config, args.overrides)
    dataset = PreparedDataset(args.data)
    return config, dataset, TokenizerInfo.from_manifest(dataset.manifest)


def cmd_versions(args) -> int:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    parts = [
        f"python {platform.python_version()}",
        f"torch {torch.__version__} (CUDA build {torch.version.cuda})",
        f"commit {commit.stdout.strip() or 'unknown'}",
        f"{os.cpu_count()} CPUs",
    ]
    if args.gpu:
        require_cuda("bench/gpu_check.sh (without --cpu)")
        props = torch.cuda.get_device_properties(0)
        parts[2:2] = [f"{props.name} ({props.total_memory / 2**30:.0f} GiB)", f"driver {driver_version()}"]
    return _result(", ".join(parts))


def cmd_dtypes(args) -> int:
    from storymm.training.step_audit import audit_dtypes

    config, _, tokens = _config_and_tokens(args)
    problems = audit_dtypes(config, tokens, _device(args.gpu))
    if problems:
        return _result("not fp32 under bf16 autocast: " + "; ".join(f"{k}: {v}" for k, v in problems.items()), False)
    return _result("GRU, LSTMs, warp coordinates, InfoNCE fp32 under bf16 autocast; a fresh warp head copies")


def cmd_syncs(args) -> int:
    from storymm.training.stages import window_loader
    from storymm.training.step_audit import audit_syncs

    config, dataset, tokens = _config_and_tokens(args)
    loader = window_loader(
        dataset, "train", config, batch_size=config.data.batch_size, shuffle=True, seed=0, uint8_pixels=True
    )
    batch = next(iter(loader))
    device = _device(args.gpu) if args.gpu else torch.device("meta")
    result = audit_syncs(config, tokens, device, batch=batch)
    for line in result.syncs:
        print(f"  sync: {line}")
    how = "torch.cuda.set_sync_debug_mode" if args.gpu else "on the meta device: no CUDA here"
    return _result(f"{len(result.syncs)} host syncs in one sequence step ({how})", result.clean)


def cmd_rng(args) -> int:
    device = _device(args.gpu)
    state = checkpoint.rng_state(device)
    if device.type != "cuda":
        ok = "cuda" not in state and checkpoint.own_cuda_state([torch.zeros(16, dtype=torch.uint8)] * 4, device) is None
        return _result("CPU: no CUDA state saved or restored", ok)
    own = state["cuda"]
    ok = isinstance(own, torch.Tensor) and own.dim() == 1 and torch.equal(own, torch.cuda.get_rng_state(device))
    before = torch.rand(3, device=device)
    checkpoint.restore_rng(state, device)
    ok = ok and torch.equal(torch.rand(3, device=device), before)
    # a checkpoint of the old format (every GPU of a 4-GPU node) restores on this one GPU
    checkpoint.restore_rng({**state, "cuda": [own] * 4}, device)
    ok = ok and torch.equal(torch.rand(3, device=device), before)
    return _result(f"saves this GPU's state only ({tuple(own.shape)} bytes); old 4-GPU states restore here", ok)


def cmd_expect(args) -> int:
    state = checkpoint.load_latest(args.run, purpose="checking")
    if state is None:
        return _result(f"no checkpoint under {args.run}", False)
    step, status = int(state["step"]), state["status"]
    ok = step == args.step and status == args.status
    detail = f"step {step} {status}"
    if args.resumed_from is not None:
        text = Path(args.log).read_text(errors="replace")
        resumed = f"step-{args.resumed_from:08d}.pt" in text and "resuming from" in text
        ok = ok and resumed
        detail += f", resumed from step {args.resumed_from}" if resumed else ", did NOT resume"
    metrics = read_metrics(args.run)
    if metrics:
        first, last = metrics[0], metrics[-1]
        detail += f", loss {first['total']:.3f} -> {last['total']:.3f}, {last['samples_per_s']:.0f} samples/s"
    return _result(detail, ok)


def cmd_stop_resume(args) -> int:
    """SIGUSR1 to an `accelerate launch` run (its launcher ignores the signal, as under SLURM), which
    must checkpoint, touch the marker and exit 0; then the same command resumes and completes."""
    env = dict(os.environ, STORYMM_STOPPED_MARKER=args.marker)
    if not args.gpu:
        env["ACCELERATE_USE_CPU"] = "true"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "jobs/train.py"), *args.train]
    launch += ["--backend", "accelerate"]
    launch += ["--run", args.run]
    ignore_usr1 = lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # noqa: E731 - the launcher's trap
    log = open(args.run + ".stop.log", "w")
    proc = subprocess.Popen(
        [*launch, "--set", "train.sequence.steps=100000"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=ignore_usr1,
    )
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline and proc.poll() is None and not read_metrics(args.run):
        time.sleep(0.5)
    if proc.poll() is not None or not read_metrics(args.run):
        print(Path(log.name).read_text()[-3000:])
        return _result(f"training did not log a step within {args.wait} s (rc {proc.poll()})", False)
    os.killpg(proc.pid, signal.SIGUSR1)  # the session started above: launcher and training process
    rc = proc.wait(timeout=args.wait)
    state = checkpoint.load_latest(args.run, purpose="checking")
    stopped = int(state["step"]) if state else -1
    if rc != 0 or not os.path.exists(args.marker) or state is None or state["status"] not in ("stopped", "running"):
        print(Path(log.name).read_text()[-3000:])
        return _result(
            f"SIGUSR1: launcher exit {rc}, marker {os.path.exists(args.marker)}, state {state and state['status']}",
            False,
        )
    end = stopped + 5
    done = subprocess.run(
        [*launch, "--set", f"train.sequence.steps={end}"], env=env, capture_output=True, text=True, timeout=args.wait
    )
    print(done.stdout[-2000:] + done.stderr[-3000:])
    final = checkpoint.load_latest(args.run, purpose="checking")
    resumed = f"step-{stopped:08d}.pt" in done.stderr + done.stdout
    resumed = resumed and "accelerate rank 0/1" in done.stderr + done.stdout
    ok = done.returncode == 0 and final["step"] == end and final["status"] == "completed" and resumed
    return _result(f"stopped at step {stopped} on SIGUSR1 (exit 0, requeue marker), resumed to {end}", ok)


def cmd_report(args) -> int:
    report = json.loads(Path(args.report, "report.json").read_text())
    metrics = report.get("metrics", report)
    where = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    keys = [k for k in ("image_l1", "perplexity", "bleu") if isinstance(metrics.get(k), int | float)]
    shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in keys)
    return _result(f"report.json on {where}: {shown or 'written'}", True)


def cmd_predict(args) -> int:
    """``storymm export`` of the run, then ``storymm predict --model`` of a test story of the source,
    two frames, on the device and on the CPU: the same frames (within float rounding)."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from storymm.data.sources import find_parquet_files
    from storymm.export import export_model
    from storymm.predict import predict

    device = _device(args.gpu)
    out = Path(args.out)
    export_model(args.run, str(out / "export"))
    story_id = pq.read_table(find_parquet_files(args.source)["test"][0], columns=["story_id"])[0][0].as_py()
    story = f"parquet:{args.source}#{story_id}"
    started = time.perf_counter()
    here = predict(story, str(out / "device"), model_dir=str(out / "export"), steps=2, device=device)
    seconds = time.perf_counter() - started
    cpu = predict(story, str(out / "cpu"), model_dir=str(out / "export"), steps=2, device="cpu")

    def pixels(folder: str, frame: dict) -> np.ndarray:
        return np.asarray(Image.open(out / folder / frame["image"]).convert("RGB"), dtype=np.float64) / 255

    pairs = list(zip(here["predictions"], cpu["predictions"]))
    difference = max(float(np.abs(pixels("device", a) - pixels("cpu", b)).mean()) for a, b in pairs)
    same = sum(a["sentence"] == b["sentence"] for a, b in pairs)
    ok = here["model"]["device"].startswith(device.type) and len(pairs) == 2 and difference < 0.01
    return _result(
        f"predict on {here['model']['device']}: 2 frames in {seconds:.1f} s; against the CPU: mean |pixel| "
        f"difference {difference:.4f} (< 0.01), {same} of 2 sentences equal",
        ok,
    )


def cmd_bench(args) -> int:
    rows = json.loads(Path(args.json).read_text())
    row = rows[0]
    five = 5 * row["epoch_s"]
    util = row.get("gpu_utilisation")
    text = (
        f"{row['storymm_samples_per_s']:.0f} samples/s (plain loop {row['reference_samples_per_s']:.0f}, "
        f"{row['loop_vs_reference']:.2f}x)"
        + (f", GPU {util:.0f}% busy" if util is not None else "")
        + f", 5 epochs of {row['epoch_windows']} windows: {five:.1f} s"
        + (f" (target < {EPOCHS_TARGET_S:.0f} s: {'met' if five < EPOCHS_TARGET_S else 'NOT met'})" if args.gpu else "")
    )
    return _result(text)


def cmd_table(args) -> int:
    rows = [line.split("\t") for line in Path(args.tsv).read_text().splitlines() if line.strip()]
    lines = ["| step | result | seconds | detail |", "|---|---|---|---|"]
    lines += [
        f"| {name} | {status} | {seconds} | {detail.replace('|', '/')} |" for name, status, seconds, detail in rows
    ]
    failed = [r[0] for r in rows if r[1] == "FAIL"]
    lines += [
        "",
        f"{len(rows) - len(failed)} of {len(rows)} steps passed" + (f"; failed: {', '.join(failed)}" if failed else ""),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name, handler, config=False):
        sub = commands.add_parser(name)
        sub.add_argument("--gpu", action="store_true")
        if config:
            sub.add_argument("--config", required=True)
            sub.add_argument("--data", required=True)
            sub.add_argument("--set", dest="overrides", action="append", default=[])
        sub.set_defaults(handler=handler)
        return sub

    add("versions", cmd_versions)
    add("dtypes", cmd_dtypes, config=True)
    add("syncs", cmd_syncs, config=True)
    add("rng", cmd_rng)
    expect = add("expect", cmd_expect)
    expect.add_argument("run")
    expect.add_argument("--step", type=int, required=True)
    expect.add_argument("--status", required=True)
    expect.add_argument("--resumed-from", type=int)
    expect.add_argument("--log")
    stop = add("stop-resume", cmd_stop_resume)
    stop.add_argument("--run", required=True)
    stop.add_argument("--marker", required=True)
    stop.add_argument("--wait", type=float, default=300)
    stop.add_argument("train", nargs=argparse.REMAINDER)
    report = add("report", cmd_report)
    report.add_argument("report")
    predicting = add("predict", cmd_predict)
    predicting.add_argument("--run", required=True)
    predicting.add_argument("--source", required=True)
    predicting.add_argument("--out", required=True)
    bench = add("bench", cmd_bench)
    bench.add_argument("json")
    table = add("table", cmd_table)
    table.add_argument("tsv")
    table.add_argument("--out")
    args = parser.parse_args(argv)
    if getattr(args, "train", None) and args.train[0] == "--":
        args.train = args.train[1:]
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
