"""The bucket watcher: new or changed videos only, one lease holder at a time, crash-safe state; resumes by id."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pseudotrack import faults
from pseudotrack.cli.main import app
from pseudotrack.config import RoundConfig
from pseudotrack.demo import write_demo_bucket
from pseudotrack.flows.label_round import run_round
from pseudotrack.flows.watch_bucket import (
    LEASE_PREFIX,
    STATE_KEY,
    LeaseBusy,
    WatchLease,
    load_state,
    resume_or_new,
    watch,
)
from pseudotrack.storage.catalog import Catalog
from pseudotrack.storage.claims import HOST
from pseudotrack.storage.uri import open_store

# 5 generated clips: clip_0002 has a caption the filter drops, clip_0003 a .txt sidecar
BUCKET = dict(videos=5, frames=16, height=64, width=96, seed=2, broken=0)
SMALL = dict(
    height=48, width=64, num_frames=8, min_frames=8, num_queries=16, num_keyframes=2, batch_size=2, device="cpu"
)
KEPT = ["clip_0000.mp4", "clip_0001.mp4", "clip_0003.mp4", "clip_0004.mp4"]


@pytest.fixture
def bucket(tmp_path) -> Path:
    root = tmp_path / "bucket"
    write_demo_bucket(root, **BUCKET)
    return root


def config_for(bucket: Path | str, workspace: Path | str, **overrides) -> RoundConfig:
    return RoundConfig(bucket=str(bucket), workspace=str(workspace), **{**SMALL, **overrides})


def labelled_events(workspace) -> Counter:
    """(video key, ETag) -> how many `labelled` events the catalog holds for it."""
    events = Catalog(open_store(str(workspace))).events().to_pylist()
    return Counter((e["video_key"], e["etag"]) for e in events if e["status"] == "labelled")


def round_of(workspace, key: str) -> str:
    rows = {r["video_key"]: r for r in Catalog(open_store(str(workspace))).latest().to_pylist()}
    return rows[key]["round_id"]


# --------------------------------------------------------------------------- killable children


def _child(job: dict) -> None:
    """In a forked child: arm the fault, run a round or a watcher pass, write what it returned."""
    import os

    os.environ.update(job["env"])
    faults.configure_from_env()
    config = RoundConfig.from_dict(job["config"])
    result = watch(config).to_dict() if job["what"] == "watch" else run_round(config).to_dict()
    Path(job["result"]).write_text(json.dumps(result, default=str))


def run_killed(what: str, config: RoundConfig, kill: str, tmp: Path) -> int:
    """Run `what` in a separate process that SIGKILLs itself the n-th time it reaches a checkpoint; its exit code."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pseudotrack.flows.watch_bucket"])  # imported once; each child forks warm
    result = tmp / f"child-{uuid.uuid4().hex}.json"
    job = {"what": what, "config": asdict(config), "env": {faults.POINT_VAR: kill}, "result": str(result)}
    process = ctx.Process(target=_child, args=(job,), daemon=True)
    process.start()
    process.join(120)
    if process.is_alive():
        process.kill()
        raise AssertionError(f"{what} did not finish within 120 s")
    return process.exitcode


# --------------------------------------------------------------------------- new, changed, unchanged, removed


def test_watch_labels_new_and_changed_videos_once_and_unchanged_never(bucket, tmp_path):
    workspace = tmp_path / "ws"
    first = watch(config_for(bucket, workspace))
    assert first.status == "labelled" and first.round_id.startswith("watch-")
    assert (first.new, first.changed, first.unchanged) == (5, 0, 0)
    assert first.round["labelled"] == 4 and first.round["filtered"] == 1
    state = load_state(open_store(str(workspace)))
    assert sorted(state) == sorted(KEPT + ["clip_0002.mp4"]) and state["clip_0002.mp4"]["status"] == "filtered"
    assert first.recorded == 5

    # an unchanged bucket: no round, nothing written to the catalog
    files = Catalog(open_store(str(workspace))).files()
    second = watch(config_for(bucket, workspace))
    assert second.status == "nothing-new" and second.round is None and second.round_id is None
    assert second.unchanged == 5 and "nothing new" in second.message
    assert Catalog(open_store(str(workspace))).files() == files

    # the bucket grows, one video changes, one goes away
    old_etag = state["clip_0000.mp4"]["etag"]
    write_demo_bucket(tmp_path / "more", videos=1, frames=16, height=64, width=96, seed=9, broken=0)
    shutil.copyfile(tmp_path / "more" / "clip_0000.mp4", bucket / "new_clip.mp4")
    shutil.copyfile(bucket / "clip_0004.mp4", bucket / "clip_0000.mp4")
    (bucket / "clip_0001.mp4").unlink()
    third = watch(config_for(bucket, workspace))
    assert (third.new, third.changed, third.removed, third.unchanged) == (1, 1, 1, 3)
    assert third.round["labelled"] == 2 and third.round["reused"] == 0
    assert round_of(workspace, "new_clip.mp4") == third.round_id == round_of(workspace, "clip_0000.mp4")
    assert round_of(workspace, "clip_0003.mp4") == first.round_id  # unchanged: never planned again

    counts = labelled_events(workspace)
    assert set(counts.values()) == {1}, counts  # no (video, version) labelled twice
    assert sum(1 for key, _ in counts if key == "clip_0000.mp4") == 2  # the changed video, once per version
    state = load_state(open_store(str(workspace)))
    assert "clip_0001.mp4" not in state and "new_clip.mp4" in state
    assert state["clip_0000.mp4"]["etag"] != old_etag


