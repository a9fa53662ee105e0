"""What every neural teacher does the same way, so each model only says what is its own.

A model's teacher (CoTracker3, CoTracker2, TAPIR) subclasses `NeuralTeacher`
and supplies:

    build_model()                the network for its config, weights not loaded
    checkpoint_filter(state)     the official file's state dict mapped onto that network
                                 (refusing a file of another variant with the teacher to use)
    prepare(frames, queries)     queries (and support points) in model pixels; the default scales
                                 with corners aligned and appends `support_points(frames)`
    forward(group)               one forward over prepared clips -> raw outputs per clip
    finish(prepared, raw)        raw outputs -> TeacherOutput in the clip's pixels

and the base does the rest: loading weights in `setup` on the worker (never in
`__init__`, so a CPU-only orchestrator can build and check its teacher list),
checking a checkpoint without loading it onto a device (`check_checkpoint`,
which a round runs before any video), `predict`, and `predict_batch`, which
groups clips that may share a forward. Out of memory inside `predict_batch`
escapes so that `base.predict_clips` can halve the batch, then split the
queries, and fail only the clip at the smallest split.
"""

from __future__ import annotations

from collections.abc import Hashable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, SampleError
from .base import (
    TeacherOutput,
    check_predict_inputs,
    group_indices,
    is_out_of_memory,
    release_accelerator_memory,
    sha256_file,
)
from .checkpoints import fit_state_dict, load_into


@dataclass
class Prepared:
    """One clip ready for a forward.

    frames:         uint8 [T, H, W, 3] as given
    queries:        float32 [N, 3] (t, x, y) clip pixels, as given
    model_queries:  float32 [M >= N, 3] what the network tracks, in the model's
                    coordinates: the queries first, then any support points
    to_model:       float32 factors from clip to model coordinates
    """

    frames: np.ndarray
    queries: np.ndarray
    model_queries: np.ndarray
    to_model: np.ndarray

    @property
    def n(self) -> int:
        return len(self.queries)


