"""Discovery, caption filtering and planning of a 100,000-video round, locally and on S3 (moto).

    /work/venv/bin/python bench/bench_planning.py                         # 100k videos, local and S3
    /work/venv/bin/python bench/bench_planning.py --videos 20000 --stores local
    /work/venv/bin/python bench/bench_planning.py --stores s3 --moto-timestamps fast   # moto's own cost off

The bucket holds tiny fake `.mp4` objects (planning never opens a video) in 100
folders, a `captions.jsonl` manifest for most of them and `.txt` sidecars for
`--sidecar-fraction` of them, with a third of the captions ones the filter
drops. Building the bucket (and uploading it to the S3 server) is timed
separately: it is not part of the target.

The planning itself runs in a fresh subprocess per store, so its peak memory
(ru_maxrss) is the planner's own, imports included; it does what `run_round`
does before the first label batch: list the bucket, read the catalog's done
set and start the caption stage (while listing: the manifest is read and
judged, sidecars are read as pages arrive), walk the videos in stable order
through the caption filter, record the filter verdicts in the catalog, cut the
batches. A second pass over the same
workspace (everything planned already recorded as filtered) shows a re-run.

Targets (issue 6): under 60 s and 2 GB for 100,000 videos.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

KEPT = ["A dog runs across a park.", "A woman walks her bicycle.", "Two children play catch.", "A horse trots."]
DROPPED = ["An animated cartoon fox.", "Time-lapse of clouds.", "Waves crash on a beach.", "A campfire burns."]
FAKE_MP4 = b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 48


def bucket_objects(videos: int, sidecar_fraction: float) -> tuple[list[tuple[str, bytes]], int]:
    """(key, bytes) of every object of the bucket, and how many videos the filter keeps."""
    objects: list[tuple[str, bytes]] = []
    manifest: list[str] = []
    every = round(1 / sidecar_fraction) if sidecar_fraction > 0 else 0
    kept = 0
    for i in range(videos):
        key = f"folder{i % 100:02d}/video_{i:07d}.mp4"
        caption = DROPPED[i % len(DROPPED)] if i % 3 == 2 else KEPT[i % len(KEPT)]
        kept += i % 3 != 2
        objects.append((key, FAKE_MP4))
        if every and i % every == 0:
            objects.append((key[: -len(".mp4")] + ".txt", caption.encode()))
        else:
            manifest.append(json.dumps({"file": key, "caption": caption}))
    objects.append(("captions.jsonl", ("\n".join(manifest) + "\n").encode()))
    return objects, kept


def build_local(root: Path, objects: list[tuple[str, bytes]]) -> None:
    for key, data in objects:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def build_s3(uri: str, objects: list[tuple[str, bytes]], threads: int = 32) -> None:
    from pseudotrack.storage.s3 import s3_client
    from pseudotrack.storage.uri import open_store, split_s3_uri

    bucket, _ = split_s3_uri(uri)
    s3_client().create_bucket(Bucket=bucket)
    store = open_store(uri)
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(lambda kv: store.write_bytes(*kv), objects, chunksize=256):
            pass


def plan_once(bucket_uri: str, workspace_uri: str) -> dict:
    """Everything `run_round` does before its first label batch, timed stage by stage."""
    import resource

    from pseudotrack.config import RoundConfig
    from pseudotrack.flows.label_round import plan_round, start_captions
    from pseudotrack.storage.catalog import Catalog
    from pseudotrack.storage.uri import open_workspace
    from pseudotrack.tasks.discover import batches, discover

    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    config = RoundConfig(bucket=bucket_uri, workspace=workspace_uri, round_id="bench-plan")
    stages: dict[str, dict[str, float]] = {}
    server = int(os.environ.get("BENCH_SERVER_PID", "0"))
    started = time.perf_counter()

    def stage(name: str, since: tuple[float, float, float]) -> tuple[float, float, float]:
        now = (time.perf_counter(), time.process_time(), server_cpu(server))
        stages[name] = {"wall": now[0] - since[0], "cpu": now[1] - since[1], "server_cpu": now[2] - since[2]}
        return now

    t = (time.perf_counter(), time.process_time(), server_cpu(server))
    bucket, workspace = open_workspace(config)
    catalog = Catalog(workspace)
    with start_captions(config, bucket) as captions, ThreadPoolExecutor(1) as pool:  # as run_round does
        done_set = pool.submit(catalog.done)
        discovery = discover(bucket, on_page=captions.add)
        done = done_set.result()
        t = stage("list (+ done set, captions)", t)
        planned, rows, reused = plan_round(config, bucket, discovery.videos, discovery.all_keys, done, captions)
        t = stage("caption filter + plan", t)
    if rows:
        catalog.append([dict(r, round_id=config.round_id, batch_id="plan") for r in rows])
    work = batches(planned, config.batch_size)
    stage("record verdicts + batches", t)
    total = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "videos": len(discovery.videos),
        "planned": len(planned),
        "recorded": len(rows),
        "reused": reused,
        "batches": len(work),
        "seconds": total,
        "stages": stages,
        "peak_rss_mb": peak_mb,
        "rss_after_imports_mb": baseline_mb,
    }


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system) the S3 server process has used; 0 when there is none."""
    if not pid:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_child(bucket_uri: str, workspace_uri: str, env: dict) -> dict:
    """One planning pass in a fresh interpreter, so ru_maxrss is this pass's peak alone."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[3]); import bench_planning as b; "
        "print('RESULT ' + json.dumps(b.plan_once(sys.argv[1], sys.argv[2])))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, bucket_uri, workspace_uri, str(Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"planning pass failed:\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# moto 5.2 formats each key's LastModified as text, then its response serializer parses that text back
# with dateutil, once a key: a third of moto's CPU for a listing (a profile of its app in process). With
# --moto-timestamps fast the server parses ISO 8601 text with datetime.fromisoformat instead (the same
# datetime, anything else still goes to botocore's parser): a diagnostic of what the planning costs when
# the test server is not the bottleneck, never the default and never in the tests.
FAST_TIMESTAMPS = """
import datetime, sys
import botocore.utils, moto.core.serialize as serialize
stock = botocore.utils.parse_to_aware_datetime
def parse(value):
    if isinstance(value, str) and "T" in value:
        try:
            parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return stock(value)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)
    return stock(value)
