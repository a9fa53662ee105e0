"""Label one batch of videos: decode, sample queries, run teachers, write shards, record the catalog.

The batch, not the video, is the unit of orchestration (DESIGN.md, "Prefect at
scale"): one task run labels hundreds of videos. Inside it each video either
becomes a sample in a committed shard or a `failed` row with the stage and the
reason, and the next video goes on. Only storage faults that outlast the
client's retries escape, failing the batch so Prefect can retry it whole; the
shard names are deterministic, so a retried batch overwrites, never duplicates.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from .. import __version__
from ..config import RoundConfig
from ..errors import ConfigError, SampleError
from ..storage.layout import sample_key
from ..teachers.base import Teacher, TeacherOutput, create_teacher, teacher_spec
from .decode import decode_clip, encode_clip, probe_video
from .queries import sample_queries
from .shards import Sample, ShardSink

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedVideo:
    key: str
    size: int
    etag: str
    caption: str | None = None


@dataclass
class BatchResult:
    batch_id: str
    labelled: int = 0
    failed: int = 0
    shards: list[str] = field(default_factory=list)
    teachers: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)


def video_rng(seed: int, key: str) -> np.random.Generator:
    """A generator that depends only on the round seed and the video, not on batch composition."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


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


def label_video(
    video: PlannedVideo, data: bytes, config: RoundConfig, teachers: TeacherPool, timings: dict[str, float]
) -> tuple[Sample, dict]:
    """One video to one sample and its catalog row; raises SampleError with the stage that failed."""
    rng = video_rng(config.seed, video.key)
    t0 = time.perf_counter()
    facts = probe_video(data, video.key)
    clip = decode_clip(
        data,
        video.key,
        height=config.height,
        width=config.width,
        num_frames=config.num_frames,
        max_stride=config.max_stride,
        min_frames=config.min_frames,
        rng=rng,
        facts=facts,
    )
    t1 = time.perf_counter()
    queries, query_stats = sample_queries(
        clip.frames, num_queries=config.num_queries, num_keyframes=config.num_keyframes, rng=rng
    )
    t2 = time.perf_counter()
    chosen = sorted(rng.choice(teachers.names, size=config.teachers_per_clip, replace=False).tolist())
    labels: dict[str, TeacherOutput] = {}
    for name in chosen:
        teacher = teachers.get(name)
        try:
            out = teacher.predict(clip.frames, queries)
        except SampleError:
            raise
        except MemoryError as exc:
            raise SampleError("teacher", f"{name} ran out of memory: {exc}") from exc
        if out.tracks.shape != (len(clip.frames), len(queries), 2):
            raise SampleError("teacher", f"{name} returned tracks of shape {out.tracks.shape}")
        if not out.is_finite():
            raise SampleError("teacher", f"{name} returned NaN or infinite values")
        labels[name] = out
    t3 = time.perf_counter()
    clip_bytes = encode_clip(clip.frames, clip.fps)
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
        "num_frames": len(clip.frames),
        "query_stats": query_stats,
        "teachers": chosen,
        "teacher_sha256": shas,
        "tracks_occluded": {n: bool(teachers.get(n).tracks_occluded) for n in chosen},
        "round_id": config.round_id,
        "seed": config.seed,
        "pseudotrack_version": __version__,
    }
    row = {
        "video_key": video.key,
        "size": video.size,
        "etag": video.etag,
        "caption": video.caption,
        "status": "labelled",
        "num_frames": facts.num_frames,
        "fps": facts.fps,
        "width": facts.width,
        "height": facts.height,
        "clip_frames": len(clip.frames),
        "stride": clip.stride,
        "num_queries": len(queries),
        "query_stats": query_stats,
        "teachers": chosen,
        "teacher_sha256": shas,
        "sample_key": key,
    }
    for name, seconds in (
        ("decode", t1 - t0),
        ("queries", t2 - t1),
        ("teacher", t3 - t2),
        ("encode", t4 - t3),
    ):
        timings[name] = timings.get(name, 0.0) + seconds
    return Sample(key, clip_bytes, queries, labels, meta), row


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
    """Label `videos`, committing shards and catalog events as it goes."""
    assert config.round_id, "the round id is fixed before batches run"
    started = time.perf_counter()
    batch_id = batch_id_for(config.round_id, [v.key for v in videos])
    result = BatchResult(batch_id)
    teachers = TeacherPool(checkpoints, config.device)
    sink = ShardSink(workspace, config.round_id, batch_id, config.shard_max_bytes, config.shard_max_samples)
    pending_failures: list[dict] = []
    timings = result.stage_seconds

    def record(rows: list[dict]) -> None:
        if rows:
            t = time.perf_counter()
            catalog.append([dict(r, round_id=config.round_id, batch_id=batch_id) for r in rows])
            timings["catalog"] = timings.get("catalog", 0.0) + time.perf_counter() - t

    def commit(shards) -> None:
        nonlocal pending_failures
        for shard in shards:
            result.shards.append(shard.key)
            record(shard.rows + pending_failures)
            pending_failures = []

    try:
        for video in videos:
            t = time.perf_counter()
            try:
                data = bucket.read_bytes(video.key)  # other storage faults, past the retries, fail the batch
            except FileNotFoundError:
                data = None
            timings["read"] = timings.get("read", 0.0) + time.perf_counter() - t
            try:
                if data is None:
                    raise SampleError("read", f"{bucket.uri(video.key)} disappeared after it was listed")
                sample, row = label_video(video, data, config, teachers, timings)
            except SampleError as exc:
                row = failed_row(video, exc.stage, exc.reason)
            except Exception as exc:  # a bug or an unexpected library error: keep the round going, say what
                log.warning("labelling %s failed unexpectedly:\n%s", video.key, traceback.format_exc())
                row = failed_row(video, "internal", f"unexpected {type(exc).__name__}: {exc}")
            else:
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
    except BaseException:
        sink.abort()
        raise
    result.seconds = time.perf_counter() - started
    return result


def _is_storage_fault(task, task_run, state) -> bool:
    """Retry a batch only for storage and network faults, not for bugs."""
    try:
        state.result()
    except (OSError, TimeoutError, ConnectionError):
        return True
    except Exception as exc:
        return type(exc).__module__.startswith(("botocore", "boto3", "urllib3"))
    return False


@task(
    name="label-batch",
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=_is_storage_fault,
    cache_policy=NO_CACHE,
)
def label_batch_task(
    videos: list[PlannedVideo],
    config: RoundConfig,
    checkpoints: dict[str, str | None],
    bucket,
    workspace,
    catalog,
    on_video: Callable[[str, dict], None] | None = None,
) -> BatchResult:
    return label_batch(videos, config, checkpoints, bucket, workspace, catalog, on_video)
