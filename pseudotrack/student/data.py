"""Training batches from committed pseudo-label shards, with an exactly resumable position.

Sampling. Every (rank, loader worker) pair reads its own endless stream that
resamples committed shards with replacement: the "resampled" mode DESIGN.md
asks for under DDP, so every rank can always produce a batch and all ranks run
the same number of steps (no uneven `split_by_node` hang); the training loop's
step count is the epoch length. A stream keeps a few shards open at once and
draws each sample from one of them at random, which mixes clips of different
label batches without a shuffle buffer.

Why not webdataset's own `ResampledShards` + shuffle buffer: their position
cannot be restored without replaying everything seen. Here the whole sequence
of (shard, sample index) draws is a pure function of the seed, the stream and
the manifests' sample counts, so it can be replayed without any I/O, and every
per-sample random choice (teacher, stride, start, track subset) comes from a
generator seeded by the draw number. Resuming at draw d therefore costs at most
a partial read of the few shards open at d (tar members are skipped, never
decoded), and yields exactly the batches an uninterrupted run would have seen.

Each batch records which logical stream made it and the next draw of that
stream; the trainer keeps those in its checkpoint (`LoaderState`). DataLoader
workers serve batches round-robin, so after a resume at step s physical
worker w plays logical stream (w + s) mod W, and the order of batches is the
same as before the kill.

Clip handling (§3.1, §3.3, App. A): a random teacher per sample each time it
is seen (Table 8), a random frame stride where the labelled clip is long
enough, a random start, for an offline student a random length between
`min_frames` and `num_frames` shared by the clips of a batch, a resize to the
student's resolution when labels were made at another one, and a fixed number
of tracks per clip (random subset, or padding with masked repeats).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

log = logging.getLogger(__name__)

_PLAN_TAG = 101  # separates the generators of one stream's plan, samples and batches
_SAMPLE_TAG = 202
_BATCH_TAG = 303


@dataclass(frozen=True)
class ClipSpec:
    """What every training clip looks like after clip handling.

    num_frames: T of an online student's clips; the longest clip of an offline one
    min_frames: shortest random trim (offline); equal to num_frames means no trim
    max_stride: largest extra frame stride drawn where the labelled clip has the frames
                (the labeller already drew the recipe's 1..4; leave 1 to keep its clips)
    min_track_quality: tracks scored below it are not supervised; None: the sample's own
                threshold (the round's --min-track-quality, recorded in its JSON), if any
    quality_weighting: per-track loss weights from the scores (`quality_loss_weights`)
    """

    num_frames: int = 64
    num_tracks: int = 384
    height: int = 384
    width: int = 512
    max_stride: int = 1
    min_frames: int | None = None
    min_track_quality: float | None = None
    quality_weighting: bool = False

    def trim_range(self) -> tuple[int, int]:
        low = self.num_frames if self.min_frames is None else self.min_frames
        return max(2, min(low, self.num_frames)), self.num_frames


@dataclass(frozen=True)
class ShardRef:
    url: str  # local path or s3:// URL of the tar
    count: int  # samples in it, from its manifest


# --------------------------------------------------------------------------- shard listing


def shard_refs(workspace: str, rounds: list[str] | None = None) -> list[ShardRef]:
    """Committed shards (manifest present) of the given rounds, or of all rounds.

    Reading a shard never needs its manifest again; the counts let the sampling
    plan be replayed without opening any tar.
    """
    from ..storage.uri import open_store
    from ..tasks.shards import committed_shards

    store = open_store(workspace)
    manifests: list[dict] = []
    for round_id in rounds or [None]:
        manifests.extend(committed_shards(store, round_id))
    refs = {ShardRef(store.uri(m["shard"]), int(m["count"])) for m in manifests if int(m["count"]) > 0}
    return sorted(refs, key=lambda r: r.url)


# --------------------------------------------------------------------------- sampling plan


@dataclass(frozen=True)
class Draw:
    index: int  # draw number in this stream
    slot: int  # which open shard it comes from
    shard: int  # index into the shard list
    position: int  # sample index inside the shard


def sample_plan(counts: list[int], seed: int, stream: tuple[int, int], slots: int = 4) -> Iterator[Draw]:
    """Endless sequence of draws of one stream; a pure function of its arguments.

    counts: samples per shard; stream: (rank, logical worker).
    A slot reads its shard front to back and is refilled with a shard drawn
    with replacement when it runs out.
    """
    if not counts or min(counts) < 1:
        raise ValueError("sample_plan needs at least one shard and no empty shards")
    rng = np.random.default_rng([seed, _PLAN_TAG, *stream])
    open_shards = [[int(rng.integers(len(counts))), 0] for _ in range(max(1, slots))]
    index = 0
    while True:
        slot = int(rng.integers(len(open_shards)))
        shard, position = open_shards[slot]
        yield Draw(index, slot, shard, position)
        index += 1
        if position + 1 >= counts[shard]:
            open_shards[slot] = [int(rng.integers(len(counts))), 0]
        else:
            open_shards[slot][1] = position + 1


def sample_rng(seed: int, stream: tuple[int, int], draw: int, tag: int = _SAMPLE_TAG) -> np.random.Generator:
    return np.random.default_rng([seed, tag, *stream, draw])


# --------------------------------------------------------------------------- clip handling


def frame_indices(num_source: int, length: int, max_stride: int, rng: np.random.Generator) -> np.ndarray:
    """Source frame of each of `length` output frames: random stride and start; ping-pong when too short.

    A clip shorter than `length` is extended by playing it back and forth; a
    track played backwards is still that point's track, so labels stay exact.
    returns int64 [length]
    """
    strides = [s for s in range(1, max(1, max_stride) + 1) if (length - 1) * s + 1 <= num_source]
    if not strides:
        if num_source == 1:
            return np.zeros(length, np.int64)
        cycle = np.concatenate([np.arange(num_source), np.arange(num_source - 2, 0, -1)])
        return np.resize(cycle, length).astype(np.int64)
    stride = int(rng.choice(strides))
    span = (length - 1) * stride + 1
    start = int(rng.integers(0, num_source - span + 1))
    return start + stride * np.arange(length, dtype=np.int64)


def rebase_queries(
    queries: np.ndarray, tracks: np.ndarray, visible: np.ndarray, indices: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Queries in the frames of a re-timed clip.

    A query whose frame survives keeps its exact (x, y), so the student gets
    the teacher's own query. Otherwise the point is queried at its first
    visible kept frame, at the label's position there; a point never visible
    in the kept frames cannot be queried and is dropped (valid False).

    queries: [N, 3] (t, x, y); tracks: [T0, N, 2]; visible: [T0, N]; indices: [T] source frames
    returns (queries [N, 3] in the new frames, valid bool [N])
    """
    n = len(queries)
    out = np.zeros((n, 3), np.float32)
    valid = np.zeros(n, bool)
    query_frames = np.rint(queries[:, 0]).astype(np.int64)
    kept_visible = visible[indices]  # [T, N]
    for i in range(n):
        same = np.flatnonzero(indices == query_frames[i])
        if same.size:
            out[i] = (same[0], queries[i, 1], queries[i, 2])
            valid[i] = True
            continue
        seen = np.flatnonzero(kept_visible[:, i])
        if seen.size:
            p = int(seen[0])
            out[i] = (p, *tracks[indices[p], i])
            valid[i] = True
    return out, valid


def choose_tracks(valid: np.ndarray, num_tracks: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A fixed number of track indices: a random subset, or all plus masked repeats.

    Repeats keep the model's input realistic (real queries) while their
    `valid` False keeps them out of the loss.
    returns (indices int64 [num_tracks], valid bool [num_tracks])
    """
    candidates = np.flatnonzero(valid)
    if candidates.size >= num_tracks:
        return np.sort(rng.choice(candidates, num_tracks, replace=False)), np.ones(num_tracks, bool)
    pad = rng.choice(candidates, num_tracks - candidates.size, replace=True)
    chosen = np.concatenate([candidates, pad])
    return chosen, np.arange(num_tracks) < candidates.size


def resize_clip(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [T, H0, W0, 3] -> uint8 [T, height, width, 3]."""
    import cv2

    if frames.shape[1:3] == (height, width):
        return frames
    shrink = frames.shape[1] > height
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f, (width, height), interpolation=interp) for f in frames])


