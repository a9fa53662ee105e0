"""The teacher interface and the registry of teachers by name.

Every teacher, classical or neural, is called the same way by the labelling
stage: a clip of uint8 RGB frames and `(t, x, y)` queries in that clip's
pixels go in; tracks, boolean visibility and confidence in the same pixels come
out. Resizing to a model's own resolution, support points and chunking are the
teacher's business, so the pipeline never needs to know which model it holds.

Weights are loaded in `setup`, on the worker that runs the teacher (not when
the object is made), so a round can build and validate its teacher list on a
CPU-only orchestrator.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class TeacherOutput:
    """Pseudo-labels for one clip.

    tracks:      float32 [T, N, 2] (x, y) pixels of the clip given to `predict`
    visibility:  bool    [T, N]
    confidence:  float16 [T, N] in [0, 1]; ones for teachers that have none
    """

    tracks: np.ndarray
    visibility: np.ndarray
    confidence: np.ndarray

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


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_BUILTINS_LOADED = False


def _load_builtin_teachers() -> None:
    """Import the modules that register the built-in teachers (once, lazily, so torch loads only when needed)."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    import importlib

    for module in ("lk", "cotracker3", "cotracker2", "tapir"):
        try:
            importlib.import_module(f"{__package__}.{module}")
        except ModuleNotFoundError as exc:  # a teacher module not written yet
            if exc.name != f"{__package__}.{module}":
                raise