# --------------------------------------------------------------------------- overlap


def test_a_second_overlapping_run_exits_at_once_with_the_holder_named(bucket, tmp_path):
    """Two real runs at once: the second finds the first's lease and leaves without touching anything."""
    workspace = tmp_path / "ws"
    config = config_for(bucket, workspace)
    outcome: dict = {}
    faults.configure_from_env({faults.PAUSE_VAR: "round.discovered:2"})  # the first run stays inside its round
    try:
        first = threading.Thread(target=lambda: outcome.update(first=watch(config)))
        first.start()
        store = open_store(str(workspace))
        deadline = time.monotonic() + 60
        while not any(store.list(LEASE_PREFIX)) and time.monotonic() < deadline:
            time.sleep(0.05)
        second = watch(config_for(bucket, workspace))
        first.join(120)
    finally:
        faults.configure_from_env({})
    assert second.status == "busy" and second.round is None
    assert "another watch run holds the lease since" in second.message
    assert outcome["first"].status == "labelled" and second.round_id == outcome["first"].round_id
    assert set(labelled_events(workspace).values()) == {1} and len(labelled_events(workspace)) == 4


def _lease_doc(generation: int, **fields) -> bytes:
    now = time.time()
    doc = {
        "generation": generation,
        "round_id": "watch-old",
        "token": "t",
        "host": "another-machine",
        "pid": 1,
        "acquired_at": now - 60,
        "expires_at": now + 600,
        "released": False,
    }
    doc.update(fields)
    return json.dumps(doc).encode()


