"""How fast the catalog answers at 100k videos: append, cold read, latest, summary, done, compact.

    /work/venv/bin/python bench/bench_catalog.py                     # 100k videos, 200 files, temp dir
    /work/venv/bin/python bench/bench_catalog.py --videos 20000 --files 50 --store s3://bucket/bench

Each video gets one terminal event; a fraction also gets an earlier `failed` event
(a retried video), so `latest` has real work to do. Event files are written the way
workers write them (one Catalog.append per batch).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime, timedelta

import numpy as np

from pseudotrack.storage.catalog import Catalog
from pseudotrack.storage.uri import open_store

TEACHERS = ["cotracker3_online", "cotracker3_offline", "cotracker2", "tapir"]
REASONS = ["too few features", "cannot decode", "shorter than min_frames", "teacher out of memory"]
RULES = ["animation", "time-lapse", "water", "no-keep-match"]


def make_rows(videos: int, files: int, repeat: float, seed: int) -> list[list[dict]]:
    """Batches of rows, as label batches would append them."""
    rng = np.random.default_rng(seed)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    events: list[dict] = []
    status = rng.choice(["labelled", "filtered", "failed"], size=videos, p=[0.8, 0.12, 0.08])
    for i in range(videos):
        key = f"bucket/folder{i % 97:02d}/video_{i:07d}.mp4"
        base = {
            "video_key": key,
            "etag": f"{i:032x}",
            "size": int(rng.integers(1e5, 1e8)),
            "round_id": f"round-{i % 3}",
            "batch_id": f"b{i // 500:06d}",
        }
        when = t0 + timedelta(seconds=i)
        if rng.random() < repeat:
            events.append(
                dict(base, status="failed", stage="teacher", reason="timeout", created_at=when - timedelta(hours=1))
            )
        s = status[i]
        if s == "labelled":
            chosen = [TEACHERS[int(rng.integers(4))]]
            shard = f"shards/r/b-{i // 64:06d}.tar"
            events.append(
                dict(
                    base,
                    status="labelled",
                    created_at=when,
                    shard_id=shard,
                    sample_key=f"{i:024x}_00",
                    teachers=chosen,
                    teacher_sha256=["f" * 64],
                    num_frames=120,
                    fps=30.0,
                    width=1280,
                    height=720,
                    clip_frames=64,
                    stride=2,
                    num_queries=384,
                    query_stats={"sift": 900},
                    duration_s=1.5,
                )
            )
        elif s == "filtered":
            events.append(dict(base, status="filtered", created_at=when, filter_rule=RULES[i % 4], caption="a caption"))
        else:
            events.append(dict(base, status="failed", created_at=when, stage="queries", reason=REASONS[i % 4]))
    order = rng.permutation(len(events))  # workers finish out of order
    shuffled = [events[j] for j in order]
    return [list(chunk) for chunk in np.array_split(np.array(shuffled, dtype=object), files)]


def timed(label: str, fn, results: dict):
    t = time.perf_counter()
    out = fn()
    results[label] = time.perf_counter() - t
    print(f"{label:<34s} {results[label] * 1000:9.1f} ms")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=100_000)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--repeat", type=float, default=0.2, help="fraction of videos with an earlier event")
    parser.add_argument("--store", default=None, help="workspace URI (default: a temporary directory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--round-batch", type=int, default=32, help="also write the events as a round does, this many a batch (0: no)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(args.store or tmp)
        store.check_writable()
        batches = make_rows(args.videos, args.files, args.repeat, args.seed)
        n_events = sum(len(b) for b in batches)
        print(f"{args.videos} videos, {n_events} events in {len(batches)} files at {store.uri()}")
        results: dict[str, float] = {}
        writer = Catalog(store)
        label = f"append {len(batches)} batches"
        timed(label, lambda: [writer.append(b) for b in batches], results)
        print(f"{'  per batch':<34s} {results[label] / len(batches) * 1000:9.1f} ms")

        cold = Catalog(store)
        events = timed("events() cold (list + read files)", cold.events, results)
        assert events.num_rows == n_events, (events.num_rows, n_events)
        latest = timed("latest() warm", cold.latest, results)
        assert latest.num_rows == args.videos
        summary = timed("summary() warm", cold.summary, results)
        assert summary["videos"] == args.videos
        done = timed("done() warm", cold.done, results)
        assert len(done) == args.videos
        timed("summary() cold", Catalog(store).summary, results)
        folded = timed("compact()", Catalog(store).compact, results)
        print(f"{'  files folded':<34s} {folded:9d}")
        after = Catalog(store)
        timed("latest() cold after compact", after.latest, results)
        timed("summary() warm after compact", after.summary, results)

        from pseudotrack.dashboard.app import Dashboard

        board = Dashboard(store.uri())
        timed("dashboard summary() cold", board.summary, results)
        timed("dashboard page() warm", board.page, results)
        print("by_status:", summary["by_status"])
        print("by_teacher:", summary["by_teacher"])

    if args.round_batch:
        as_a_round_writes_it(args, results)


def as_a_round_writes_it(args, results: dict) -> None:
    """The same events appended a batch at a time, folded as a round folds them (label_round.py).

    A 100k-video round at the default batch size writes 3,000+ event files; the round
    folds them once COMPACT_AT_FILES are there, so `status` at any moment reads one
    snapshot and fewer than that many files.
    """
    from pseudotrack.storage.catalog import COMPACT_AT_FILES, fold_quietly

    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(args.store.rstrip("/") + "-round" if args.store else tmp)
        store.check_writable()
        rows = [r for b in make_rows(args.videos, 1, args.repeat, args.seed) for r in b]
        batches = [rows[i : i + args.round_batch] for i in range(0, len(rows), args.round_batch)]
        print(
            f"\nas a round writes it: {len(rows)} events in {len(batches)} batches of {args.round_batch}, "
            f"folded at {COMPACT_AT_FILES} files"
        )
        writer = Catalog(store)
        t = time.perf_counter()
        worst = 0.0
        # the last batches are not folded: a reader's worst moment, a snapshot and COMPACT_AT_FILES - 1 files
        unfolded = COMPACT_AT_FILES - 1
        for i, batch in enumerate(batches):
            writer.append(batch)
            if i < len(batches) - unfolded:
                s = time.perf_counter()
                fold_quietly(writer)
                worst = max(worst, time.perf_counter() - s)
            elif i == len(batches) - unfolded:
                writer.compact()
        spent = time.perf_counter() - t
        print(f"{'append + fold, all batches':<34s} {spent * 1000:9.1f} ms")
        print(f"{'  per batch':<34s} {spent / len(batches) * 1000:9.1f} ms  (slowest fold {worst * 1000:.0f} ms)")
        print(f"{'  files now':<34s} {len(Catalog(store).files()):9d}")
        summary = timed("status: summary() cold", Catalog(store).summary, results)
        assert summary["videos"] == args.videos, summary["videos"]
        timed("latest() cold", Catalog(store).latest, results)
        from pseudotrack.dashboard.app import Dashboard

        timed("dashboard summary() cold", Dashboard(store.uri()).summary, results)


if __name__ == "__main__":
    main()
