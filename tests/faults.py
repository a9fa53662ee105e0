"""Fault injection for the reliability tests: rounds killed at named fault points, an S3 proxy that breaks
requests on a schedule, and the invariants every run must keep whatever happened to it.

- `RoundRunner` runs rounds in child processes forked from a forkserver that has imported pseudotrack
  once (a cold import costs ~10 s here; a fork costs milliseconds), so dozens of rounds can be killed
  with SIGKILL at exact places (`pseudotrack.faults.fault_point`) within a test's budget. Each child is
  a real separate process: what it leaves behind is what a killed round leaves behind.
- `FaultProxy` sits on 127.0.0.1 in front of the SeaweedFS test server and answers chosen requests
  with 500/503, delays them, drops the connection before or after the server acted, cuts a response
  body short, or "restarts the server": it cuts every open connection and refuses new ones for a
  while. The server behind it keeps its objects, as a real one does through a restart; restarting
  SeaweedFS itself would cost 10-30 s a time instead of the two seconds a test wants.
- `check_invariants` reads a workspace the way its readers do and asserts what the reliability issue
  requires: one terminal state per video, no sample twice across committed shards, no partial shard
  visible, a catalog that reads cleanly, and labels equal to those of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import multiprocessing
import os
import random
import re
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

# --------------------------------------------------------------------------- the bucket and the round

# 8 generated clips (2 with captions the filter drops) and one broken file: labelled, filtered and failed
BUCKET = dict(videos=8, frames=16, height=48, width=64, seed=1, broken=1)
EXPECTED = {"labelled": 6, "filtered": 2, "failed": 1}
# tiny clips, small batches and two samples a shard: many stage boundaries in a round of about a second
TINY = dict(
    height=48,
    width=64,
    num_frames=8,
    min_frames=8,
    num_queries=16,
    num_keyframes=2,
    batch_size=3,
    shard_max_samples=2,
    seed=3,
    device="cpu",
)


def write_bucket(root: Path) -> list[str]:
    """The test bucket; returns its video keys."""
    from pseudotrack.demo import write_demo_bucket

    write_demo_bucket(root, **BUCKET)
    return sorted(p.name for p in root.iterdir() if p.suffix == ".mp4")


def tiny_config(bucket: str, workspace: str, round_id: str, **overrides) -> dict:
    """A RoundConfig as a plain dict (it crosses into child processes)."""
    from pseudotrack.config import RoundConfig

    return asdict(RoundConfig(bucket=bucket, workspace=workspace, round_id=round_id, **{**TINY, **overrides}))


def reference_labels(bucket: str, workspace: str, round_id: str = "reference") -> dict[str, dict[str, np.ndarray]]:
    """The labels of an uninterrupted run with the same seed, in this process (what every faulty run must equal)."""
    from pseudotrack.config import RoundConfig
    from pseudotrack.flows.label_round import run_round

    summary = run_round(RoundConfig.from_dict(tiny_config(bucket, workspace, round_id)))
    assert summary.labelled == EXPECTED["labelled"] and summary.failed == EXPECTED["failed"], summary
    return committed_labels(workspace)


# --------------------------------------------------------------------------- rounds in killable processes


@dataclass
class RunResult:
    exitcode: int | None
    ok: bool = False
    summary: dict | None = None
    error: str | None = None
    trace: dict[str, int] = field(default_factory=dict)

    @property
    def killed(self) -> bool:
        return self.exitcode == -signal.SIGKILL


def _child_main(job: dict) -> None:
    """Runs in the forked child: apply the job's environment and faults, run the round, leave a result file."""
    for name in job.get("unset", ()):
        os.environ.pop(name, None)
    os.environ.update(job.get("env", {}))
    from pseudotrack import faults
    from pseudotrack.config import RoundConfig
    from pseudotrack.flows.label_round import BatchesFailed, run_label_round_flow, run_round

    faults.configure_from_env()
    if job.get("trace"):
        faults.start_trace()
    config = RoundConfig.from_dict(job["config"])
    out: dict = {"ok": False}
    try:
        if job.get("prefect_api"):
            from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

            with temporary_settings({PREFECT_API_URL: job["prefect_api"], PREFECT_SERVER_ANALYTICS_ENABLED: False}):
                out["summary"] = run_label_round_flow(config)
        else:
            out["summary"] = run_round(config).to_dict()
        out["ok"] = True
    except BatchesFailed as exc:
        out.update(error=str(exc), summary=exc.summary.to_dict())
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    if job.get("trace"):
        out["trace"] = faults.stop_trace()
    Path(job["result"]).write_text(json.dumps(out, default=str))