def scale_points(points: np.ndarray, source_hw: tuple[int, int], target_hw: tuple[int, int]) -> np.ndarray:
    """(x, y) pixels of one resolution in another, corner pixel centres fixed (CoTracker's convention).

    points: [..., 2]
    """
    (h0, w0), (h1, w1) = source_hw, target_hw
    sx = (w1 - 1) / max(w0 - 1, 1)
    sy = (h1 - 1) / max(h0 - 1, 1)
    return points * np.array([sx, sy], np.float32)


def track_supervision(sample: dict, teacher: str, spec: ClipSpec) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(tracks the loss may use bool [N] or None for all, loss weights float32 [N] or None for equal ones).

    From the teacher's scores in the shard (`<teacher>.quality.npy`); a shard written before the
    scores existed has unknown quality: nothing is masked and nothing is weighted, never zero.
    """
    from ..tasks.quality import quality_loss_weights, track_quality_mask

    scores = sample["labels"][teacher].get("quality")
    if scores is None:
        return None, None
    threshold = spec.min_track_quality
    if threshold is None:
        threshold = (sample.get("meta", {}).get("quality") or {}).get("min_track_quality")
    mask = track_quality_mask(scores, threshold) if threshold is not None else None
    weights = quality_loss_weights(scores) if spec.quality_weighting else None
    return mask, weights


def prepare_clip(
    sample: dict, frames: np.ndarray, spec: ClipSpec, num_frames: int, rng: np.random.Generator
) -> dict | None:
    """One decoded shard sample -> one training clip of `num_frames` frames; None when nothing is trackable.

    sample: `tasks.shards.decode_sample` output; frames: uint8 [T0, H0, W0, 3]
    returns video uint8 [T, H, W, 3] (channels move on the device, not here), queries f32 [N, 3],
            tracks f32 [T, N, 2], visible bool [T, N],
            valid bool [N], weights f32 [N] (loss weight of each track; ones without quality weighting),
            occluded_supervised bool, teacher, key
    Tracks masked on quality (`track_supervision`) are not chosen: they stay in the shard, unsupervised.
    """
    teachers = sorted(sample["labels"])
    if not teachers:
        return None
    teacher = teachers[int(rng.integers(len(teachers)))]
    label = sample["labels"][teacher]
    tracks, visible = label["tracks"].astype(np.float32), label["visibility"].astype(bool)
    if len(frames) != len(tracks):
        raise ValueError(f"sample {sample['key']}: {len(frames)} frames but labels of {len(tracks)}")
    indices = frame_indices(len(frames), num_frames, spec.max_stride, rng)
    queries, valid = rebase_queries(sample["queries"].astype(np.float32), tracks, visible, indices)
    quality_mask, quality_weights = track_supervision(sample, teacher, spec)
    if quality_mask is not None:
        valid = valid & quality_mask
    if not valid.any():
        return None
    chosen, track_valid = choose_tracks(valid, spec.num_tracks, rng)
    weights = np.ones(len(chosen), np.float32) if quality_weights is None else quality_weights[chosen]
    clip_tracks = tracks[indices][:, chosen]
    clip_queries = queries[chosen]
    video = frames[indices]
    source_hw = (video.shape[1], video.shape[2])
    if source_hw != (spec.height, spec.width):
        video = resize_clip(video, spec.height, spec.width)
        clip_tracks = scale_points(clip_tracks, source_hw, (spec.height, spec.width))
        clip_queries[:, 1:] = scale_points(clip_queries[:, 1:], source_hw, (spec.height, spec.width))
    # an unknown teacher is treated as one that cannot track through occlusion: no loss beats a wrong one
    occluded_ok = bool(sample.get("meta", {}).get("tracks_occluded", {}).get(teacher, False))
    return {
        "video": torch.from_numpy(np.ascontiguousarray(video)),
        "queries": torch.from_numpy(clip_queries),
        "tracks": torch.from_numpy(np.ascontiguousarray(clip_tracks)),
        "visible": torch.from_numpy(np.ascontiguousarray(visible[indices][:, chosen])),
        "valid": torch.from_numpy(track_valid),
        "weights": torch.from_numpy(np.ascontiguousarray(weights, np.float32)),
        "occluded_supervised": occluded_ok,
        "teacher": teacher,
        "key": sample["key"],
    }


def collate(clips: list[dict]) -> dict:
    """Stack clips of equal T and N into a batch.

    returns video uint8 [B, T, H, W, 3], queries [B, N, 3], tracks [B, T, N, 2], visible [B, T, N],
            valid [B, N], weights [B, N], occluded_supervised bool [B], teachers list, keys list
    """
    return {
        "video": torch.stack([c["video"] for c in clips]),
        "queries": torch.stack([c["queries"] for c in clips]),
        "tracks": torch.stack([c["tracks"] for c in clips]),
        "visible": torch.stack([c["visible"] for c in clips]),
        "valid": torch.stack([c["valid"] for c in clips]),
        "weights": torch.stack([c["weights"] for c in clips]),
        "occluded_supervised": torch.tensor([c["occluded_supervised"] for c in clips]),
        "teachers": [c["teacher"] for c in clips],
        "keys": [c["key"] for c in clips],
    }


# --------------------------------------------------------------------------- reading


def _raw_samples(url: str) -> Iterator[dict]:
    """Raw (undecoded) records of one tar, in order."""
    from webdataset.tariterators import tarfile_samples

    if url.startswith("s3://"):
        from ..storage.s3 import register_s3_gopen

        register_s3_gopen()
    return iter(tarfile_samples([{"url": url}]))


class _ShardSlots:
    """Open tar readers, one per plan slot, that can jump to a draw's position by skipping members."""

    def __init__(self, shards: list[ShardRef]):
        self.shards = shards
        self.readers: dict[int, tuple[int, int, Iterator[dict]]] = {}  # slot -> (shard, next position, iter)

    def read(self, draw: Draw) -> dict:
        shard, position, reader = self.readers.get(draw.slot, (-1, -1, iter(())))
        if shard != draw.shard or position != draw.position:
            shard, position, reader = draw.shard, 0, _raw_samples(self.shards[draw.shard].url)
            for _ in range(draw.position):  # resume inside a shard: skip members without decoding
                next(reader)
                position += 1
        try:
            raw = next(reader)
        except StopIteration:
            ref = self.shards[draw.shard]
            raise RuntimeError(
                f"shard {ref.url} ended after {position} samples but its manifest says {ref.count}: "
                "the shard was changed after it was committed"
            ) from None
        self.readers[draw.slot] = (shard, position + 1, reader)
        return raw


