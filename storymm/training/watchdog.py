"""Progress watchdog: turn a silent hang into a diagnosed exit that a job script can restart.

Every rank runs two daemon threads beside the training loop, on every backend:

- the **heartbeat** thread rewrites ``<run>/heartbeats/rank-R.json`` every few seconds with the
  rank's phase and step from its :class:`~storymm.training.phases.PhaseClock`. It is the side channel
  that outlives a stuck collective: a rank that is frozen (SIGSTOP), cut off or stuck in native code
  holding the GIL stops rewriting it, which the other ranks can see.
- the **watch** thread compares the time since the rank's last progress (a phase change, a step, a
  validation batch) with the limit of :class:`HangPolicy`. Past it, the rank writes
  ``<run>/incidents/attempt-AAA-rank-RRRR.json`` (host, rank, attempt, step, phase, seconds stuck,
  the ranks it waits for according to their heartbeats, every thread's Python stack), prints one
  ``storymm: hang: ...`` line, records its outcome for the job script (``exits.py``) and exits with
  ``EXIT_HUNG`` (``os._exit``: the main thread is the one that is stuck).

The watch thread's storage access (reading the heartbeats, writing the incident) is bounded by
``IO_TIMEOUT_S``, so a dark link or a dead object store cannot hang the watchdog itself; an incident
that cannot be written goes to stderr whole. A heartbeat write that blocks only delays the next one.
A process that was paused as a whole (its own watch thread woke late: SIGSTOP/SIGCONT, a suspended
laptop) does not count the pause as a hang of its own; its peers, which kept running, do.

The torch process group's timeout (:meth:`HangPolicy.process_group_timeout`) is derived from the same
settings and set a little past the watchdog's, so a rank waiting on a dead or frozen peer fails in
minutes rather than gloo's 30 (NCCL: 10), and the watchdog, which says where, normally fires first.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

from storymm.training.exits import EXIT_HUNG, record_outcome
from storymm.training.phases import Phase, PhaseClock, PhaseSnapshot
from storymm.training.run import RunFolder

log = logging.getLogger(__name__)

#: phases that may legitimately block for long; they get at least ``train.hang_grace_s``
LONG_PHASES = frozenset({Phase.STARTUP, Phase.CHECKPOINT, Phase.VALIDATION})
WARMUP_STEPS = 3  # step durations left out of the median (allocator warm-up, lazy init, compilation)
MEASURED_STEPS = 8  # durations needed after warm-up before the limit follows the measured steps
STEP_MULTIPLE = 20  # automatic limit: this many median steps (at least train.hang_floor_s)
PROCESS_GROUP_MARGIN_S = 60  # the process group's timeout is this much past the watchdog's longest limit
IO_TIMEOUT_S = 20.0  # for each heartbeat read/write and the incident write
HEARTBEAT_MIN_S, HEARTBEAT_MAX_S = 1.0, 30.0


@dataclass(frozen=True)
class HangPolicy:
    """How long a rank may go without progress. ``timeout_s`` None = automatic: until the steps are
    measured, ``grace_s``; then ``max(floor_s, STEP_MULTIPLE x median step)``. Phases that may block
    for long (start-up and the first step, checkpoints, validation) always get ``grace_s`` at least."""

    timeout_s: float | None
    floor_s: float
    grace_s: float
    enabled: bool = True

    @classmethod
    def from_config(cls, train_cfg) -> HangPolicy:
        explicit = train_cfg.hang_timeout_s
        return cls(
            timeout_s=explicit or None,
            floor_s=float(train_cfg.hang_floor_s),
            grace_s=float(train_cfg.hang_grace_s),
            enabled=explicit != 0,
        )

    def base(self, step_durations: list[float]) -> tuple[float, str]:
        """(seconds, rule) for the ordinary phases of a step."""
        measured = step_durations[WARMUP_STEPS:]
        if self.timeout_s is not None:
            return self.timeout_s, "train.hang_timeout_s"
        if len(measured) >= MEASURED_STEPS:
            median = statistics.median(measured)
            return max(self.floor_s, STEP_MULTIPLE * median), (
                f"max(train.hang_floor_s, {STEP_MULTIPLE} x median step {median:.3g} s)"
            )
        return self.grace_s, "train.hang_grace_s (step times not measured yet)"

    def limit(self, snap: PhaseSnapshot, step_durations: list[float]) -> tuple[float, str]:
        """(seconds, the rule that set them) for the phase ``snap`` is in."""
        base, rule = self.base(step_durations)
        long = snap.phase in LONG_PHASES or snap.outer in LONG_PHASES or snap.steps_done == 0
        if long and base <= self.grace_s:
            first = "first step" if snap.steps_done == 0 else (snap.outer or snap.phase).value
            return self.grace_s, f"train.hang_grace_s ({first})"
        return base, rule

    def process_group_timeout(self) -> timedelta:
        """For ``init_process_group``, which runs before any step is measured: past the longest limit
        the watchdog can apply early on, so the watchdog (which says where) fires first."""
        base = self.timeout_s if self.timeout_s is not None else self.floor_s
        return timedelta(seconds=max(base, self.grace_s) + PROCESS_GROUP_MARGIN_S)


def process_group_timeout(train_cfg) -> timedelta:
    return HangPolicy.from_config(train_cfg).process_group_timeout()


def thread_stacks() -> list[dict]:
    """Every thread's Python stack (name, daemon flag, innermost frame last)."""
    frames = sys._current_frames()
    named = {thread.ident: thread for thread in threading.enumerate()}
    out = []
    for ident, frame in frames.items():
        thread = named.get(ident)
        out.append(
            {
                "name": thread.name if thread else f"thread-{ident}",
                "daemon": thread.daemon if thread else None,
                "stack": [line.rstrip("\n") for line in traceback.format_stack(frame)],
            }
        )
    return sorted(out, key=lambda t: (t["name"] != "MainThread", t["name"]))