class RoundRunner:
    """Rounds in separate processes forked from one warm forkserver."""

    PRELOAD = ["pseudotrack.flows.label_round", "pseudotrack.teachers.lk", "pseudotrack.demo"]

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(self.PRELOAD)

    def start(self, config: dict, *, kill: str | None = None, env: dict | None = None, **job) -> tuple:
        """Start a round; `kill` = "point:n" SIGKILLs it the n-th time it reaches that fault point."""
        env = dict(env or {})
        unset = [
            "PSEUDOTRACK_FAULT_POINT",
            "PSEUDOTRACK_FAULT_SEGV",
            "PSEUDOTRACK_FAULT_PAUSE",
            "PSEUDOTRACK_FAULT_BARRIER",
        ]
        if kill:
            env["PSEUDOTRACK_FAULT_POINT"] = kill
        result = self.tmp / f"result-{uuid.uuid4().hex}.json"
        payload = {"config": config, "env": env, "unset": [u for u in unset if u not in env], "result": str(result)}
        # not daemonic: a round starts its own CPU worker processes (tasks/pipeline.py), which daemons may not
        process = self.ctx.Process(target=_child_main, args=({**payload, **job},), daemon=False)
        process.start()
        return process, result

    @staticmethod
    def wait(handle: tuple, timeout: float = 120.0) -> RunResult:
        process, result = handle
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise AssertionError(f"round did not finish within {timeout:.0f} s")
        if not result.exists():
            return RunResult(process.exitcode)
        out = json.loads(result.read_text())
        return RunResult(process.exitcode, out["ok"], out.get("summary"), out.get("error"), out.get("trace", {}))

    def run(self, config: dict, **kw) -> RunResult:
        timeout = kw.pop("timeout", 120.0)
        return self.wait(self.start(config, **kw), timeout)


# --------------------------------------------------------------------------- invariants


def committed_labels(workspace: str) -> dict[str, dict[str, np.ndarray]]:
    """video key -> its arrays (queries and every teacher's tracks, visibility, confidence) from committed shards."""
    from pseudotrack.render import shard_url
    from pseudotrack.storage.uri import open_store
    from pseudotrack.tasks.shards import committed_shards, read_shard

    store = open_store(workspace)
    labels = {}
    for manifest in committed_shards(store):
        for sample in read_shard(shard_url(store, manifest["shard"])):
            arrays = {"queries": sample["queries"]}
            for teacher, fields in sample["labels"].items():
                arrays.update({f"{teacher}.{name}": value for name, value in fields.items()})
            labels[sample["meta"]["source_key"]] = arrays
    return labels