serialize.parse_to_aware_datetime = parse
from moto.server import main
main(sys.argv[1:])
"""


def start_moto(home: Path, timestamps: str = "stock") -> tuple[subprocess.Popen, dict]:
    """`moto_server` on 127.0.0.1 in its own process group; the environment that points boto3 at it."""
    port = free_port()
    moto = Path(sys.executable).with_name("moto_server")
    command = [str(moto)] if timestamps == "stock" else [sys.executable, "-c", FAST_TIMESTAMPS]
    proc = subprocess.Popen(
        [*command, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    env = dict(
        os.environ,
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
        AWS_CONFIG_FILE=str(home / "aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(home / "aws-credentials"),
    )
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        env.pop(name, None)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, env
        except OSError:
            time.sleep(0.2)
    stop(proc)
    raise RuntimeError("moto_server did not start within 30 s")


def report(name: str, result: dict) -> None:
    ok = result["seconds"] < 60 and result["peak_rss_mb"] < 2048
    print(
        f"  {name}: {result['videos']} videos -> {result['planned']} planned, {result['recorded']} verdicts "
        f"recorded, {result['reused']} reused, {result['batches']} batches"
    )
    print(
        f"    {result['seconds']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB "
        f"(after imports {result['rss_after_imports_mb']:.0f} MB)  [{'within' if ok else 'MISSES'} 60 s / 2 GB]"
    )
    print(f"      {'stage':<28} {'wall':>8} {'our CPU':>8} {'S3 server CPU':>14}")
    for stage, t in result["stages"].items():
        server = f"{t['server_cpu']:13.1f}s" if t["server_cpu"] else f"{'-':>14}"
        print(f"      {stage:<28} {t['wall']:7.2f}s {t['cpu']:7.2f}s {server}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=100_000)
    parser.add_argument("--sidecar-fraction", type=float, default=0.01, help="videos captioned by a .txt sidecar")
    parser.add_argument("--stores", default="local,s3", help="local, s3 or both (comma-separated)")
    parser.add_argument("--upload-threads", type=int, default=32)
    parser.add_argument(
        "--moto-timestamps",
        choices=("stock", "fast"),
        default="stock",
        help="fast: the S3 server parses ISO timestamps without dateutil (a diagnostic, see FAST_TIMESTAMPS)",
    )
    args = parser.parse_args()
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]

    objects, kept = bucket_objects(args.videos, args.sidecar_fraction)
    print(f"bucket: {args.videos} videos ({kept} with captions the filter keeps), {len(objects)} objects")
    tmp = Path(tempfile.mkdtemp(prefix="bench-planning-"))
    moto = None
    try:
        for name in stores:
            if name == "local":
                t = time.perf_counter()
                build_local(tmp / "bucket", objects)
                print(f"\nlocal: wrote the bucket in {time.perf_counter() - t:.1f} s (not part of the target)")
                env = dict(os.environ)
                bucket_uri, workspace_uri = str(tmp / "bucket"), str(tmp / "ws-local")
            elif name == "s3":
                moto, env = start_moto(tmp, args.moto_timestamps)
                env["BENCH_SERVER_PID"] = str(moto.pid)
                uri = f"s3://bench-{uuid.uuid4().hex[:8]}/bucket"
                t = time.perf_counter()
                code = (
                    "import sys; sys.path.insert(0, sys.argv[1]); import bench_planning as b; "
                    "b.build_s3(sys.argv[2], b.bucket_objects(int(sys.argv[3]), float(sys.argv[4]))[0], "
                    "int(sys.argv[5]))"
                )
                subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        code,
                        str(Path(__file__).parent),
                        uri,
                        str(args.videos),
                        str(args.sidecar_fraction),
                        str(args.upload_threads),
                    ],
                    env=env,
                    check=True,
                )
                seconds = time.perf_counter() - t
                print(
                    f"\ns3 (moto_server on 127.0.0.1, {args.moto_timestamps} timestamps): "
                    f"uploaded {len(objects)} objects in {seconds:.1f} s "
                    f"({len(objects) / seconds:.0f} objects/s, {args.upload_threads} threads; not part of the target)"
                )
                bucket_uri, workspace_uri = uri, uri.rsplit("/", 1)[0] + "/workspace"
            else:
                parser.error(f"unknown store {name!r}: use local or s3")
            first = run_child(bucket_uri, workspace_uri, env)
            report("first plan (empty catalog)", first)
            again = run_child(bucket_uri, workspace_uri, env)
            report("re-plan (verdicts already in the catalog)", again)
    finally:
        try:
            if moto is not None:
                stop(moto)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it if it lingers (moto_server can ignore SIGTERM for a while)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
