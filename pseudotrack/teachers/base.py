"""The teacher interface and the registry of teachers by name.

Every teacher, classical or neural, is called the same way by the labelling
stage: a clip of uint8 RGB frames and `(t, x, y)` queries in that clip's
pixels go in; tracks, boolean visibility and confidence in the same pixels come
out. Resizing to a model's own resolution, support points and chunking are the
teacher's business, so the pipeline never needs to know which model it holds.

Weights are loaded in `setup`, on the worker that runs the teacher (not when
the object is made), so a round can build and validate its teacher list on a
CPU-only orchestrator.

Several clips can go through one forward (`predict_batch`), which is what keeps
a GPU busy; `predict_clips` is what the labelling stage calls: it forms those
batches and survives running out of memory by splitting them (see its
docstring for the policy).
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)

# one clip for a teacher: uint8 frames [T, H, W, 3] and float32 (t, x, y) queries [N, 3]
ClipInput = tuple[np.ndarray, np.ndarray]


@dataclass
class TeacherOutput:
    """Pseudo-labels for one clip.

    tracks:      float32 [T, N, 2] (x, y) pixels of the clip given to `predict`
    visibility:  bool    [T, N]
    confidence:  float16 [T, N] in [0, 1]; ones for teachers that have none
    notes:       how the labels were made when that differs from the normal call
                 (e.g. {"query_chunks": 4} after running out of memory); goes
                 into the sample's metadata so such labels can be found later
    """

    tracks: np.ndarray
    visibility: np.ndarray
    confidence: np.ndarray
    notes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tracks = np.ascontiguousarray(self.tracks, dtype=np.float32)
        self.visibility = np.ascontiguousarray(self.visibility, dtype=bool)
        self.confidence = np.ascontiguousarray(self.confidence, dtype=np.float16)
        t, n, two = self.tracks.shape
        if two != 2 or self.visibility.shape != (t, n) or self.confidence.shape != (t, n):
            raise ValueError(
                f"teacher output shapes disagree: tracks {self.tracks.shape}, "
                f"visibility {self.visibility.shape}, confidence {self.confidence.shape}"
            )

    def is_finite(self) -> bool:
        return bool(np.isfinite(self.tracks).all() and np.isfinite(self.confidence.astype(np.float32)).all())


@runtime_checkable
class Teacher(Protocol):
    """What the labelling stage calls.

    name:                 registry name, written into samples and the catalog
    checkpoint_sha256:    SHA-256 of the weights file ("" for weight-free teachers)
    tracks_occluded:      False when the teacher cannot follow points through
                          occlusion (TAPIR): the student's loss then ignores its
                          occluded labels

    Optional members, used by `predict_clips` when a teacher has them:

    predict_batch(clips) -> list[TeacherOutput]
        several clips, one output each, in order; a real batched forward where
        the model allows. It lets out-of-memory errors escape (so the caller
        can split the batch) and must give each clip the labels `predict`
        would give it alone, up to float rounding.
    batch_key(frames, queries) -> hashable
        clips with equal keys may share a forward (e.g. equal frame counts).
    queries_independent: bool
        True when a query's track does not depend on the other queries
        (TAPIR, lk), so running the queries in parts changes nothing.
    check_checkpoint() -> None
        refuse (CheckpointError) a file `setup` would refuse, without loading
        it anywhere; a round runs it before any video (`check_teacher_checkpoint`).
    """

    name: str
    checkpoint_sha256: str
    tracks_occluded: bool

    def setup(self, device: str = "cpu") -> None:
        """Load weights onto `device`; called once per worker before `predict`."""
        ...

    def predict(self, frames: np.ndarray, queries: np.ndarray) -> TeacherOutput:
        """frames: uint8 [T, H, W, 3] RGB; queries: float32 [N, 3] (t, x, y) pixels."""
        ...


@dataclass(frozen=True)
class TeacherSpec:
    """How to build one registered teacher.

    needs_checkpoint: whether `create_teacher` refuses to build it without a file
    checkpoint_names: official file names looked for in a checkpoints directory,
                      in order of preference
    """

    name: str
    factory: Callable[..., Teacher]
    needs_checkpoint: bool = True
    checkpoint_names: tuple[str, ...] = ()
    description: str = ""
    defaults: dict = field(default_factory=dict)


_REGISTRY: dict[str, TeacherSpec] = {}


def register_teacher(spec: TeacherSpec) -> TeacherSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"teacher {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def teacher_names() -> list[str]:
    _load_builtin_teachers()
    return sorted(_REGISTRY)


def teacher_spec(name: str) -> TeacherSpec:
    _load_builtin_teachers()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown teacher {name!r}; known teachers: {', '.join(sorted(_REGISTRY))}") from None


def create_teacher(name: str, checkpoint: str | Path | None = None, **kwargs) -> Teacher:
    """Build a teacher by registry name; weights load later, in `setup`."""
    spec = teacher_spec(name)
    if spec.needs_checkpoint and checkpoint is None:
        from ..errors import ConfigError

        raise ConfigError(
            f"teacher {name!r} needs a checkpoint: pass its file (one of "
            f"{', '.join(spec.checkpoint_names) or 'the official release'}) or a checkpoints directory"
        )
    options = {**spec.defaults, **kwargs}
    if checkpoint is not None:
        options["checkpoint"] = Path(checkpoint)
    return spec.factory(**options)


def check_teacher_checkpoint(name: str, checkpoint: str | Path) -> None:
    """Refuse (CheckpointError, a ConfigError) a checkpoint that `name`'s setup would refuse, without loading it.

    Cheap: the file is read and its keys and shapes compared with the model's;
    no forward runs and nothing goes to a device. Weight-free teachers have
    nothing to check beyond `create_teacher`'s own refusal of a file.
    """
    teacher = create_teacher(name, checkpoint)
    check = getattr(teacher, "check_checkpoint", None)
    if check is not None:
        check()


def check_predict_inputs(frames: np.ndarray, queries: np.ndarray) -> tuple[int, int, int]:
    """Shapes and ranges of `predict`'s inputs, with errors that say what to pass instead."""
    is_rgb = isinstance(frames, np.ndarray) and frames.ndim == 4 and frames.shape[3] == 3
    if not is_rgb or frames.dtype != np.uint8:
        raise ValueError(
            f"frames must be a uint8 array [T, H, W, 3] of RGB frames, got "
            f"{getattr(frames, 'dtype', type(frames))} {getattr(frames, 'shape', '')}"
        )
    t, h, w = frames.shape[:3]
    if t < 1 or h < 2 or w < 2:
        raise ValueError(f"frames {frames.shape} must hold at least one frame of at least 2x2 pixels")
    q = np.asarray(queries)
    if q.ndim != 2 or q.shape[1] != 3:
        raise ValueError(f"queries must be an array [N, 3] of (t, x, y) rows, got shape {q.shape}")
    if len(q) and not np.isfinite(q).all():
        raise ValueError("queries contain NaN or infinite values: pass finite (t, x, y) pixel coordinates")
    if len(q):
        frame = q[:, 0]
        if np.abs(frame - np.rint(frame)).max() > 1e-3 or frame.min() < 0 or frame.max() > t - 1:
            raise ValueError(f"query frames must be whole numbers in [0, {t - 1}] for a {t}-frame clip")
    return t, h, w


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` says an allocation failed: torch's OutOfMemoryError (CUDA or other), the CPU
    allocator's RuntimeError, or Python's MemoryError."""
    if isinstance(exc, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(exc).__mro__):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def release_accelerator_memory() -> None:
    """Give cached GPU blocks back before a retry; a no-op without torch or CUDA."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def predict_batch(teacher: Teacher, clips: Sequence[ClipInput]) -> list[TeacherOutput]:
    """The teacher's own batched call when it has one; otherwise `predict` once per clip (the default)."""
    batched = getattr(teacher, "predict_batch", None)
    if batched is None:
        return [teacher.predict(frames, queries) for frames, queries in clips]
    outs = list(batched(list(clips)))
    if len(outs) != len(clips):
        raise RuntimeError(f"teacher {teacher.name!r} returned {len(outs)} outputs for {len(clips)} clips")
    return outs


def group_indices(keys: Sequence[Hashable]) -> list[list[int]]:
    """Indices grouped by equal key, groups in order of first appearance, indices ascending."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def predict_clips(
    teacher: Teacher, clips: Sequence[ClipInput], max_clips: int = 1, min_query_chunk: int = 8
) -> list[TeacherOutput | Exception]:
    """Label `clips` with `teacher`, up to `max_clips` compatible clips per forward; one result per clip.

    A result is the clip's TeacherOutput or the exception that failed that clip
    alone (SampleError with a reason, or any other error, which the caller
    reports as internal); a clip's failure never fails its neighbours.

    Out of memory (torch.OutOfMemoryError, the CPU allocator's error, MemoryError):
      * a forward of several clips is split in halves and each half retried,
        down to single clips, with the CUDA cache emptied before each retry;
      * a single clip is then run with its queries in 2, 4, 8, ... parts (each
        part with the teacher's own support points) and the parts merged. For
        teachers whose queries are independent (`queries_independent`: TAPIR,
        lk) that is exact. For CoTracker it is not: tracks share context
        through the transformer's virtual tokens, so a part's tracks differ
        slightly from a whole run's. It is accepted as a fallback, as the
        authors themselves evaluate one query at a time beside support points;
        it is logged and recorded in the output's `notes` ({"query_chunks": k}),
        which the labelling stage writes into the sample's metadata;
      * below `min_query_chunk` queries per part the clip fails with
        SampleError("teacher", "... ran out of memory ...").
    Any other error in a forward of several clips reruns them one by one, so
    the error lands on the clip that caused it.
    """
    if max_clips < 1:
        raise ValueError(f"max_clips={max_clips} must be at least 1")
    name = getattr(teacher, "name", type(teacher).__name__)
    results: list[TeacherOutput | Exception | None] = [None] * len(clips)
    key_fn = getattr(teacher, "batch_key", None)
    keys = [key_fn(f, q) if key_fn is not None else None for f, q in clips]

    def attempt(batch: list[ClipInput]) -> tuple[list[TeacherOutput] | None, Exception | str | None]:
        """(outputs, None), or (None, "oom") without keeping the error (its frames pin memory), or (None, error)."""
        try:
            return predict_batch(teacher, batch), None
        except Exception as exc:
            if is_out_of_memory(exc):
                return None, "oom"
            return None, exc

    def run_group(idxs: list[int]) -> None:
        outs, error = attempt([clips[i] for i in idxs])
        if outs is not None:
            for i, out in zip(idxs, outs, strict=True):
                results[i] = out
            return
        if error == "oom":
            release_accelerator_memory()
            if len(idxs) > 1:
                half = (len(idxs) + 1) // 2
                log.warning(
                    "%s ran out of memory on %d clips at once: retrying %d + %d",
                    name,
                    len(idxs),
                    half,
                    len(idxs) - half,
                )
                run_group(idxs[:half])
                run_group(idxs[half:])
            else:
                results[idxs[0]] = run_in_parts(idxs[0])
            return
        if len(idxs) > 1:
            for i in idxs:  # find which clip it was; the others are labelled
                run_group([i])
            return
        results[idxs[0]] = error

    def run_in_parts(i: int) -> TeacherOutput | Exception:
        frames, queries = clips[i]
        n = len(queries)
        parts = 2
        while math.ceil(n / parts) >= min_query_chunk and parts <= n:
            size = math.ceil(n / parts)
            log.warning(
                "%s ran out of memory on one clip of %d frames and %d queries: retrying with the queries in %d parts",
                name,
                len(frames),
                n,
                parts,
            )
            outs: list[TeacherOutput] = []
            for start in range(0, n, size):
                got, error = attempt([(frames, queries[start : start + size])])
                if got is None:
                    break
                outs.append(got[0])
            if got is not None:
                return merge_query_parts(outs, {"query_chunks": len(outs)})
            if error != "oom":
                return error
            release_accelerator_memory()
            parts *= 2
        from ..errors import SampleError

        return SampleError(
            "teacher",
            f"{name} ran out of memory on {len(frames)} frames and {n} queries, alone and with the queries "
            f"split down to parts of {max(1, min(n, min_query_chunk))}",
        )

    for group in group_indices(keys):
        for start in range(0, len(group), max_clips):
            run_group(group[start : start + max_clips])
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def merge_query_parts(parts: Sequence[TeacherOutput], notes: dict | None = None) -> TeacherOutput:
    """Outputs for consecutive parts of one clip's queries, joined along the query axis."""
    return TeacherOutput(
        np.concatenate([p.tracks for p in parts], axis=1),
        np.concatenate([p.visibility for p in parts], axis=1),
        np.concatenate([p.confidence for p in parts], axis=1),
        dict(notes or {}),
    )


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_BUILTINS_LOADED = False


def _load_builtin_teachers() -> None:
    """Import the modules that register the built-in teachers (once, lazily, so torch loads only when needed).

    `PSEUDOTRACK_TEACHERS` names more modules to import (comma-separated), so a
    test suite or a benchmark registers its own teachers in every process of a
    round, worker processes included.
    """
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    import importlib
    import os

    for module in ("lk", "cotracker3", "cotracker2", "tapir"):
        importlib.import_module(f"{__package__}.{module}")
    for module in filter(None, (m.strip() for m in os.environ.get("PSEUDOTRACK_TEACHERS", "").split(","))):
        importlib.import_module(module)