def check_invariants(
    workspace: str,
    videos: list[str],
    reference: dict[str, dict[str, np.ndarray]] | None = None,
    *,
    complete: bool = True,
    one_event_per_video: bool = True,
) -> dict:
    """Assert the reliability invariants on a workspace; returns a few counts about it.

    complete: every video has reached a terminal state (after a finished rerun); False checks
    what must hold at any moment, even right after a kill.
    one_event_per_video: no video has two terminal events (rounds that ran at once may both
    record the same caption verdict, which is a duplicate fact, not a second labelling).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pseudotrack.render import shard_url
    from pseudotrack.storage.base import TMP_MARK
    from pseudotrack.storage.catalog import TERMINAL, Catalog
    from pseudotrack.storage.layout import is_manifest
    from pseudotrack.storage.uri import open_store
    from pseudotrack.student.data import shard_refs
    from pseudotrack.tasks.shards import committed_shards, read_shard

    store = open_store(workspace)
    # the catalog reads cleanly: every file parses on its own, and the catalog as a whole
    catalog = Catalog(store)
    for key in catalog.files():
        pq.read_table(pa.BufferReader(store.read_bytes(key)))
    events = catalog.events().to_pylist()
    latest = {r["video_key"]: r for r in catalog.latest().to_pylist()}
    assert set(latest) <= set(videos), f"catalog names videos not in the bucket: {set(latest) - set(videos)}"
    if complete:
        missing = sorted(set(videos) - set(latest))
        assert not missing, f"videos without a terminal state: {missing}"
    for key, row in latest.items():
        assert row["status"] in TERMINAL, f"{key}: latest state {row['status']!r} is not terminal"
    labelled_events = Counter(e["video_key"] for e in events if e["status"] == "labelled")
    twice = {k: n for k, n in labelled_events.items() if n > 1}
    assert not twice, f"videos labelled more than once: {twice}"
    if one_event_per_video:
        terminal_events = Counter(e["video_key"] for e in events if e["status"] in TERMINAL)
        twice = {k: n for k, n in terminal_events.items() if n > 1}
        assert not twice, f"videos with more than one terminal event: {twice}"

    # committed shards are whole (bytes and hash as their manifest says) and hold each sample once
    manifests = committed_shards(store)
    owner: dict[str, str] = {}
    for manifest in manifests:
        data = store.read_bytes(manifest["shard"])
        assert len(data) == manifest["bytes"], (
            f"{manifest['shard']}: {len(data)} bytes, manifest says {manifest['bytes']}"
        )
        assert hashlib.sha256(data).hexdigest() == manifest["sha256"], f"{manifest['shard']}: content differs"
        keys = [s["key"] for s in read_shard(shard_url(store, manifest["shard"]))]
        assert keys == manifest["samples"], f"{manifest['shard']}: samples {keys} != manifest {manifest['samples']}"
        for key in keys:
            assert key not in owner, f"sample {key} is in two committed shards: {owner[key]} and {manifest['shard']}"
            owner[key] = manifest["shard"]
    # readers see committed shards only; a tar without its manifest is invisible to them
    visible = {ref.url for ref in shard_refs(workspace)}
    assert visible == {store.uri(m["shard"]) for m in manifests if m["count"]}, "readers see uncommitted shards"
    keys = [info.key for info in store.list("")]
    tars = {k for k in keys if k.endswith(".tar")}
    orphans = tars - {k[: -len(".json")] for k in keys if is_manifest(k)}
    assert not any(TMP_MARK in k for k in keys), "a temporary file is listed"

    labelled = {r["sample_key"]: r for r in latest.values() if r["status"] == "labelled"}
    if complete:
        # every committed sample is catalogued (recovery ran) and every labelled row points at its sample
        assert set(labelled) == set(owner), (
            f"catalogued but not committed: {sorted(set(labelled) - set(owner))}; "
            f"committed but not catalogued: {sorted(set(owner) - set(labelled))}"
        )
    for key, row in labelled.items():
        assert owner.get(key) == row["shard_id"], f"{row['video_key']}: catalog says {row['shard_id']}"

    if reference is not None:
        labels = committed_labels(workspace)
        want = reference if complete else {k: v for k, v in reference.items() if k in labels}
        assert labels.keys() == want.keys(), f"labelled {sorted(labels)} but the reference run {sorted(want)}"
        for video, arrays in want.items():
            assert arrays.keys() == labels[video].keys(), f"{video}: fields {sorted(labels[video])}"
            for name, value in arrays.items():
                assert np.array_equal(value, labels[video][name]), f"{video}: {name} differs from the reference run"

    local_tmp = 0
    root = getattr(store, "root", None)  # a LocalStore: count what crashed writers left beside their targets
    if root is not None and root.exists():
        local_tmp = sum(1 for p in root.rglob("*") if TMP_MARK in p.name)
    return {
        "labelled": len(labelled),
        "states": dict(Counter(r["status"] for r in latest.values())),
        "shards": len(manifests),
        "orphan_tars": len(orphans),
        "tmp_files": local_tmp,
    }


# --------------------------------------------------------------------------- a faulty S3 endpoint

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade", "expect", "trailer"}


@dataclass
class Fault:
    """One fault rule of the proxy; the first rule that matches a request and has turns left fires.

    kind: status (answer `status` with S3 error `code`, the server never sees the request),
    delay (hold the request `seconds`, then forward it), drop_before (close the connection, the
    server never sees the request), drop_after (forward, let the server act, close without an
    answer), truncate (forward, send the headers and half the body, close), restart (the server
    goes away for `seconds`: every open connection is cut, new ones are refused).
    method/path: match the HTTP method and a regex searched in the request target.
    times: how often it fires (None: no limit); after: matching requests let through first;
    probability: the chance it fires on a matching request (seeded).
    sticky: once fired, fire on every later request to that same target (a fault that outlasts retries).
    """

    kind: str
    method: str | None = None
    path: str | None = None
    times: int | None = 1
    after: int = 0
    probability: float = 1.0
    status: int = 503
    code: str = "ServiceUnavailable"
    seconds: float = 0.0
    sticky: bool = False
    seen: int = 0
    fired: int = 0
    target: str | None = None


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of an S3 endpoint, injecting `Fault`s."""

    def __init__(self, upstream: str, seed: int = 0):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.rules: list[Fault] = []
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.injected: Counter[str] = Counter()
        self.requests = 0
        self.events: list[tuple[str, str, str]] = []  # (kind, method, target) of each injected fault
        self.port = 0
        self._listener: socket.socket | None = None
        self._down_until = 0.0
        self._connections: set[socket.socket] = set()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        self._listen()
        self._thread = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopped.set()
        if self._thread:
            self._thread.join(5)
        with self.lock:
            listener, self._listener = self._listener, None
            connections = list(self._connections)
        if listener:
            listener.close()
        for conn in connections:
            _shut(conn)

    def add(self, *rules: Fault) -> None:
        with self.lock:
            self.rules.extend(rules)

    def clear(self) -> None:
        with self.lock:
            self.rules = []

    def restart(self, seconds: float) -> None:
        """Cut every open connection and refuse new ones for `seconds` (a server restart, seen from the client)."""
        with self.lock:
            self._down_until = time.monotonic() + seconds
            listener, self._listener = self._listener, None
            connections = list(self._connections)
        if listener:
            listener.close()
        for conn in connections:
            _shut(conn)

    # ----------------------------------------------------------------- serving

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        sock.settimeout(0.05)
        self.port = sock.getsockname()[1]
        with self.lock:
            self._listener = sock

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            listener = self._listener
            if listener is None:
                if time.monotonic() < self._down_until:
                    time.sleep(0.02)
                    continue
                try:
                    self._listen()
                except OSError:
                    time.sleep(0.05)
                continue
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(None)
            with self.lock:
                self._connections.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _pick(self, method: str, target: str) -> Fault | None:
        with self.lock:
            self.requests += 1
            for rule in self.rules:
                if rule.method and rule.method != method:
                    continue
                if rule.sticky and rule.target is not None:
                    if rule.target == target:
                        return self._fire(rule, method, target)
                    continue
                if rule.path and not re.search(rule.path, target):
                    continue
                rule.seen += 1
                if rule.seen <= rule.after or (rule.times is not None and rule.fired >= rule.times):
                    continue
                if rule.probability < 1.0 and self.rng.random() >= rule.probability:
                    continue
                rule.target = target
                return self._fire(rule, method, target)
        return None

    def _fire(self, rule: Fault, method: str, target: str) -> Fault:
        rule.fired += 1
        self.injected[rule.kind] += 1
        self.events.append((rule.kind, method, target))
        return rule

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        upstream: http.client.HTTPConnection | None = None
        try:
            while True:
                request = _read_request(reader, conn)
                if request is None:
                    return
                method, target, headers, body = request
                fault = self._pick(method, target)
                kind = fault.kind if fault else None
                if kind == "restart":
                    self.restart(fault.seconds)
                    return
                if kind in ("drop_before",):
                    return
                if kind == "status":
                    conn.sendall(_error_response(fault.status, fault.code, target))
                    continue
                if kind == "delay":
                    time.sleep(fault.seconds)
                upstream, status, reason, out_headers, data = _forward(
                    upstream, self.upstream, method, target, headers, body
                )
                if kind == "drop_after":
                    return
                head = _response_head(status, reason, out_headers, method, len(data))
                if kind == "truncate" and data:
                    conn.sendall(head + data[: len(data) // 2])
                    return
                conn.sendall(head + data)
                if any(k.lower() == "connection" and v.lower() == "close" for k, v in headers):
                    return
        except (OSError, ValueError, http.client.HTTPException):
            return
        finally:
            with self.lock:
                self._connections.discard(conn)
            _shut(conn)
            if upstream is not None:
                upstream.close()


def _shut(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
    conn.close()


def _read_request(reader, conn: socket.socket):
    line = reader.readline(65537)
    if not line:
        return None
    method, target, _ = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers: list[tuple[str, str]] = []
    while True:
        raw = reader.readline(65537)
        if raw in (b"\r\n", b"\n", b""):
            break
        name, _, value = raw.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    lower = {k.lower(): v for k, v in headers}
    if lower.get("expect", "").lower() == "100-continue":
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    if "chunked" in lower.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size = int(reader.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while reader.readline() not in (b"\r\n", b"\n", b""):
                    pass
                break
            body += reader.read(size)
            reader.readline()
        return method, target, headers, bytes(body)
    length = int(lower.get("content-length", "0") or 0)
    return method, target, headers, reader.read(length) if length else b""


def _forward(upstream, address, method, target, headers, body):
    send = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"]
    for attempt in range(2):  # a kept-alive upstream connection the server closed meanwhile: once more, fresh
        if upstream is None:
            upstream = http.client.HTTPConnection(*address, timeout=60)
        try:
            upstream.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for name, value in send:
                upstream.putheader(name, value)
            if body or method in ("PUT", "POST"):
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body if body else None)
            response = upstream.getresponse()
            data = response.read()
            out = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
            if response.will_close:
                upstream.close()
                upstream = None
            return upstream, response.status, response.reason, out, data
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            upstream.close()
            upstream = None
            if attempt:
                raise
    raise AssertionError("unreachable")


def _response_head(status: int, reason: str, headers: list[tuple[str, str]], method: str, length: int) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"]
    keep_length = method == "HEAD" or status in (204, 304)
    for name, value in headers:
        if name.lower() == "content-length" and not keep_length:
            continue
        lines.append(f"{name}: {value}")
    if not keep_length:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _error_response(status: int, code: str, target: str) -> bytes:
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>injected by the test proxy</Message><Resource>{target}</Resource>"
        f"<RequestId>{uuid.uuid4().hex[:16]}</RequestId></Error>"
    ).encode()
    reason = http.client.responses.get(status, "Error")
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode("latin-1") + body