def waiting_for(peers: list[dict], world_size: int, me: dict, now: float) -> list[dict]:
    """The ranks this one most likely waits for, from their heartbeats (this attempt's only): the ones
    that went silent or never reported; failing that, the live ones that are not where this rank is."""
    latest = {p["rank"]: p for p in peers if p["rank"] != me["rank"]}
    suspects = []
    for rank in range(world_size):
        if rank == me["rank"]:
            continue
        beat = latest.get(rank)
        if beat is None:
            suspects.append({"rank": rank, "why": "no heartbeat in this attempt"})
            continue
        age = now - beat["time"]
        if age > 2 * beat["interval_s"] + 5:
            suspects.append({**_peer(beat, now), "why": f"silent: its last heartbeat is {age:.0f} s old"})
    if suspects:
        return suspects
    return [
        {**_peer(beat, now), "why": f"alive but in {beat['phase']} at step {beat['step']} ({beat['stalled_s']:.0f} s)"}
        for beat in latest.values()
        if (beat["phase"], beat["step"]) != (me["phase"], me["step"])
    ]


def _peer(beat: dict, now: float) -> dict:
    keys = ("rank", "host", "pid", "step", "phase", "outer", "stalled_s")
    return {**{k: beat.get(k) for k in keys}, "heartbeat_age_s": round(now - beat["time"], 1)}


