"""Orchestration overhead per video with the no-op teacher: in process and through the `gpu` pool.

Usage: python bench/bench_orchestration.py [--videos 2048] [--batch-size 512] [--pool-limit 1]
                                          [--query-seconds 1] [--skip-pool] [--keep]
                                          [--database sqlite|postgres]

Overhead is what a round costs beyond labelling its videos:

    overhead per video = (round wall time - time inside per-video work) / videos

where per-video work is the labelling stages each batch times for its videos
(read, decode, queries, teacher, encode, shard writing), summed over batches.
Everything else counts as overhead: the Prefect flow and task runs, discovery,
caption filtering and planning, catalog appends, and through the pool the
flow-run submissions, the worker's polling, each child's process start and
the round's polling of its children. The teacher is `noop` (queries held still,
visible), so the work is the pipeline around the teachers, not the tracking.

The round runs against a real `prefect server start` on 127.0.0.1 (its own
PREFECT_HOME under a temporary folder), on its default SQLite database or, with
`--database postgres`, on a throwaway PostgreSQL cluster (initdb, trust auth,
127.0.0.1; the database Prefect recommends for production servers, with no
single write lock). In process: `--executor local`, one
batch at a time. Through the pool: `prefect deploy --name label-batch` from
this repository's prefect.yaml, a process work pool `gpu` whose concurrency
limit is `--pool-limit`, one stock worker polling every `--query-seconds`
(`prefect worker start --pool gpu`, a fresh Python process per batch, as in
production), and `--executor pool`. With `--pool-limit 1` batches run
one after another, so wall minus work is exactly the overhead; with a higher
limit batches overlap and the figure is an effective overhead per video of
the whole round.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pseudotrack.config import POOL_BATCH_SIZE

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
WORK_STAGES = ("read", "decode", "queries", "teacher", "encode", "shard")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_postgres(home: Path) -> tuple[subprocess.Popen, str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (trust auth) and the server's connection URL for it.

    PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres` user.
    """
    data = home / "pgdata"
    data.mkdir(parents=True)
    as_user: list[str] = []
    if os.geteuid() == 0:
        home.parent.chmod(0o711)  # mkdtemp's 0700 would keep the postgres user out
        shutil.chown(home, "postgres")
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    bindir = Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip())
    subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(data), "--auth=trust", "-U", "prefect", "-E", "UTF8"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    port = free_port()
    with open(home / "postgres.log", "wb") as log:
        proc = subprocess.Popen(
            [*as_user, str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(data)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while subprocess.run(
        [str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, check=False
    ).returncode:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"postgres did not start: {(home / 'postgres.log').read_text()[-2000:]}")
        time.sleep(0.3)
    subprocess.run(
        [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "prefect"], check=True
    )
    return proc, f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect"


def start_server(home: Path, database: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = dict(
        os.environ,
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=database,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
    )
    env.pop("PREFECT_API_URL", None)
    prefect = str(Path(sys.executable).with_name("prefect"))
    with open(home / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("prefect server did not become healthy in 180 s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


READY = "started"  # the stock worker's line once it polls
TICK = os.sysconf("SC_CLK_TCK")


def group_cpu(pgid: int) -> float:
    """CPU seconds of a process group: its live members and the children they reaped (Linux /proc)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid:  # after ')': state, ppid, pgrp, ...; utime is the 14th field of stat
            total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return total / TICK


def own_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def wait_for_line(path: Path, text: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited: {path.read_text()[-2000:]}")
        if text in path.read_text():
            return
        time.sleep(0.3)
    raise RuntimeError(f"worker not ready in {timeout:.0f} s: {path.read_text()[-2000:]}")


def make_bucket(root: Path, videos: int) -> None:
    """`videos` copies of one generated clip (distinct keys), all kept by the caption filter."""
    from pseudotrack.demo import write_video
    from pseudotrack.synthetic import render_scene

    root.mkdir(parents=True)
    scene = render_scene(seed=0, num_frames=24, height=120, width=160)
    write_video(scene.frames, root / "clip_00000.mp4")
    for i in range(1, videos):
        shutil.copyfile(root / "clip_00000.mp4", root / f"clip_{i:05d}.mp4")


def round_config(bucket: Path, workspace: Path, round_id: str, batch_size: int, executor: str):
    from pseudotrack.config import RoundConfig

    return RoundConfig(
        bucket=str(bucket),
        workspace=str(workspace),
        round_id=round_id,
        teachers=["noop"],
        batch_size=batch_size,
        executor=executor,
        missing_caption="keep",
        height=96,
        width=128,
        num_frames=16,
        min_frames=8,
        num_queries=64,
        num_keyframes=4,
    )


def timed_round(config) -> dict:
    from pseudotrack.flows.label_round import run_label_round_flow

    started = time.perf_counter()
    summary = run_label_round_flow(config)
    wall = time.perf_counter() - started
    assert summary["labelled"] == summary["planned"], summary
    work = sum(summary["stage_seconds"].get(stage, 0.0) for stage in WORK_STAGES)
    batches = -(-summary["planned"] // config.batch_size)
    return {"wall": wall, "work": work, "videos": summary["planned"], "batches": batches}


def batch_timeline(round_id: str, workspace: Path) -> None:
    """Where a batch run's time goes, as the server recorded it (medians over the round's batch runs):
    queued (Scheduled -> Pending, a worker took it), start-up (Pending -> Running: the fresh process, its
    imports and the flow's load), running beyond the batch's own per-video work, and Completed -> the
    next run's Pending."""
    import json
    import statistics

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    from pseudotrack.flows.label_batch import round_tag, split_run_name

    rows = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[round_tag(round_id)])))
        for run in runs:
            states = sorted(client.read_flow_run_states(run.id), key=lambda st: st.timestamp)
            first = {}
            for st in states:
                first.setdefault(st.type.value, st.timestamp)
            batch_id = split_run_name(run.name)[0].rsplit("-", 1)[1]
            tally = json.loads((workspace / "runs" / round_id / "batches" / f"{batch_id}.json").read_text())
            work = sum(tally["stage_seconds"].get(stage, 0.0) for stage in WORK_STAGES)
            rows.append((first["SCHEDULED"], first["PENDING"], first["RUNNING"], first["COMPLETED"], work))
    rows.sort()
    queued = [(p - s).total_seconds() for s, p, _, _, _ in rows]
    start_up = [(r - p).total_seconds() for _, p, r, _, _ in rows]
    beyond = [(c - r).total_seconds() - w for _, _, r, c, w in rows]
    handover = [(nxt[1] - cur[3]).total_seconds() for cur, nxt in zip(rows, rows[1:], strict=False)]
    med = statistics.median
    print(
        f"  per batch run (median of {len(rows)}): queued {med(queued):.2f} s, start-up {med(start_up):.2f} s, "
        f"running beyond its videos' work {med(beyond):.2f} s"
        + (f", Completed -> next Pending {med(handover):.2f} s" if handover else "")
    )


def report(name: str, figures: dict, parallel: int = 1) -> None:
    overhead = figures["wall"] - figures["work"] / parallel
    per_video = 1000 * overhead / figures["videos"]
    print(
        f"{name:<34} {figures['videos']:>5} videos {figures['batches']:>3} batches  wall {figures['wall']:7.2f} s  "
        f"work {figures['work']:7.2f} s  overhead {overhead:7.2f} s = {per_video:6.1f} ms/video"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=2048)
    parser.add_argument(
        "--batch-size", type=int, default=POOL_BATCH_SIZE, help="videos per batch (default: the pool's default)"
    )
    parser.add_argument("--pool-limit", type=int, default=1, help="concurrency limit of the gpu pool")
    parser.add_argument("--skip-pool", action="store_true", help="only the in-process figure")
    parser.add_argument("--skip-local", action="store_true", help="only the pool's figure (after a warm-up round)")
    parser.add_argument("--query-seconds", type=float, default=1.0, help="how often the worker polls")
    parser.add_argument(
        "--database",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="the server's database: its default SQLite file, or a throwaway PostgreSQL cluster (needs pg_config)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, workspaces)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    home = tmp / "prefect-home"
    home.mkdir()
    database, postgres = f"sqlite+aiosqlite:///{home / 'prefect.db'}", None
    if args.database == "postgres":
        postgres, database = start_postgres(tmp / "postgres")
    server, url = start_server(home, database)
    worker = None
    try:
        # the test-only `noop` teacher (tests/noop_teacher.py), registered here and in every worker
        sys.path.insert(0, str(TESTS))
        os.environ.update(
            PSEUDOTRACK_TEACHERS="noop_teacher",
            PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
            PREFECT_API_URL=url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_LOGGING_LEVEL="WARNING",
            PREFECT_HOME=str(home),
        )
        bucket = tmp / "bucket"
        make_bucket(bucket, args.videos)
        print(f"prefect server {url}; {args.videos} videos of 24 frames 120x160, clips 16x96x128, 64 queries, noop")

        # warm-up on a few of the clips: imports, the flow's first registration, decoder and teacher set-up
        make_bucket(tmp / "warmup-bucket", min(args.videos, 64))
        timed_round(round_config(tmp / "warmup-bucket", tmp / "ws-warmup", "warmup", args.batch_size, "local"))
        if not args.skip_local:
            local = timed_round(round_config(bucket, tmp / "ws-local", "local", args.batch_size, "local"))
            report("in process (--executor local)", local)
        if args.skip_pool:
            return

        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.workers.process import ProcessWorker

        with get_client(sync_client=True) as client:
            for pool in ("cpu", "gpu"):
                client.create_work_pool(
                    WorkPoolCreate(
                        name=pool,
                        type="process",
                        base_job_template=ProcessWorker.get_default_base_job_template(),
                        concurrency_limit=args.pool_limit if pool == "gpu" else None,
                    )
                )
        env = dict(os.environ, PREFECT_API_URL=url)
        prefect = str(Path(sys.executable).with_name("prefect"))
        subprocess.run(
            [prefect, "--no-prompt", "deploy", "--name", "label-batch"],
            cwd=REPO,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        worker_env = dict(env, PREFECT_WORKER_QUERY_SECONDS=str(args.query_seconds), PREFECT_LOGGING_LEVEL="INFO")
        command = [prefect, "worker", "start", "--pool", "gpu", "--work-queue", "label"]
        with open(tmp / "worker.log", "wb") as log:
            worker = subprocess.Popen(
                command, cwd=REPO, env=worker_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for_line(tmp / "worker.log", READY, worker)
        before = (group_cpu(server.pid), group_cpu(worker.pid), own_cpu())
        pooled = timed_round(round_config(bucket, tmp / "ws-pool", "pool", args.batch_size, "pool"))
        spent = [
            after - start
            for after, start in zip((group_cpu(server.pid), group_cpu(worker.pid), own_cpu()), before, strict=True)
        ]
        stop(worker)
        worker = None
        parallel = min(args.pool_limit, pooled["batches"])
        report(f"pool, stock worker (limit {args.pool_limit})", pooled, parallel)
        print(
            f"  CPU during it: server {spent[0]:.1f} s, worker and its flow runs {spent[1]:.1f} s, "
            f"round {spent[2]:.1f} s ({os.cpu_count()} cores)"
        )
        batch_timeline("pool", tmp / "ws-pool")
    finally:
        if worker is not None:
            stop(worker)
        stop(server)
        if postgres is not None:
            stop(postgres)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
