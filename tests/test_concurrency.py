"""Concurrency: rounds writing one workspace at once corrupt nothing and label nothing twice.

Two round processes plan the same videos (they wait for each other right after planning, so every
video is contested) and race; per-video claims (storage/claims.py) hand each video to exactly one of
them, the other reports it as claimed. The claim rules are checked on their own too: racing claimers,
a live holder, an expired lease, a dead holder on this machine, renewal during a long batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import boto3
import pytest
from faults import EXPECTED, RoundRunner, check_invariants, reference_labels, tiny_config, write_bucket

from pseudotrack.storage.claims import HOST, ClaimSet, claim_prefix, generation_key, why_free


@dataclass(frozen=True)
class Video:
    key: str
    etag: str = "e1"


VIDEOS = [Video(f"clip {i}.mp4") for i in range(6)]


def _foreign_claim(store, video: Video, **fields) -> None:
    doc = {"round_id": "elsewhere", "token": "t", "host": "another-machine", "pid": 1, "released": False}
    doc.update(fields)
    assert store.create_exclusive(generation_key(claim_prefix(video.key, video.etag), 0), json.dumps(doc).encode())


def test_racing_batches_get_each_video_once(store):
    sets = [ClaimSet(store, f"round{i}", f"b{i}", lease_seconds=60) for i in range(6)]
    start = threading.Barrier(len(sets))

    def take(claims: ClaimSet) -> list[Video]:
        claims.__enter__()
        start.wait()
        return claims.acquire(VIDEOS)

    with ThreadPoolExecutor(len(sets)) as pool:
        got = list(pool.map(take, sets))
    assert Counter(v.key for mine in got for v in mine) == {v.key: 1 for v in VIDEOS}
    owner = {v.key: claims.round_id for claims, mine in zip(sets, got, strict=True) for v in mine}
    for claims, mine in zip(sets, got, strict=True):
        for video in set(VIDEOS) - set(mine):
            assert claims.skipped[video.key] == f"claimed by round {owner[video.key]}"
    for claims in sets:
        claims.__exit__(None, None, None)
    # released: the next batch takes every video over, each at generation 1
    with ClaimSet(store, "later", "b", lease_seconds=60) as later:
        assert later.acquire(VIDEOS) == VIDEOS and later.took_over == len(VIDEOS)
        assert all(h.generation == 1 for h in later.held.values())


def test_stale_claims_pass_to_exactly_one_taker(store):
    live, expiring, dead = VIDEOS[:3]
    expiry = time.time() + 3.0
    _foreign_claim(store, live, expires_at=time.time() + 3600)
    _foreign_claim(store, expiring, expires_at=expiry)
    gone = subprocess.Popen(["true"])
    gone.wait()
    _foreign_claim(store, dead, host=HOST, pid=gone.pid, expires_at=time.time() + 3600)

    with ClaimSet(store, "mine", "b0", lease_seconds=60) as claims:
        # a holder on this machine whose process is gone is recognised at once; the others hold
        assert claims.acquire([live, expiring, dead]) == [dead]
        assert claims.skipped == {live.key: "claimed by round elsewhere", expiring.key: "claimed by round elsewhere"}
        assert claims.held[dead.key].generation == 1

    time.sleep(max(0.0, expiry + 0.1 - time.time()))  # the lease runs out: of six racing takers one wins
    sets = [ClaimSet(store, f"taker{i}", f"b{i}", lease_seconds=60) for i in range(6)]
    start = threading.Barrier(len(sets))

    def take(claims: ClaimSet) -> list[Video]:
        claims.__enter__()
        start.wait()
        return claims.acquire([expiring, live])

    with ThreadPoolExecutor(len(sets)) as pool:
        got = list(pool.map(take, sets))
    winners = [claims for claims, mine in zip(sets, got, strict=True) if mine == [expiring]]
    assert len(winners) == 1 and all(mine in ([], [expiring]) for mine in got)
    assert winners[0].held[expiring.key].generation == 1
    for claims in sets:
        assert claims.skipped[live.key] == "claimed by round elsewhere"
        claims.__exit__(None, None, None)


def test_claims_are_renewed_while_a_batch_runs(store):
    video = VIDEOS[0]
    with ClaimSet(store, "long", "b0", lease_seconds=1.2) as long_batch:
        assert long_batch.acquire([video]) == [video]
        time.sleep(3.0)  # two and a half leases: only renewal (every quarter lease) keeps it
        with ClaimSet(store, "other", "b1", lease_seconds=1.2) as other:
            assert other.acquire([video]) == []
            assert other.skipped == {video.key: "claimed by round long"}
        assert long_batch.holds(video.key)
    doc = json.loads(store.read_bytes(generation_key(claim_prefix(video.key, video.etag), 0)))
    assert doc["released"] and why_free(doc) == "released"


@pytest.fixture(scope="module")
def round_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("concurrency")
    bucket = tmp / "bucket"
    videos = write_bucket(bucket)
    return RoundRunner(tmp), bucket, videos, reference_labels(str(bucket), str(tmp / "reference")), tmp


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_two_rounds_at_once(round_env, backend, request):
    runner, bucket_dir, videos, reference, tmp = round_env
    env = {}
    if backend == "local":
        bucket, workspace = str(bucket_dir), str(tmp / "ws-local")
    else:
        s3_uri = request.getfixturevalue("s3_uri")
        name, _, prefix = s3_uri[len("s3://") :].partition("/")
        for path in sorted(bucket_dir.iterdir()):
            boto3.client("s3").upload_file(str(path), name, f"{prefix}/videos/{path.name}")
        bucket, workspace = f"{s3_uri}/videos", f"{s3_uri}/workspace"
        env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    # both wait after planning until the other has planned too, so both planned every video
    env["PSEUDOTRACK_FAULT_BARRIER"] = f"round.planned:{tmp / f'barrier-{backend}'}:2"
    env["PSEUDOTRACK_FAULT_PAUSE"] = "video.labelled:0.05"
    handles = [runner.start(tiny_config(bucket, workspace, name), env=env) for name in ("round-a", "round-b")]
    results = [runner.wait(h) for h in handles]
    for result in results:
        assert result.exitcode == 0 and result.ok, result.error
    a, b = (r.summary for r in results)
    print(
        f"\n{backend}: round-a labelled {a['labelled']} skipped {a['skipped']}; "
        f"round-b labelled {b['labelled']} skipped {b['skipped']}"
    )
    # every planned video (six good ones, one broken) was done by exactly one round and left by the other
    assert a["planned"] == b["planned"] == EXPECTED["labelled"] + EXPECTED["failed"]
    assert a["labelled"] + b["labelled"] == EXPECTED["labelled"]
    assert a["failed"] + b["failed"] == EXPECTED["failed"]
    assert sum(a["skipped"].values()) + sum(b["skipped"].values()) == a["planned"]
    for mine, other in ((a, "round-b"), (b, "round-a")):
        assert set(mine["skipped"]) <= {f"claimed by round {other}", "recorded meanwhile by another run"}
    # both recorded the caption filter's verdicts (the same fact twice); nothing was labelled twice
    counts = check_invariants(workspace, videos, reference, one_event_per_video=False)
    assert counts["states"] == EXPECTED