def _bounded(fn, what: str, timeout: float = IO_TIMEOUT_S):
    """``fn()`` in a helper thread; its result, or None when it failed or took longer than ``timeout``."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except Exception as err:  # noqa: BLE001 - reported, never raised: the watchdog must go on
            box["error"] = err

    helper = threading.Thread(target=run, name=f"storymm-watchdog-io-{what}", daemon=True)
    helper.start()
    helper.join(timeout)
    if helper.is_alive():
        log.warning("watchdog: %s took longer than %.0f s; going on without it", what, timeout)
        return None
    if "error" in box:
        log.warning("watchdog: %s failed: %s", what, box["error"])
        return None
    return box.get("value")


class Watchdog:
    """The heartbeat and watch threads of one rank for one attempt; a context manager around the loop."""

    def __init__(self, policy: HangPolicy, clock: PhaseClock, run: RunFolder, attempt: int, rank: int, world_size: int):
        self.policy, self.clock, self.run, self.attempt = policy, clock, run, attempt
        self.rank, self.world_size = rank, world_size
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._limit, self._rule = policy.grace_s, ""
        self._base = policy.timeout_s or policy.grace_s  # the ordinary phases' limit: sets the heartbeat rate
        self._paused_until = 0.0  # monotonic: progress is measured from here after a whole-process pause
        self._accepted = threading.Event()  # heartbeats start once the run's inputs are accepted

    def __enter__(self) -> Watchdog:
        if self.policy.enabled:
            for name, target in (("heartbeat", self._beat), ("watch", self._watch)):
                thread = threading.Thread(target=target, name=f"storymm-watchdog-{name}", daemon=True)
                thread.start()
                self._threads.append(thread)
        return self

    def accepted(self) -> None:
        """The inputs are accepted (stage, data, checkpoint): heartbeats may now be written into the run.
        Before this a bad input must leave the run folder untouched; the watch itself runs from the start,
        so a start-up that hangs (a stuck mount) still ends in an incident."""
        self._accepted.set()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._accepted.set()
        for thread in self._threads:
            thread.join(timeout=1.0)  # a heartbeat write in flight is left to finish on its own

    # ------------------------------------------------------------------------------ threads

    @property
    def heartbeat_interval_s(self) -> float:
        """A fifth of the ordinary limit (not a slow phase's: a peer that waits on this rank during
        its validation or checkpoint has the ordinary limit, and must find this heartbeat fresh)."""
        return min(HEARTBEAT_MAX_S, max(HEARTBEAT_MIN_S, self._base / 5))

    def _where(self, snap: PhaseSnapshot) -> dict:
        """Who and where this rank is: the fields a heartbeat and an incident share."""
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "host": self.host,
            "pid": self.pid,
            "attempt": self.attempt,
            "step": snap.step,
            "phase": snap.phase.value,
            "outer": snap.outer.value if snap.outer else None,
            "stalled_s": round(self._stalled(snap), 3),
            "limit_s": self._limit,
        }

    def heartbeat(self) -> dict:
        return {**self._where(self.clock.snapshot()), "interval_s": self.heartbeat_interval_s, "time": time.time()}

    def _beat(self) -> None:
        """Writes from this thread itself: a write that blocks (storage unreachable) only delays the
        next heartbeat, which is what the other ranks should see. Due every ``heartbeat_interval_s``
        (it shrinks once steps are measured) and when the first step is done (start-up is over)."""
        failing, written_at, started = False, None, False
        self._accepted.wait()
        while not self._stop.is_set():
            now, snap = time.monotonic(), self.clock.snapshot()
            first_step = not started and snap.steps_done > 0
            if written_at is None or now - written_at >= self.heartbeat_interval_s or first_step:
                started = started or snap.steps_done > 0
                try:
                    self.run.write_heartbeat(self.rank, self.heartbeat())
                    failing = False
                except Exception as err:  # noqa: BLE001 - storage trouble must not end the thread
                    if not failing:
                        log.warning("watchdog: rank %d could not write its heartbeat: %s", self.rank, err)
                    failing = True
                written_at = now
            self._stop.wait(min(HEARTBEAT_MIN_S, self.heartbeat_interval_s))

    def _stalled(self, snap: PhaseSnapshot) -> float:
        return snap.now - max(snap.progress_at, self._paused_until)

    def _watch(self) -> None:
        woke = self.clock.snapshot().now
        while True:
            poll = min(5.0, max(0.2, self._base / 20))
            if self._stop.wait(poll):
                return
            snap = self.clock.snapshot()
            if snap.now - woke > poll + max(5.0, poll):  # this thread was held too: the whole process was paused
                paused = snap.now - woke - poll
                log.warning("watchdog: this process was paused for %.0f s; not counted as a hang", paused)
                self._paused_until = snap.now
            woke = snap.now
            durations = self.clock.step_durations()
            self._limit, self._rule = self.policy.limit(snap, durations)
            self._base = self.policy.base(durations)[0]
            if self._stalled(snap) > self._limit:
                self.fire(snap)

    # ----------------------------------------------------------------------------- the exit

    def incident(self, snap: PhaseSnapshot) -> dict:
        """What this rank knows about its hang: where it is, for how long, whom it waits for, its stacks."""
        now = time.time()
        beats = _bounded(self.run.read_heartbeats, "reading the other ranks' heartbeats")
        peers = [b for b in beats or [] if b.get("attempt") == self.attempt and b.get("rank") != self.rank]
        me = {"rank": self.rank, "step": snap.step, "phase": snap.phase.value}
        return {
            "kind": "hang",
            "run": self.run.shown,
            **self._where(snap),
            "limit_rule": self._rule,
            "phase_totals_s": {k: round(v, 3) for k, v in self.clock.totals().items()},
            "heartbeats_read": beats is not None,
            "waiting_for": waiting_for(peers, self.world_size, me, now) if beats is not None else [],
            "peers": [_peer(b, now) for b in sorted(peers, key=lambda b: b["rank"])],
            "threads": thread_stacks(),
            "time": now,
        }

    def summary(self, record: dict, uri: str | None) -> str:
        line = (
            f"storymm: hang: rank {record['rank']} on {record['host']} (pid {record['pid']}) made no progress for "
            f"{record['stalled_s']:.0f} s in {record['phase']}"
            + (f" (during {record['outer']})" if record["outer"] else "")
            + f" at step {record['step']} (limit {record['limit_s']:.0f} s, attempt {record['attempt']})"
        )
        if record["waiting_for"]:
            line += "; waiting for " + ", ".join(
                f"rank {s['rank']}" + (f" on {s['host']}" if s.get("host") else "") + f" ({s['why']})"
                for s in record["waiting_for"]
            )
        elif not record["heartbeats_read"]:
            line += "; the other ranks' heartbeats could not be read"
        return line + (f"; incident {self.run.shown}/{uri.rsplit('/', 2)[-2]}/{uri.rsplit('/', 1)[-1]}" if uri else "")

    def fire(self, snap: PhaseSnapshot) -> None:
        record = self.incident(snap)
        uri = _bounded(lambda: self.run.write_incident(self.attempt, self.rank, record), "writing the incident")
        print("\n" + self.summary(record, uri), file=sys.stderr, flush=True)  # a new line: after a progress bar
        if uri is None:
            print("storymm: incident: " + json.dumps(record), file=sys.stderr, flush=True)
        record_outcome(EXIT_HUNG)
        sys.stdout.flush()
        os._exit(EXIT_HUNG)
