"""Storage faults: rounds against the S3 test server behind a fault-injecting proxy (tests/faults.py).

The proxy answers requests with 500 and 503 (SlowDown), holds responses past the client's read
timeout, drops connections before and after the server acted, cuts response bodies short, and
restarts the server mid-round (every connection cut, new ones refused for two seconds; the objects
stay, as on a real S3 or MinIO). The client's retries absorb all of it and the round ends as an
uninterrupted one would. A fault that outlasts every retry fails its batch with a message naming the
round and how to resume; the rest of the round is committed, the batch's claims are given back, and
a rerun completes it with nothing lost.
"""

from __future__ import annotations

import json

import boto3
import pytest
from boto3.exceptions import S3UploadFailedError
from faults import EXPECTED, Fault, FaultProxy, check_invariants, reference_labels, tiny_config, write_bucket

from pseudotrack.config import RoundConfig
from pseudotrack.flows.label_round import BatchesFailed, run_round
from pseudotrack.storage.base import StorageUnavailable
from pseudotrack.storage.s3 import S3Store, is_transient
from pseudotrack.storage.uri import open_store


@pytest.fixture(scope="module")
def fault_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("storage-faults")
    bucket = tmp / "bucket"
    videos = write_bucket(bucket)
    return bucket, videos, reference_labels(str(bucket), str(tmp / "reference"))


def _upload(bucket_dir, s3_uri: str) -> str:
    """The bucket's files into S3, straight to the server (not through the proxy)."""
    name, _, prefix = s3_uri[len("s3://") :].partition("/")
    client = boto3.client("s3")
    for path in sorted(bucket_dir.iterdir()):
        client.upload_file(str(path), name, f"{prefix}/videos/{path.name}")
    return f"{s3_uri}/videos"


def test_transient_faults_are_absorbed(fault_env, s3_uri, s3_server, monkeypatch):
    bucket_dir, videos, reference = fault_env
    bucket = _upload(bucket_dir, s3_uri)
    workspace = f"{s3_uri}/workspace"
    with FaultProxy(s3_server, seed=7) as proxy:
        proxy.add(
            # each kind once at a fixed place, then more at random (seeded)
            Fault("restart", after=40, seconds=2.0),  # the server goes away mid-round
            Fault("delay", after=15, times=2, seconds=2.5),  # past the 1 s read timeout set below
            Fault("truncate", method="GET", after=2),
            Fault("drop_before", after=5),
            Fault("drop_after", method="PUT", after=3),
            Fault("status", status=500, code="InternalError", after=8),
            Fault("status", status=503, code="SlowDown", after=12),
            Fault("status", status=500, code="InternalError", probability=0.08, times=None),
            Fault("status", status=503, code="SlowDown", probability=0.04, times=None),
            Fault("delay", probability=0.05, times=None, seconds=0.3),
            Fault("drop_before", probability=0.04, times=None),
            Fault("drop_after", probability=0.05, times=None),
            Fault("truncate", method="GET", probability=0.1, times=None),
        )
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("PSEUDOTRACK_S3_READ_TIMEOUT", "1")
        summary = run_round(RoundConfig.from_dict(tiny_config(bucket, workspace, "faulty")))
        injected, requests = dict(proxy.injected), proxy.requests
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.delenv("PSEUDOTRACK_S3_READ_TIMEOUT")
    print(f"\nstorage faults injected and absorbed: {sum(injected.values())} of {requests} requests: {injected}")
    assert summary.labelled == EXPECTED["labelled"] and summary.failed == EXPECTED["failed"]
    assert not summary.failed_batches
    # every kind of fault really happened, and the round still ended exactly like the reference
    assert set(injected) == {"restart", "delay", "status", "drop_before", "drop_after", "truncate"}, injected
    assert sum(injected.values()) >= 15
    counts = check_invariants(workspace, videos, reference)
    assert counts["states"] == EXPECTED