def test_lease_exactly_one_of_racing_runs_wins(store):
    """Eight runs race for a fresh lease on a disk and on S3 (create_exclusive): one holds it, seven are told who."""
    leases = [WatchLease(store, 30) for _ in range(8)]
    barrier = threading.Barrier(len(leases))
    outcomes: list = [None] * len(leases)

    def race(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = leases[i].acquire(lambda previous: f"r{i}")
        except LeaseBusy as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(leases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [o for o in outcomes if isinstance(o, dict)]
    assert len(winners) == 1, outcomes
    busy = [o for o in outcomes if isinstance(o, LeaseBusy)]
    assert len(busy) == 7 and all(b.doc["round_id"] == winners[0]["round_id"] for b in busy)
    holder = next(lease for lease in leases if lease.generation is not None)
    holder.release(finished=True)
    # released: the next run takes the next generation and starts a new round
    after = WatchLease(store, 30)
    doc = after.acquire(resume_or_new)
    assert doc["generation"] == 1 and doc["round_id"].startswith("watch-")
    after.release(finished=True)


def test_lease_of_a_live_holder_elsewhere_blocks_until_it_expires(tmp_path):
    store = open_store(str(tmp_path / "ws"))
    store.create_exclusive(f"{LEASE_PREFIX}00000000.json", _lease_doc(0))
    with pytest.raises(LeaseBusy, match="another watch run holds the lease since .*watch-old"):
        WatchLease(store).acquire(resume_or_new)
    # the holder on the other machine stopped renewing: once expired, the lease and its unfinished round pass on
    store.write_bytes(f"{LEASE_PREFIX}00000000.json", _lease_doc(0, expires_at=time.time() - 1))
    lease = WatchLease(store)
    doc = lease.acquire(resume_or_new)
    assert doc["generation"] == 1 and doc["round_id"] == "watch-old"
    assert lease.holds()
    # a holder that was frozen past its expiry finds the newer generation and stops (no state written)
    frozen = WatchLease(store)
    frozen.generation, frozen.doc = 0, json.loads(_lease_doc(0))
    assert not frozen.holds()
    lease.release(finished=False)
    # released unfinished: the next run resumes that round; released finished: a new one
    nxt = WatchLease(store)
    assert nxt.acquire(resume_or_new)["round_id"] == "watch-old"
    nxt.release(finished=True)
    last = WatchLease(store)
    assert last.acquire(resume_or_new)["round_id"] != "watch-old"
    last.release(finished=True)


def test_lease_of_a_dead_process_on_this_machine_is_taken_at_once(tmp_path):
    store = open_store(str(tmp_path / "ws"))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    store.create_exclusive(f"{LEASE_PREFIX}00000000.json", _lease_doc(0, host=HOST, pid=gone.pid))
    lease = WatchLease(store)
    doc = lease.acquire(resume_or_new)
    assert doc["generation"] == 1 and doc["round_id"] == "watch-old"
    lease.release(finished=True)


# --------------------------------------------------------------------------- crashes and resumes


def test_a_watch_run_killed_mid_round_is_resumed_by_the_next_run(bucket, tmp_path):
    """SIGKILL after the first batch is recorded: the state stays as it was, the next run (the dead
    holder's lease is free at once) resumes the same round and labels only the rest."""
    workspace = tmp_path / "ws"
    config = config_for(bucket, workspace)
    assert run_killed("watch", config, "batch.recorded:1", tmp_path) == -signal.SIGKILL
    store = open_store(str(workspace))
    assert not store.exists(STATE_KEY)  # advanced only after the round
    crashed_round = json.loads(store.read_bytes(f"{LEASE_PREFIX}00000000.json"))["round_id"]
    assert sum(labelled_events(workspace).values()) == 2  # the first batch committed

    resumed = watch(config)
    assert resumed.status == "labelled" and resumed.round_id == crashed_round
    assert resumed.round["reused"] == 2 and resumed.round["labelled"] == 2
    counts = labelled_events(workspace)
    assert len(counts) == 4 and set(counts.values()) == {1}
    assert sorted(load_state(store)) == sorted(KEPT + ["clip_0002.mp4"])


def test_an_interrupted_round_resumed_by_id_labels_only_the_rest(bucket, tmp_path, prefect_server):
    """`pseudotrack round --round-id X` after X was killed: the committed batch is reused, the rest labelled."""
    workspace = tmp_path / "ws"
    config = config_for(bucket, workspace, round_id="resume-me")
    assert run_killed("round", config, "batch.recorded:1", tmp_path) == -signal.SIGKILL
    assert sum(labelled_events(workspace).values()) == 2
    args = ["round", "--bucket", str(bucket), "--workspace", str(workspace), "--round-id", "resume-me"]
    args += ["--height", "48", "--width", "64", "--frames", "8", "--queries", "16", "--keyframes", "2"]
    args += ["--batch-size", "2", "--device", "cpu"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "2 already done" in result.output  # the progress line of the resumed round
    counts = labelled_events(workspace)
    assert len(counts) == 4 and set(counts.values()) == {1}
    assert {round_of(workspace, k) for k in KEPT} == {"resume-me"}


def test_watch_command_runs_the_flow_and_reports_a_busy_lease(bucket, tmp_path, prefect_server):
    workspace = tmp_path / "ws"
    args = ["watch", "--bucket", str(bucket), "--workspace", str(workspace)]
    args += ["--height", "48", "--width", "64", "--frames", "8", "--queries", "16", "--keyframes", "2"]
    args += ["--batch-size", "2", "--device", "cpu"]
    runner = CliRunner()
    result = runner.invoke(app, args, env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "watch: labelled" in result.output and "5 new" in result.output
    result = runner.invoke(app, args, env={"COLUMNS": "160"})
    assert result.exit_code == 0 and "watch: nothing-new" in result.output, result.output

    holder = WatchLease(open_store(str(workspace)))
    holder.acquire(lambda previous: "held-by-test")
    try:
        result = runner.invoke(app, args, env={"COLUMNS": "160"})
    finally:
        holder.release(finished=True)
    assert result.exit_code == 0, result.output
    assert "another watch run holds the lease since" in result.output and "held-by-test" in result.output
