"""Label one batch of videos: decode, sample queries, run teachers, write shards, record the catalog.

The batch, not the video, is the unit of orchestration (DESIGN.md, "Prefect at
scale"): one task run labels hundreds of videos. Inside it each video either
becomes a sample in a committed shard or a `failed` row with the stage and the
reason, and the next video goes on.

Only a video's own faults are terminal (a `SampleError`: it does not decode, is
too short, gives too few features, or a teacher returns NaN for that clip
alone). Anything else is not the video's fault and never becomes a `failed`
row: a teacher that cannot load, a CUDA error, a full disk, a bug of ours. It
fails the batch instead, its videos stay pending, and the round says how to
resume. Storage faults are retried by the store alone (storage/base.py, the
package's one retry policy); one that outlasts it fails the batch, and a re-run
resumes it: shard names are deterministic, so a re-run overwrites, never
duplicates.

Plain functions only: the Prefect task around `label_batch` lives in the flow
that submits it (flows/label_round.py), so a GPU host can run a batch with the
package's data dependencies and no orchestrator installed.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..config import RoundConfig
from ..errors import ConfigError, SampleError
from ..faults import fault_point
from ..storage.claims import ClaimSet
from ..storage.layout import sample_key
from ..teachers.base import (
    Teacher,
    TeacherOutput,
    check_teacher_checkpoint,
    create_teacher,
    predict_clips,
    teacher_spec,
)
from .clip_codec import encode_clip_described
from .containers import MAX_SOURCE_BYTES, check_source_size
from .cpu_pool import cpu_worker_count, start_pool
from .pipeline import label_pipelined
from .prepare import PlannedVideo, PreparedVideo, prepare_video
from .quality import catalog_columns, clip_quality, forward_backward_chosen, sample_quality_reason
from .shards import Sample, ShardSink
from .throughput import teacher_busy

log = logging.getLogger(__name__)


@dataclass
class BatchResult:
    batch_id: str
    labelled: int = 0
    failed: int = 0
    filtered: int = 0  # videos labelled but dropped on their quality score (--min-sample-quality)
    shards: list[str] = field(default_factory=list)
    teachers: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    filter_rules: dict[str, int] = field(default_factory=dict)  # 'quality < S' -> videos filtered on quality
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # why planned videos were left to others -> count
    teacher_busy: float = 0.0  # the teacher's share of the batch's time (stage_seconds["teacher"] / ["batch"])
    clips_per_s: float = 0.0  # videos labelled per second of the batch


def batch_id_for(round_id: str, keys: list[str]) -> str:
    return "b" + hashlib.sha256(("\0".join([round_id, *keys])).encode("utf-8")).hexdigest()[:12]


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_checkpoints(config: RoundConfig) -> dict[str, str | None]:
    """Teacher name -> checkpoint path; refuses a round whose teachers lack files, before any work."""
    resolved: dict[str, str | None] = {}
    problems = []
    for name, explicit in config.teacher_entries():
        try:
            spec = teacher_spec(name)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if name in resolved:
            problems.append(f"teacher {name!r} is configured twice")
            continue
        path: Path | None = None
        if explicit:
            path = Path(explicit).expanduser()
            if not path.is_file():
                problems.append(f"teacher {name!r}: checkpoint {path} does not exist")
                continue
        elif spec.needs_checkpoint:
            folder = Path(config.checkpoints).expanduser() if config.checkpoints else None
            found = [folder / n for n in spec.checkpoint_names if folder and (folder / n).is_file()]
            if not found:
                where = f"in {folder}" if folder else "(no --checkpoints directory given)"
                problems.append(
                    f"teacher {name!r} has no checkpoint {where}: download one of "
                    f"{', '.join(spec.checkpoint_names)} or pass --teacher {name}=PATH"
                )
                continue
            path = found[0]
        if path is not None:
            try:  # read and fitted to the model once here, so a bad file stops the round before any video
                check_teacher_checkpoint(name, path)
            except ConfigError as exc:
                problems.append(f"teacher {name!r}: {exc}")
                continue
        resolved[name] = str(path) if path else None
    if problems:
        raise ConfigError("cannot start the round: " + "; ".join(problems))
    return resolved


class TeacherPool:
    """Teachers built and set up once per worker process, shared by its batches."""

    _cache: dict[tuple[str, str | None, str], Teacher] = {}
    _lock = threading.Lock()

    def __init__(self, checkpoints: dict[str, str | None], device: str):
        self.checkpoints = checkpoints
        self.device = resolve_device(device)
        # held while a teacher predicts: the pipelined batch runs the teachers on one thread and the
        # forward-backward check (finish_video) on another, and a teacher is not meant for two at once
        self.busy = threading.RLock()

    @property
    def names(self) -> list[str]:
        return list(self.checkpoints)

    def get(self, name: str) -> Teacher:
        key = (name, self.checkpoints[name], self.device)
        with self._lock:
            teacher = self._cache.get(key)
            if teacher is None:
                teacher = create_teacher(name, self.checkpoints[name])
                teacher.setup(self.device)
                self._cache[key] = teacher
            return teacher


def teacher_batch_size(config: RoundConfig, device: str) -> int:
    """Clips per teacher forward: the configured number, else 4 on a GPU (fills it) and 1 on the CPU
    (batching buys nothing there and holds more clips in memory)."""
    if config.teacher_batch:
        return config.teacher_batch
    return 4 if device.startswith("cuda") else 1


def run_teachers(
    prepared: list[PreparedVideo], teachers: TeacherPool, max_clips: int, timings: dict[str, float]
) -> list[dict[str, TeacherOutput] | Exception]:
    """Every prepared clip's labels from its chosen teachers, or the error that failed the clip.

    Clips that chose the same teacher go through it together, up to
    `max_clips` per forward (`predict_clips`: out of memory splits the forward
    and retries). Teachers run in name order and a clip that failed one is not
    given to the next, so a clip fails with the same reason whatever batch it
    was in. Each clip's labels are what the teacher gives it alone (up to float
    rounding in a batched forward).

    Only a clip's own fault (SampleError: out of memory at the smallest split,
    NaN labels) fails the clip. A teacher that cannot be set up or an error
    that is not the clip's (a CUDA error, a bug) is raised: it fails the batch
    and leaves its videos pending.
    """
    t0 = time.perf_counter()
    labels: list[dict[str, TeacherOutput]] = [{} for _ in prepared]
    failures: list[Exception | None] = [None] * len(prepared)
    for name in sorted({n for p in prepared for n in p.chosen}):
        todo = [i for i, p in enumerate(prepared) if name in p.chosen and failures[i] is None]
        if not todo:
            continue
        teacher = teachers.get(name)
        with teachers.busy:
            outs = predict_clips(teacher, [(prepared[i].clip.frames, prepared[i].queries) for i in todo], max_clips)
        for i, out in zip(todo, outs, strict=True):
            if isinstance(out, Exception) and not isinstance(out, SampleError):
                raise out
            if isinstance(out, Exception):
                failures[i] = out
                continue
            t, n = len(prepared[i].clip.frames), len(prepared[i].queries)
            if out.tracks.shape != (t, n, 2):
                failures[i] = SampleError("teacher", f"{name} returned tracks of shape {out.tracks.shape}")
            elif not out.is_finite():
                failures[i] = SampleError("teacher", f"{name} returned NaN or infinite values")
            else:
                labels[i][name] = out
    timings["teacher"] = timings.get("teacher", 0.0) + time.perf_counter() - t0
    return [failure if failure is not None else got for failure, got in zip(failures, labels, strict=True)]


def finish_video(
    p: PreparedVideo,
    labels: dict[str, TeacherOutput],
    config: RoundConfig,
    teachers: TeacherPool,
    timings: dict[str, float],
) -> tuple[Sample | None, dict]:
    """The labelled clip as a sample and its catalog row; (None, a `filtered` row) when its quality is too low.

    The labels are scored here (tasks/quality.py), in the batch's process, in both the plain and
    the pipelined batch: the forward-backward check needs the teachers, which live here.
    """
    video, clip, facts, queries, query_stats, chosen = (
        p.video,
        p.clip,
        p.facts,
        p.queries,
        p.query_stats,
        p.chosen,
    )
    t3 = time.perf_counter()
    if p.clip_bytes is not None:  # a worker process encoded it ahead of the teachers
        clip_bytes, stored = p.clip_bytes, p.clip_stored
    else:
        clip_bytes, stored = encode_clip_described(clip.frames, clip.fps)
    t4 = time.perf_counter()
    shas = [teachers.get(n).checkpoint_sha256 for n in chosen]
    key = sample_key(video.key, video.etag)
    meta = {
        "source_key": video.key,
        "etag": video.etag,
        "size": video.size,
        "caption": video.caption,
        "frame_indices": clip.frame_indices,
        "stride": clip.stride,
        "fps": clip.fps,
        "source_fps": facts.fps,
        "source_size": [facts.height, facts.width],
        "clip_size": [config.height, config.width],
        "resize": clip.resize,  # "squeeze" or "crop" (config.resize "mixed" draws one per video)
        "crop_box": list(clip.crop_box),  # (x0, y0, x1, y1) of the source frame the clip shows, source pixels
        "clip": stored,  # the stored clip's field, container, codec and quality
        "num_frames": len(clip.frames),
        "query_stats": query_stats,
        "teachers": chosen,
        "teacher_sha256": shas,
        "tracks_occluded": {n: bool(teachers.get(n).tracks_occluded) for n in chosen},
        "round_id": config.round_id,
        "seed": config.seed,
        "pseudotrack_version": __version__,
    }
    scores, meta["quality"] = score_labels(p, labels, config, teachers, timings)
    notes = {n: labels[n].notes for n in chosen if labels[n].notes}
    if notes:  # labels made differently from the normal call (e.g. queries in parts after running out of memory)
        meta["teacher_notes"] = notes
    row = {
        "video_key": video.key,
        "size": video.size,
        "etag": video.etag,
        "caption": video.caption,
        "status": "labelled",
        "num_frames": facts.num_frames,
        "fps": facts.fps,
        "duration_s": facts.duration_s,
        "width": facts.width,
        "height": facts.height,
        "clip_frames": len(clip.frames),
        "stride": clip.stride,
        "num_queries": len(queries),
        "query_stats": query_stats,
        "teachers": chosen,
        "teacher_sha256": shas,
        "sample_key": key,
        **catalog_columns(meta["quality"], chosen),
    }
    if p.clip_bytes is None:
        timings["encode"] = timings.get("encode", 0.0) + t4 - t3
    reason = sample_quality_reason(meta["quality"], config.min_sample_quality)
    if reason:
        return None, quality_filtered_row(row, reason, config.min_sample_quality)
    return Sample(key, clip_bytes, queries, labels, meta, quality=scores), row


def score_labels(
    p: PreparedVideo,
    labels: dict[str, TeacherOutput],
    config: RoundConfig,
    teachers: TeacherPool,
    timings: dict[str, float],
) -> tuple[dict, dict]:
    """Each chosen teacher's per-track scores and the sample's `quality` object (SampleError on NaN).

    The forward-backward check runs only on the clips `forward_backward_chosen` draws from the seed
    and the video key, so a rerun checks the same clips.
    """
    t = time.perf_counter()
    chosen = [n for n in p.chosen if n in labels]
    predicts = None
    if forward_backward_chosen(config.seed, p.video.key, config.quality_sample):
        predicts = {n: _locked_predict(teachers, n) for n in chosen}
    scores, quality = clip_quality(
        p.clip.frames,
        p.queries,
        {n: labels[n] for n in chosen},
        predicts=predicts,
        tracks_occluded={n: bool(teachers.get(n).tracks_occluded) for n in chosen},
    )
    quality["min_track_quality"] = config.min_track_quality
    timings["quality"] = timings.get("quality", 0.0) + time.perf_counter() - t
    return scores, quality


def _locked_predict(teachers: TeacherPool, name: str):
    teacher = teachers.get(name)

    def predict(frames, queries):
        with teachers.busy:
            return teacher.predict(frames, queries)

    return predict


def quality_filtered_row(row: dict, reason: str, threshold: float | None) -> dict:
    """A labelled clip's row turned into a terminal `filtered` one: its scores stay, it has no shard."""
    keep = ("video_key", "size", "etag", "caption", "num_frames", "fps", "duration_s", "width", "height")
    quality = {k: v for k, v in row.items() if k.startswith("quality_")}
    return {
        **{k: row[k] for k in keep if k in row},
        **quality,
        "status": "filtered",
        "filter_rule": f"quality < {threshold:g}",
        "stage": "quality",
        "reason": reason,
    }