def decode_frames(data: bytes) -> np.ndarray:
    from ..tasks.clip_codec import decode_clip_bytes

    return decode_clip_bytes(data)


def stream_batches(
    shards: list[ShardRef],
    spec: ClipSpec,
    batch_size: int,
    seed: int,
    stream: tuple[int, int],
    start_draw: int = 0,
    slots: int = 4,
) -> Iterator[dict]:
    """Endless batches of one (rank, logical worker) stream, starting at draw `start_draw`.

    Each batch carries `stream` and `next_draw` (where this stream resumes after it).
    A sample that cannot be used (no trackable point, undecodable clip) is
    logged and skipped; skipping is deterministic, so resume stays exact.
    """
    from ..tasks.shards import decode_sample

    plan = sample_plan([s.count for s in shards], seed, stream, slots)
    for _ in range(start_draw):  # replay the plan without I/O
        next(plan)
    reader = _ShardSlots(shards)
    low, high = spec.trim_range()
    give_up = max(8, min(sum(s.count for s in shards), 256))
    failures, last_error = 0, ""
    while True:
        clips: list[dict] = []
        next_draw = start_draw
        length = int(sample_rng(seed, stream, start_draw, _BATCH_TAG).integers(low, high + 1))
        while len(clips) < batch_size:
            draw = next(plan)
            next_draw = draw.index + 1
            raw = reader.read(draw)
            try:
                sample = decode_sample(raw)
                clip = prepare_clip(
                    sample, decode_frames(sample["clip"]), spec, length, sample_rng(seed, stream, draw.index)
                )
                last_error = "no point of the clip can be queried in the chosen frames"
            except Exception as exc:  # a bad sample must not stop training; it is reported
                log.warning("skipping sample %s of %s: %s", raw.get("__key__"), shards[draw.shard].url, exc)
                clip, last_error = None, f"{type(exc).__name__}: {exc}"
            if clip is None:
                failures += 1
                if failures >= give_up:  # every sample failing is a broken data set, not bad luck
                    raise RuntimeError(
                        f"{failures} samples in a row could not be used for training "
                        f"(last: {last_error}); check the shards with `pseudotrack show`"
                    )
                continue
            failures = 0
            clips.append(clip)
        batch = collate(clips)
        batch["stream"] = stream[1]
        batch["next_draw"] = next_draw
        start_draw = next_draw
        yield batch


