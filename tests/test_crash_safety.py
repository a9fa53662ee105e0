"""Crash safety: a round SIGKILLed anywhere, then run again, ends as if nothing had happened.

Each case kills a real round process (forked from a warm forkserver, tests/faults.py) the n-th time
it reaches a named checkpoint: after recovery, discovery and planning; per video labelled; mid-tar,
at the tar's close, after its upload (before the manifest that commits it) and after the manifest
(before its catalog events); before and after each catalog file is written; between a temporary
file's write and its rename (every atomic write: config, tars, manifests, catalog, summary); after a
batch recorded everything; before the summary. Right after the kill, what is visible must already be
consistent; after a rerun (same round id, or a new one) every video has exactly one terminal state,
no sample is in two committed shards, no partial shard is visible, the catalog reads cleanly, and the
labels are those of an uninterrupted run with the same seed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from faults import EXPECTED, RoundRunner, check_invariants, reference_labels, tiny_config, write_bucket

pytestmark = pytest.mark.slow

# (checkpoint, n): the n-th time the round reaches it. The counts are those of one uninterrupted round on
# the test bucket (9 videos, 3 batches, 4 shards, 23 atomic writes); a kill that never fires fails its case.
KILLS = [
    ("round.recovered", 1),
    ("round.discovered", 1),
    ("round.planned", 1),
    ("batch.claimed", 1),
    ("video.labelled", 1),
    ("video.labelled", 6),
    ("shard.sample_written", 1),
    ("shard.sample_written", 5),
    ("shard.closed", 1),
    ("shard.closed", 4),
    ("shard.uploaded", 1),
    ("shard.uploaded", 4),
    ("shard.committed", 1),
    ("shard.committed", 4),
    ("catalog.before_write", 1),
    ("catalog.before_write", 5),
    ("catalog.written", 1),
    ("catalog.written", 5),
    ("store.tmp_written", 12),
    ("store.tmp_written", 23),
    ("batch.recorded", 1),
    ("round.summary", 1),
    # the pipelined batch (the default: cpu_workers=None gives CPU worker processes): its process killed while
    # the teacher takes a clip and others are being decoded in a worker or wait for their turn
    ("pipeline.teacher", 1),
    ("pipeline.teacher", 5),
]
# a kill, then a kill of the rerun at a point every run reaches, then the final rerun (with the round id given)
CHAINS = [
    ("video.labelled:3", "round.planned:1", "r"),
    ("shard.committed:2", "store.tmp_written:1", "r-after"),
    ("catalog.written:3", "round.recovered:1", "r"),
]
SURVIVED: list[str] = []


@pytest.fixture(scope="module")
def crash_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash")
    bucket = tmp / "bucket"
    videos = write_bucket(bucket)
    reference = reference_labels(str(bucket), str(tmp / "reference"))
    yield RoundRunner(tmp), str(bucket), videos, reference, tmp
    print(f"\nkill points survived: {len(SURVIVED)} ({', '.join(SURVIVED)})")


def _rerun_and_check(runner, bucket, workspace, round_id, videos, reference, **job) -> dict:
    rerun = runner.run(tiny_config(bucket, workspace, round_id), **job)
    assert rerun.exitcode == 0 and rerun.ok, f"rerun failed: {rerun.error}"
    counts = check_invariants(workspace, videos, reference)
    assert counts["states"] == EXPECTED
    return rerun.summary


@pytest.mark.parametrize(("point", "n"), KILLS, ids=[f"{p}-{n}" for p, n in KILLS])
def test_killed_round_reruns_to_the_same_labels(crash_env, point, n):
    runner, bucket, videos, reference, tmp = crash_env
    workspace = str(tmp / f"ws-{point}-{n}")
    killed = runner.run(tiny_config(bucket, workspace, "r"), kill=f"{point}:{n}")
    assert killed.killed, f"the round was not killed at {point}:{n} (exit code {killed.exitcode}, {killed.error})"
    # consistent right after the kill: whatever is committed is whole, catalogued at most once, and correct
    check_invariants(workspace, videos, reference, complete=False)
    # every fourth case resumes under a new round id: recovery and claim takeover work across rounds too
    round_id = "r" if KILLS.index((point, n)) % 4 != 3 else "r-after"
    summary = _rerun_and_check(runner, bucket, workspace, round_id, videos, reference)
    if point == "shard.committed":  # the manifest was written, its catalog events were not: recovered
        assert summary["recovered"] >= 1
    assert summary["skipped"] == {}, "a dead round's claims blocked its rerun"
    SURVIVED.append(f"{point}:{n}")


@pytest.mark.parametrize(("first", "second", "round_id"), CHAINS)
def test_rerun_killed_again(crash_env, first, second, round_id):
    runner, bucket, videos, reference, tmp = crash_env
    workspace = str(tmp / f"chain-{first}-{second}")
    assert runner.run(tiny_config(bucket, workspace, "r"), kill=first).killed
    check_invariants(workspace, videos, reference, complete=False)
    assert runner.run(tiny_config(bucket, workspace, round_id), kill=second).killed
    check_invariants(workspace, videos, reference, complete=False)
    _rerun_and_check(runner, bucket, workspace, round_id, videos, reference)
    SURVIVED.extend([first, second])


def test_worker_killed_mid_decode(crash_env):
    """A CPU worker SIGKILLed while decoding one video (the kernel's out-of-memory killer): that video alone
    fails with its stage and the signal, the round finishes; a rerun that retries failures labels it as an
    uninterrupted run does."""
    runner, bucket, videos, reference, tmp = crash_env
    workspace = str(tmp / "ws-worker-killed")
    victim = sorted(reference)[1]
    config = tiny_config(bucket, workspace, "r", cpu_workers=1)
    done = runner.run(config, kill=f"worker.decode.{victim}:1")
    assert done.exitcode == 0 and done.ok, done.error
    assert done.summary["failure_reasons"].get("decode: worker crashed (signal SIGKILL)") == 1, done.summary
    assert done.summary["labelled"] == EXPECTED["labelled"] - 1
    others = {key: labels for key, labels in reference.items() if key != victim}
    counts = check_invariants(workspace, videos, others)
    assert counts["states"]["failed"] == EXPECTED["failed"] + 1
    rerun = runner.run(tiny_config(bucket, workspace, "r", cpu_workers=1, retry_failed=True))
    assert rerun.ok, rerun.error
    counts = check_invariants(workspace, videos, reference, one_event_per_video=False)
    assert counts["states"] == EXPECTED
    SURVIVED.append(f"worker.decode.{victim}:1")


@pytest.mark.parametrize("kill", ["shard.uploaded:2", "shard.committed:3"])
def test_killed_round_on_s3(crash_env, kill, s3_uri):
    """An S3 workspace and bucket: a PUT cut by a kill never leaves a visible object; the rest as locally."""
    import os

    import boto3

    runner, bucket_dir, videos, reference, tmp = crash_env
    name, _, prefix = s3_uri[len("s3://") :].partition("/")
    for path in sorted(Path(bucket_dir).iterdir()):
        boto3.client("s3").upload_file(str(path), name, f"{prefix}/videos/{path.name}")
    bucket, workspace = f"{s3_uri}/videos", f"{s3_uri}/workspace"
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    assert runner.run(tiny_config(bucket, workspace, "r"), kill=kill, env=env).killed
    check_invariants(workspace, videos, reference, complete=False)
    _rerun_and_check(runner, bucket, workspace, "r", videos, reference, env=env)
    SURVIVED.append(f"s3:{kill}")


def test_killed_prefect_flow_run(crash_env, prefect_server):
    """The same under a real Prefect flow run (batches as task runs on the flow's thread pool)."""
    runner, bucket, videos, reference, tmp = crash_env
    workspace = str(tmp / "ws-prefect")
    killed = runner.run(tiny_config(bucket, workspace, "r-flow"), kill="shard.committed:2", prefect_api=prefect_server)
    assert killed.killed, killed.error
    check_invariants(workspace, videos, reference, complete=False)
    summary = _rerun_and_check(runner, bucket, workspace, "r-flow", videos, reference, prefect_api=prefect_server)
    assert summary["recovered"] >= 1
    SURVIVED.append("prefect:shard.committed:2")