def label_video(
    video: PlannedVideo, data: bytes, config: RoundConfig, teachers: TeacherPool, timings: dict[str, float]
) -> tuple[Sample | None, dict]:
    """One video to one sample and its catalog row (see `finish_video`); SampleError names the stage that failed."""
    prepared = prepare_video(video, data, config, teachers, timings)
    (labels,) = run_teachers([prepared], teachers, 1, timings)
    if isinstance(labels, Exception):
        raise labels
    return finish_video(prepared, labels, config, teachers, timings)


def label_in_groups(
    videos: list[PlannedVideo], config: RoundConfig, teachers: TeacherPool, bucket, timings: dict[str, float]
) -> Iterator[tuple[PlannedVideo, tuple[Sample | None, dict] | Exception]]:
    """(video, (sample, row) or the exception that failed it) for each video, in order.

    Videos are read and prepared `teacher_batch_size` at a time so that their
    teachers can run on several clips per forward; with a batch size of one
    this is `label_video` per video. Storage faults other than a missing
    object escape, failing the batch (as before), and so does any error that is
    not a SampleError (`_label_claimed` raises it).
    """
    size = teacher_batch_size(config, teachers.device)
    for start in range(0, len(videos), size):
        window: list[tuple[PlannedVideo, PreparedVideo | Exception]] = []
        for video in videos[start : start + size]:
            t = time.perf_counter()
            data = None
            try:
                if video.size <= MAX_SOURCE_BYTES:  # a larger file fails below, unread: it would not fit in memory
                    data = bucket.read_bytes(video.key)  # other storage faults, past the retries, fail the batch
            except FileNotFoundError:
                pass
            timings["read"] = timings.get("read", 0.0) + time.perf_counter() - t
            try:
                check_source_size(video.size, video.key)
                if data is None:
                    raise SampleError("read", f"{bucket.uri(video.key)} disappeared after it was listed")
                window.append((video, prepare_video(video, data, config, teachers, timings)))
            except Exception as exc:
                window.append((video, exc))
            del data
        ready = [p for _, p in window if isinstance(p, PreparedVideo)]
        labels = dict(zip(map(id, ready), run_teachers(ready, teachers, size, timings), strict=True))
        for video, p in window:
            outcome: tuple[Sample | None, dict] | Exception
            if isinstance(p, Exception):
                outcome = p
            elif isinstance(labels[id(p)], Exception):
                outcome = labels[id(p)]
            else:
                try:
                    outcome = finish_video(p, labels[id(p)], config, teachers, timings)
                except Exception as exc:
                    outcome = exc
            yield video, outcome


