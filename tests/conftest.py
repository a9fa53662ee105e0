"""Fixtures shared by the whole suite: real servers, not mocks, started once per session.

- `s3_server` / `s3_uri` / `store`: a real S3 server (SeaweedFS, tests/seaweedfs.py) on free local
  ports, reached through boto3 exactly as production reaches S3 (AWS_ENDPOINT_URL), so no test
  patches boto3; `s3_uri` is a fresh bucket per test; `store` runs a test once on a local directory
  and once on S3.
- `prefect_server`: one `prefect server start` per session (a cold start costs ~15 s here,
  DESIGN.md), with PREFECT_API_URL pointing at it.
- `shared_dir` / `sample_videos`: the real clips in ../shared/videos.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import noop_teacher  # noqa: F401  registers the test-only `noop` teacher in this process
import pytest

REPO = Path(__file__).resolve().parents[1]
# ...and in the processes a test starts (workers import the modules PSEUDOTRACK_TEACHERS names)
os.environ.setdefault("PSEUDOTRACK_TEACHERS", "noop_teacher")
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- shared data


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared folder beside the repository (override with PSEUDOTRACK_SHARED)."""
    path = Path(os.environ.get("PSEUDOTRACK_SHARED") or REPO.parent / "shared")
    assert path.is_dir(), f"shared folder {path} is missing; set PSEUDOTRACK_SHARED to its location"
    return path


@pytest.fixture(scope="session")
def sample_videos(shared_dir: Path) -> list[Path]:
    """The three real clips (apple, bear, cat), sorted by name."""
    videos = sorted((shared_dir / "videos").glob("*.mp4"))
    names = [p.name for p in videos]
    assert {"apple.mp4", "bear.mp4", "cat.mp4"} <= set(names), f"{shared_dir / 'videos'} holds only {names}"
    return videos


# --------------------------------------------------------------------------- S3


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A SeaweedFS S3 server on 127.0.0.1 for the session (tests/seaweedfs.py); the session's AWS settings
    point at it. Yields its endpoint URL."""
    from seaweedfs import S3Server

    with S3Server() as server, pytest.MonkeyPatch.context() as mp:
        for name in S3Server.UNSET:
            mp.delenv(name, raising=False)
        for name, value in server.env.items():
            mp.setenv(name, value)
        yield server.endpoint


@pytest.fixture
def s3_uri(s3_server: str) -> str:
    """`s3://<fresh bucket>/<prefix>` (no trailing slash) on the test server."""
    import boto3

    bucket = f"pt-{uuid.uuid4().hex[:16]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/data"


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's S3 mock on 127.0.0.1, kept for the one thing SeaweedFS cannot do: hold keys with '.' or '..'
    segments or '//', which AWS S3 allows (SeaweedFS keeps objects as files in folders: it refuses the
    first two with InvalidRequest and folds '//' into '/'). Yields its endpoint URL; `moto_s3_uri` points
    the AWS settings at it for one test."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def moto_s3_uri(moto_server: str, monkeypatch, tmp_path) -> str:
    """`s3://<fresh bucket>/data` on moto (see `moto_server` for why), with the AWS settings pointing at it."""
    import boto3

    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    env = {
        "AWS_ENDPOINT_URL": moto_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws-credentials"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    bucket = f"pt-{uuid.uuid4().hex[:16]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/data"


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """The same test against a local directory and an S3 prefix (SeaweedFS, through boto3)."""
    from pseudotrack.storage.uri import open_store

    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return open_store(request.getfixturevalue("s3_uri"))


# --------------------------------------------------------------------------- Prefect


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"prefect server not healthy after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def _drain_prefect_workers() -> None:
    """Flush the log and event workers while the server runs; else they retry at exit for a minute."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        try:
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        except RuntimeError:  # never started
            pass
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[str]:
    """A real Prefect API for the session, in its own process group, stopped by PID. Yields the API URL.

    Started in the foreground of a subprocess: `--background` dies with its CLI (DESIGN.md).
    """
    from prefect import context as prefect_context
    from prefect.context import get_settings_context
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = dict(
        os.environ,
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
    )
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    prefect = Path(sys.executable).with_name("prefect")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_healthy(url, proc, log, timeout=180)
        # Prefect reads its settings once at import; a settings context is what the client consults. It is
        # also made the process-global one (the public `prefect.context.GLOBAL_SETTINGS_CONTEXT`), which a
        # thread started without our context falls back to; the variable is for subprocesses (CLI, workers).
        with (
            pytest.MonkeyPatch.context() as mp,
            temporary_settings({PREFECT_API_URL: url, PREFECT_SERVER_ANALYTICS_ENABLED: False}),
        ):
            mp.setattr(prefect_context, "GLOBAL_SETTINGS_CONTEXT", get_settings_context())
            mp.setenv("PREFECT_API_URL", url)
            mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            try:
                yield url
            finally:
                _drain_prefect_workers()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the group we started: the CLI and anything it spawned
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
