"""Named fault points where fault-injection tests kill, slow or hold the process; free when none is configured.

The crash-safety tests must kill a round at exact places (mid-tar, after a
shard's upload but before its manifest, between a manifest and its catalog
event...) many times over, and tell each place apart. A signal sent from
outside lands wherever the process happens to be; a fault point in the code
lands where it says. Production code calls `fault_point(name)` at each stage
boundary; unless a variable below is set, that is one global lookup.

    PSEUDOTRACK_FAULT_POINT="name:n[,name:n...]"  SIGKILL this process the n-th time `name` is reached
    PSEUDOTRACK_FAULT_SEGV="name:n[,...]"         SIGSEGV instead (a library crashing on a damaged file)
    PSEUDOTRACK_FAULT_PAUSE="name:seconds[,...]"  sleep at every `name` (stretches a stage so rounds overlap)
    PSEUDOTRACK_FAULT_BARRIER="name:dir:k"        the first time `name` is reached, wait (up to 120 s) until
                                                  k processes have reached it, counted as files in `dir`

The variables are read at import; a process that sets them later (a forked
test worker) calls `configure_from_env()`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

POINT_VAR = "PSEUDOTRACK_FAULT_POINT"
SEGV_VAR = "PSEUDOTRACK_FAULT_SEGV"
PAUSE_VAR = "PSEUDOTRACK_FAULT_PAUSE"
BARRIER_VAR = "PSEUDOTRACK_FAULT_BARRIER"
BARRIER_TIMEOUT = 120.0


class _Plan:
    def __init__(
        self,
        kills: dict[str, int],
        pauses: dict[str, float],
        barrier: tuple[str, str, int] | None,
        segvs: dict[str, int] | None = None,
    ):
        self.kills = kills
        self.segvs = segvs or {}
        self.pauses = pauses
        self.barrier = barrier
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.barrier_done = False

    def hit(self, name: str) -> None:
        with self.lock:
            self.hits[name] += 1
            count = self.hits[name]
        if self.kills.get(name) == count:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.segvs.get(name) == count:
            os.kill(os.getpid(), signal.SIGSEGV)
        if name in self.pauses:
            time.sleep(self.pauses[name])
        if self.barrier and self.barrier[0] == name and not self.barrier_done:
            self.barrier_done = True
            _wait_at_barrier(Path(self.barrier[1]), self.barrier[2])


_plan: _Plan | None = None
_tracing = False
_trace: Counter[str] = Counter()


def fault_point(name: str) -> None:
    """A stage boundary named `name`: the place a configured fault happens."""
    if _plan is None and not _tracing:
        return
    if _tracing:
        _trace[name] += 1
    if _plan is not None:
        _plan.hit(name)


def configure_from_env(env: dict[str, str] | None = None) -> None:
    """(Re)read the fault variables; with none set, fault points cost nothing."""
    global _plan
    env = os.environ if env is None else env
    kills = {name: int(n) for name, n in _pairs(env.get(POINT_VAR, ""))}
    pauses = {name: float(s) for name, s in _pairs(env.get(PAUSE_VAR, ""))}
    segvs = {name: int(n) for name, n in _pairs(env.get(SEGV_VAR, ""))}
    barrier = None
    if env.get(BARRIER_VAR):
        name, folder, k = env[BARRIER_VAR].rsplit(":", 2)
        barrier = (name, folder, int(k))
    _plan = _Plan(kills, pauses, barrier, segvs) if (kills or pauses or barrier or segvs) else None


def fault_env() -> dict[str, str]:
    """This process's fault variables, for a worker process to configure itself with (`configure_from_env`)."""
    return {k: v for k, v in os.environ.items() if k in (POINT_VAR, SEGV_VAR, PAUSE_VAR, BARRIER_VAR)}


def start_trace() -> None:
    """Count every fault point reached from now on (the tests list a run's reachable kill points this way)."""
    global _tracing
    _trace.clear()
    _tracing = True


def stop_trace() -> dict[str, int]:
    global _tracing
    _tracing = False
    return dict(_trace)


def _pairs(text: str) -> list[tuple[str, str]]:
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.rpartition(":")
        if not sep or not name:
            raise ValueError(f"fault setting {item!r} is not NAME:VALUE")
        pairs.append((name, value))
    return pairs


def _wait_at_barrier(folder: Path, parties: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{os.getpid()}-{threading.get_ident()}").touch()
    deadline = time.monotonic() + BARRIER_TIMEOUT
    while sum(1 for _ in folder.iterdir()) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fault barrier {folder}: fewer than {parties} processes arrived")
        time.sleep(0.02)


configure_from_env()