def read_source(video: PlannedVideo, bucket) -> bytes:
    """The video's bytes; SampleError when it is too large or gone (other storage faults escape)."""
    data = None
    try:
        if video.size <= MAX_SOURCE_BYTES:  # a larger file fails below, unread: it would not fit in memory
            data = bucket.read_bytes(video.key)
    except FileNotFoundError:
        pass
    check_source_size(video.size, video.key)
    if data is None:
        raise SampleError("read", f"{bucket.uri(video.key)} disappeared after it was listed")
    return data


def labelled_outcomes(
    videos: list[PlannedVideo], config: RoundConfig, teachers: TeacherPool, bucket, timings: dict[str, float]
) -> Iterator[tuple[PlannedVideo, tuple[Sample | None, dict] | Exception]]:
    """`label_in_groups`, or the same outcomes in the same order from the pipelined batch (tasks/pipeline.py)
    when the config gives CPU worker processes and they start."""
    workers = cpu_worker_count(config.cpu_workers, config.workers if config.executor == "local" else 1)
    pool = start_pool(workers) if workers and videos else None
    if pool is None:
        yield from label_in_groups(videos, config, teachers, bucket, timings)
        return
    size = teacher_batch_size(config, teachers.device)
    yield from label_pipelined(
        pool,
        videos,
        config,
        teachers.names,
        teacher_batch=size,
        device=teachers.device,
        read=lambda video: read_source(video, bucket),
        teach=lambda prepared: run_teachers(prepared, teachers, size, timings),
        finish=lambda p, labels, own: finish_video(p, labels, config, teachers, own),
        timings=timings,
    )