@dataclass
class LoaderState:
    """Where each logical stream of this rank resumes, and how many batches were consumed."""

    batches: int = 0
    next_draw: dict[int, int] = field(default_factory=dict)

    def update(self, batch: dict) -> None:
        self.batches += 1
        self.next_draw[int(batch["stream"])] = int(batch["next_draw"])

    def to_dict(self) -> dict:
        return {"batches": self.batches, "next_draw": {str(k): v for k, v in self.next_draw.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> LoaderState:
        return cls(int(data["batches"]), {int(k): int(v) for k, v in data["next_draw"].items()})


class ShardBatches(torch.utils.data.IterableDataset):
    """The IterableDataset behind the loader: one `stream_batches` per DataLoader worker."""

    def __init__(
        self,
        shards: list[ShardRef],
        spec: ClipSpec,
        batch_size: int,
        seed: int,
        rank: int,
        num_workers: int,
        state: LoaderState | None = None,
        slots: int = 4,
    ):
        super().__init__()
        if not shards:
            raise ValueError("no committed shards to train on: run a labelling round first")
        self.shards, self.spec, self.batch_size, self.seed = shards, spec, batch_size, seed
        self.rank, self.num_streams, self.slots = rank, max(1, num_workers), slots
        self.state = state or LoaderState()

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)
        logical = (physical + self.state.batches) % self.num_streams
        start = self.state.next_draw.get(logical, 0)
        yield from stream_batches(
            self.shards, self.spec, self.batch_size, self.seed, (self.rank, logical), start, self.slots
        )


def make_loader(
    shards: list[ShardRef],
    spec: ClipSpec,
    batch_size: int,
    seed: int,
    rank: int = 0,
    num_workers: int = 0,
    state: LoaderState | None = None,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader of endless batches for one rank, resuming at `state` when given.

    Batches are assembled inside the workers (`batch_size=None` here), so the
    round-robin order of workers maps batch i to logical stream i mod W.
    """
    dataset = ShardBatches(shards, spec, batch_size, seed, rank, num_workers, state)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=2 if num_workers else None,
    )
