"""A video's CPU stages before its teachers: probe and decode the clip, sample its queries, draw its teachers.

Kept apart from `labelling` (which imports Prefect and the teachers) so that
the pipelined label batch's worker processes import only what these stages
need: numpy, OpenCV, decord (and torch, which decord wants imported first).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..config import RoundConfig
from .decode import decode_clip, probe_video
from .queries import sample_queries


@dataclass(frozen=True)
class PlannedVideo:
    key: str
    size: int
    etag: str
    caption: str | None = None


@dataclass
class PreparedVideo:
    """A video decoded and queried, waiting for its teachers."""

    video: PlannedVideo
    clip: object  # decode.Clip
    facts: object  # decode.VideoFacts
    queries: np.ndarray
    query_stats: dict
    chosen: list[str]
    clip_bytes: bytes | None = None  # the encoded clip, when a worker process encoded it ahead of the teachers
    clip_stored: dict | None = None  # what the sample's JSON records about that stored clip (clip_codec)
    frames_slot: tuple[int, tuple[int, ...]] | None = None  # (slot, shape) of frames a worker left in shared memory


def video_rng(seed: int, key: str) -> np.random.Generator:
    """A generator that depends only on the round seed and the video, not on batch composition."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def prepare_video(
    video: PlannedVideo,
    data: bytes,
    config: RoundConfig,
    teachers,
    timings: dict[str, float],
    on_stage: Callable[[str], None] | None = None,
) -> PreparedVideo:
    """Decode the clip, sample its queries and draw its teachers; raises SampleError with the stage that failed.

    teachers: anything with `.names` (the configured teacher names, in order).
    on_stage: told each stage's name as it starts (a worker process reports it, so that a crash names its stage).
    """
    on_stage = on_stage or (lambda stage: None)
    rng = video_rng(config.seed, video.key)
    on_stage("decode")
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
        resize=config.resize,
    )
    t1 = time.perf_counter()
    on_stage("queries")
    queries, query_stats = sample_queries(
        clip.frames,
        num_queries=config.num_queries,
        num_keyframes=config.num_keyframes,
        rng=rng,
        start_bias=config.query_start_bias,
        min_per_keyframe=config.query_min_per_keyframe,
        sift_scale=config.query_sift_scale,
    )
    t2 = time.perf_counter()
    chosen = sorted(rng.choice(teachers.names, size=config.teachers_per_clip, replace=False).tolist())
    timings["decode"] = timings.get("decode", 0.0) + t1 - t0
    timings["queries"] = timings.get("queries", 0.0) + t2 - t1
    return PreparedVideo(video, clip, facts, queries, query_stats, chosen)