def failed_row(video: PlannedVideo, stage: str, reason: str) -> dict:
    return {
        "video_key": video.key,
        "size": video.size,
        "etag": video.etag,
        "caption": video.caption,
        "status": "failed",
        "stage": stage,
        "reason": reason,
    }


def label_batch(
    videos: list[PlannedVideo],
    config: RoundConfig,
    checkpoints: dict[str, str | None],
    bucket,
    workspace,
    catalog,
    on_video: Callable[[str, dict], None] | None = None,
) -> BatchResult:
    """Label `videos`, committing shards and catalog events as it goes.

    The videos are claimed first (storage/claims.py), so that a round running at
    the same time never labels one of them too: a video another live batch
    holds is left to it, and counted in `skipped` with that batch's round.
    """
    assert config.round_id, "the round id is fixed before batches run"
    batch_id = batch_id_for(config.round_id, [v.key for v in videos])
    with ClaimSet(workspace, config.round_id, batch_id, config.claim_lease_seconds) as claims:
        mine = claimed_videos(videos, config, workspace, catalog, claims)
        fault_point("batch.claimed")
        result = _label_claimed(mine, batch_id, claims, config, checkpoints, bucket, workspace, catalog, on_video)
    for reason in claims.skipped.values():
        result.skipped[reason] = result.skipped.get(reason, 0) + 1
    return result