@dataclass
class NeuralTeacher:
    """The shared part of the neural teachers (see the module docstring for what a subclass adds)."""

    checkpoint: Path | None = None
    frame_chunk: int = 16
    amp: bool = True
    name: str = ""
    tracks_occluded: bool = True
    checkpoint_sha256: str = ""
    model: nn.Module | None = field(default=None, repr=False)
    device: torch.device = field(default=torch.device("cpu"), repr=False)

    # ------------------------------------------------------------ what each model says

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def checkpoint_hint(self) -> str:
        """What to pass when no checkpoint was given (the official file names)."""
        return "the official checkpoint file"

    def checkpoint_filter(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The official state dict mapped to `build_model()`'s keys; identity when the names already agree."""
        return state

    def model_label(self) -> str:
        """The model as checkpoint errors name it."""
        return self.name

    def model_resolution(self) -> tuple[int, int]:
        """(height, width) clips are resized to."""
        assert self.model is not None
        return tuple(self.model.cfg.model_resolution)

    def support_points(self, frames: np.ndarray) -> np.ndarray:
        """[M, 3] (t, x, y) context points in model pixels, tracked beside the queries and dropped."""
        return np.zeros((0, 3), np.float32)

    def prepare(self, frames: np.ndarray, queries: np.ndarray) -> Prepared:
        """Queries in model pixels (the resize keeps corners aligned), then the support points."""
        mh, mw = self.model_resolution()
        h, w = frames.shape[1:3]
        to_model = np.array([(mw - 1) / max(w - 1, 1), (mh - 1) / max(h - 1, 1)], np.float32)
        q = np.concatenate([np.rint(queries[:, :1]), queries[:, 1:] * to_model], axis=1)
        if len(queries):
            q = np.concatenate([q, self.support_points(frames)])
        return Prepared(frames, queries, q.astype(np.float32), to_model)

    def group_key(self, p: Prepared) -> Hashable:
        """Prepared clips with equal keys share a forward: by default equal length and track count."""
        return (p.frames.shape[0], len(p.model_queries))

    def batch_key(self, frames: np.ndarray, queries: np.ndarray) -> Hashable:
        """Clips of equal frame count and query count may share a forward (see `predict_batch`)."""
        return (len(frames), len(queries))

    def forward(self, group: list[Prepared]) -> list[tuple]:
        raise NotImplementedError

    def finish(self, p: Prepared, raw: tuple) -> TeacherOutput:
        raise NotImplementedError

    def validate(self) -> None:
        """Options checked before loading (e.g. a resolution the model cannot take)."""

    # ------------------------------------------------------------ shared

    def setup(self, device: str = "cpu") -> None:
        path = self.require_checkpoint()
        self.validate()
        self.device = torch.device(device)
        model = self.build_model()
        load_into(model, path, filter_fn=self.checkpoint_filter, model_name=self.model_label())
        self.model = model.to(self.device).eval()
        self.checkpoint_sha256 = sha256_file(path)

    def check_checkpoint(self) -> None:
        """Read the checkpoint and fit it to the model's keys and shapes, without loading it anywhere.

        The network is built on the meta device (no memory, no initialisation),
        so this costs the file read; a round runs it before touching a video.
        """
        path = self.require_checkpoint()
        self.validate()
        with torch.device("meta"):
            model = self.build_model()
        fit_state_dict(model, path, filter_fn=self.checkpoint_filter, model_name=self.model_label())

    def require_checkpoint(self) -> Path:
        if self.checkpoint is None:
            raise CheckpointError(f"teacher {self.name!r} needs a checkpoint: pass {self.checkpoint_hint()}")
        return Path(self.checkpoint)

    def predict(self, frames: np.ndarray, queries: np.ndarray) -> TeacherOutput:
        """frames uint8 [T, H, W, 3]; queries float32 [N, 3] (t, x, y) -> labels in the same pixels.

        Alone, a clip that runs out of memory fails with a SampleError (it is
        `predict_clips` that retries with fewer clips or queries).
        """
        try:
            return self.predict_batch([(frames, queries)])[0]
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            reason = f"{self.name} ran out of memory on {len(frames)} frames and {len(queries)} queries"
        release_accelerator_memory()
        raise SampleError("teacher", reason)

    def predict_batch(self, clips: list[tuple[np.ndarray, np.ndarray]]) -> list[TeacherOutput]:
        """One output per clip; clips with equal `group_key` share a forward, the others run apart.

        Clips in one forward do not interact, so each gets its one-at-a-time
        labels up to float rounding. Out-of-memory errors escape.
        """
        if self.model is None:
            raise RuntimeError(f"{self.name} teacher: predict called before setup(device): call setup first")
        prepared = []
        for frames, queries in clips:
            check_predict_inputs(frames, queries)
            prepared.append(self.prepare(frames, np.asarray(queries, dtype=np.float32)))
        outs: list[TeacherOutput | None] = [None] * len(prepared)
        for group in group_indices([self.group_key(p) for p in prepared]):
            todo = [i for i in group if prepared[i].n > 0]
            for i in group:
                if prepared[i].n == 0:
                    t = prepared[i].frames.shape[0]
                    outs[i] = TeacherOutput(np.zeros((t, 0, 2)), np.zeros((t, 0), bool), np.ones((t, 0)))
            if todo:
                raw = self.forward([prepared[i] for i in todo])
                for i, one in zip(todo, raw, strict=True):
                    outs[i] = self.finish(prepared[i], one)
        return outs  # type: ignore[return-value]

    def run(self, frames: np.ndarray, queries: np.ndarray) -> tuple:
        """The raw outputs of one clip as `forward` gives them (before thresholds and query pinning)."""
        check_predict_inputs(frames, queries)
        return self.forward([self.prepare(frames, np.asarray(queries, dtype=np.float32))])[0]

    def autocast(self) -> AbstractContextManager:
        """bf16 autocast on CUDA when `amp` is on; nothing otherwise."""
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()


PIN_HOST_COPIES = True  # host -> CUDA copies of frames and queries go through pinned memory, without blocking


def to_device(x: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host array or tensor on `device`.

    To a CUDA device the copy goes through pinned (page-locked) memory with
    `non_blocking=True`: the GPU copies by DMA on its stream, ordered before
    the kernels that read it, while the host thread goes on to the next chunk
    instead of waiting; from pageable memory the copy is synchronous and
    staged. Elsewhere (CPU) it is a plain `.to(device)`, so nothing changes.
    The pinned buffer comes from PyTorch's caching host allocator, which keeps
    it until the copy has finished even when the tensor is dropped at once.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    device = torch.device(device)
    if device.type != "cuda" or not PIN_HOST_COPIES or x.device.type != "cpu":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def resize_frames(
    frames: np.ndarray,
    size: tuple[int, int],
    device: torch.device,
    chunk: int = 16,
    align_corners: bool = True,
    antialias: bool = False,
) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [1, T, 3, size] on `device`, 0..255, bilinear, `chunk` frames at a time."""
    out = []
    step = max(1, chunk)
    for i in range(0, len(frames), step):
        x = to_device(frames[i : i + step], device)
        x = x.permute(0, 3, 1, 2).float()
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners, antialias=antialias)
        out.append(x)
    return torch.cat(out)[None]


def pin_query_frames(p: Prepared, tracks: np.ndarray, visible: np.ndarray) -> None:
    """At each query's own frame the track is the query point, visible (in place)."""
    rows, cols = np.rint(p.queries[:, 0]).astype(np.int64), np.arange(p.n)
    tracks[rows, cols] = p.queries[:, 1:]
    visible[rows, cols] = True