def test_fault_outlasting_retries_fails_the_batch_and_a_rerun_resumes(fault_env, s3_uri, s3_server, monkeypatch):
    bucket_dir, videos, reference = fault_env
    bucket = _upload(bucket_dir, s3_uri)
    workspace = f"{s3_uri}/workspace"
    config = RoundConfig.from_dict(tiny_config(bucket, workspace, "outage"))
    with FaultProxy(s3_server) as proxy:
        # the first shard upload keeps failing: every retry of that object gets 503, whatever the client does
        proxy.add(Fault("status", method="PUT", path=r"/shards/.*\.tar$", sticky=True))
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("AWS_RETRY_MODE", "standard")  # fewer, quicker retries: the failure comes in seconds
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
        monkeypatch.setenv("PSEUDOTRACK_S3_OUTAGE_SECONDS", "1.5")
        with pytest.raises(BatchesFailed) as failed:
            run_round(config)
        failing = proxy.injected["status"]
    for name in ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS", "PSEUDOTRACK_S3_OUTAGE_SECONDS"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)

    message = str(failed.value)
    print(f"\nfault outlasting the retries ({failing} refused uploads): {message}")
    assert "round outage: 1 batch(es) failed" in message
    assert "StorageUnavailable" in message and "kept failing" in message and ".tar" in message
    assert "run the round again with --round-id outage to resume" in message
    summary = failed.value.summary
    assert len(summary.failed_batches) == 1 and summary.labelled >= 2
    # what did commit is whole and consistent; the failed batch left no claim behind it
    check_invariants(workspace, videos, reference, complete=False)
    store = open_store(workspace)
    claims = [json.loads(store.read_bytes(info.key)) for info in store.list("claims/")]
    assert claims and all(c["released"] for c in claims)
    saved = json.loads(store.read_bytes("runs/outage/summary.json"))
    assert saved["failed_batches"] == summary.failed_batches

    again = run_round(RoundConfig.from_dict(tiny_config(bucket, workspace, "outage")))
    assert again.labelled == EXPECTED["labelled"] - summary.labelled and not again.failed_batches
    counts = check_invariants(workspace, videos, reference)
    assert counts["states"] == EXPECTED  # videos lost: none


@pytest.mark.parametrize("kind", ["status", "truncate", "drop_after"])
def test_a_listing_broken_between_pages_resumes_after_the_last_key(s3_uri, s3_server, monkeypatch, kind):
    """The client is told not to retry, so the store's outage handling must: from the last key it listed."""
    store = open_store(s3_uri)
    keys = sorted(f"d{i}/v{j:02d}.mp4" for i in range(3) for j in range(10)) + ["d1-x.mp4"]
    for key in keys:
        store.write_bytes(key, key.encode())
    monkeypatch.setattr(S3Store, "page_keys", 4)
    with FaultProxy(s3_server) as proxy:
        proxy.add(Fault(kind, method="GET", path="continuation-token=", status=503, code="SlowDown", after=1, times=3))
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        listed = [info.key for info in store.list()]
        injected = proxy.injected[kind]
    assert injected == 3
    assert listed == sorted(keys)  # nothing twice, nothing missing


def test_transient_and_permanent_errors_are_told_apart():
    from botocore.exceptions import ClientError, EndpointConnectionError, ResponseStreamingError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(ResponseStreamingError(error="connection cut"))
    assert is_transient(client_error("SlowDown", 503)) and is_transient(client_error("InternalError", 500))
    assert not is_transient(client_error("AccessDenied", 403)) and not is_transient(client_error("NoSuchKey", 404))
    assert not is_transient(ValueError("a bug"))
    try:  # s3transfer hides the client's error behind its own; the cause decides
        try:
            raise client_error("ServiceUnavailable", 503)
        except ClientError:
            raise S3UploadFailedError("Failed to upload") from None
    except S3UploadFailedError as wrapped:
        assert not is_transient(wrapped)  # `from None` cut the chain: nothing says it was transient
    try:
        try:
            raise client_error("ServiceUnavailable", 503)
        except ClientError:
            raise S3UploadFailedError("Failed to upload")  # noqa: B904 (as s3transfer does)
    except S3UploadFailedError as wrapped:
        assert is_transient(wrapped)
    assert issubclass(StorageUnavailable, OSError)  # Prefect's batch retry condition takes it as a storage fault