def claimed_videos(videos: list[PlannedVideo], config: RoundConfig, workspace, catalog, claims) -> list[PlannedVideo]:
    """The videos this batch now holds and that nobody recorded since the round planned them.

    A claim taken over from an earlier holder (a crashed run, a finished batch of
    another round) may hide a video that holder committed: its shard is
    catalogued first if a crash lost the events, then the catalog is read again.
    """
    mine = claims.acquire(videos)
    if claims.took_over and mine:
        from .shards import recover_committed

        recover_committed(workspace, catalog)
        done = catalog.done(statuses=("labelled", "filtered") if config.retry_failed else None)
        recorded = {v.key for v in mine if done.get(v.key) == v.etag}
        if recorded:
            claims.drop(recorded)
            for key in recorded:
                claims.skipped[key] = "recorded meanwhile by another run"
            mine = [v for v in mine if v.key not in recorded]
    return mine


def _label_claimed(
    videos: list[PlannedVideo],
    batch_id: str,
    claims,
    config: RoundConfig,
    checkpoints: dict[str, str | None],
    bucket,
    workspace,
    catalog,
    on_video: Callable[[str, dict], None] | None = None,
) -> BatchResult:
    started = time.perf_counter()
    result = BatchResult(batch_id)
    teachers = TeacherPool(checkpoints, config.device)
    # Shard names follow the videos actually labelled (and their ETags): a batch that
    # resumes with fewer videos, or with a changed one, never overwrites a committed shard.
    writer = batch_id_for(config.round_id, [f"{v.key}\0{v.etag}" for v in videos])
    sink = ShardSink(
        workspace, config.round_id, writer, config.shard_max_bytes, config.shard_max_samples, keep=claims.holds
    )
    pending_failures: list[dict] = []
    timings = result.stage_seconds

    def record(rows: list[dict]) -> None:
        if rows:
            t = time.perf_counter()
            catalog.append([dict(r, round_id=config.round_id, batch_id=batch_id) for r in rows])
            timings["catalog"] = timings.get("catalog", 0.0) + time.perf_counter() - t

    def keep_failures() -> None:
        """Record the terminal failures seen so far before the batch fails; they are the videos' own."""
        nonlocal pending_failures
        try:
            record(pending_failures)
            pending_failures = []
        except Exception:  # the original error matters more; these videos are simply retried
            log.warning("could not record %d failed videos before the batch failed", len(pending_failures))

    def commit(shards) -> None:
        nonlocal pending_failures
        for shard in shards:
            result.shards.append(shard.key)
            record(shard.rows + pending_failures)
            pending_failures = []

    try:
        for video, outcome in labelled_outcomes(videos, config, teachers, bucket, timings):
            try:
                if isinstance(outcome, Exception):
                    raise outcome
                sample, row = outcome
            except SampleError as exc:  # the video's own fault: terminal
                row = failed_row(video, exc.stage, exc.reason)
            except Exception:  # not the video's fault (teacher, device, disk, a bug): the batch fails
                log.error("batch %s stopped at %s; its unrecorded videos stay pending", batch_id, video.key)
                keep_failures()
                raise
            else:
                if sample is None:  # labelled, then filtered on its quality score: terminal, no shard
                    pending_failures.append(row)
                    result.filtered += 1
                    rule = row["filter_rule"]
                    result.filter_rules[rule] = result.filter_rules.get(rule, 0) + 1
                    if on_video:
                        on_video("filtered", row)
                    continue
                fault_point("video.labelled")
                t = time.perf_counter()
                committed = sink.add(sample, dict(row, round_id=config.round_id, batch_id=batch_id))
                timings["shard"] = timings.get("shard", 0.0) + time.perf_counter() - t
                commit(committed)
                result.labelled += 1
                for name in row["teachers"]:
                    result.teachers[name] = result.teachers.get(name, 0) + 1
                if on_video:
                    on_video("labelled", row)
                continue
            pending_failures.append(row)
            result.failed += 1
            reason = f"{row['stage']}: {row['reason']}"
            result.reasons[reason] = result.reasons.get(reason, 0) + 1
            if on_video:
                on_video("failed", row)
        t = time.perf_counter()
        committed = sink.close()
        timings["shard"] = timings.get("shard", 0.0) + time.perf_counter() - t
        commit(committed)
        record(pending_failures)
        fault_point("batch.recorded")
    except BaseException:
        sink.abort()
        raise
    result.seconds = time.perf_counter() - started
    timings["batch"] = result.seconds
    result.teacher_busy = teacher_busy(timings)
    result.clips_per_s = result.labelled / result.seconds if result.seconds > 0 else 0.0
    return result
