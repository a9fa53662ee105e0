"""CoTracker3 online and offline behind the `Teacher` interface, labelling the way the authors' training does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import ConfigError
from ..base import TeacherOutput, TeacherSpec, register_teacher
from ..neural import NeuralTeacher, Prepared, pin_query_frames, resize_frames, to_device
from ..support_points import early_sift_points, grid_points
from .model import (
    OFFLINE_FILES,
    ONLINE_FILES,
    Chunks,
    CoTracker3,
    CoTracker3Config,
    checkpoint_filter,
    config_from_dict,
    default_config,
    model_label,
    student_config,
    with_variant,
)


@dataclass
class CoTracker3Teacher(NeuralTeacher):
    """CoTracker3 as a teacher.

    Frames are resized to the model resolution (bilinear, corners aligned) and
    the tracks mapped back. Support points give the tracker context and are
    dropped from the output: online, a `support_grid` x `support_grid` grid at
    frame 0 plus `support_sift` SIFT points from early keyframes; offline,
    `support_uniform` points uniform in space and time (train_on_real_data.py).
    A point is visible where visibility x confidence > `visibility_threshold`;
    `confidence` is the confidence probability. Each query's own frame is set to
    the query point, visible. `iters` = 4 is the authors' labelling call (their
    interactive predictor uses 6).

    Tracks of one clip attend to each other through the virtual tokens, so a
    dummy track added to even out track counts would change the other tracks:
    clips share a forward only when their track counts (queries plus support
    points) are equal, never padded. Offline the support points are a fixed
    100, so clips of equal length group fully; online the SIFT support points
    may number fewer than `support_sift` on a flat clip.

    `model_config` overrides the architecture (a dict or CoTracker3Config), e.g.
    for a tiny student of ours; without it, a student export's sidecar
    (`<checkpoint>.json`) is used when present, else the published model.
    """

    offline: bool = False
    model_config: CoTracker3Config | dict | None = None
    iters: int = 4
    visibility_threshold: float = 0.9
    support_grid: int = 5
    support_sift: int = 32
    support_uniform: int = 100
    seed: int = 0
    corr_pairs: int = 1 << 14
    token_chunk: int = 1 << 16

    def __post_init__(self) -> None:
        self.name = self.name or ("cotracker3_offline" if self.offline else "cotracker3_online")
        if self.checkpoint is not None:
            self.checkpoint = Path(self.checkpoint)
        if not 0.0 <= self.visibility_threshold < 1.0:
            raise ConfigError(f"visibility_threshold={self.visibility_threshold} must be in [0, 1)")

    @property
    def chunks(self) -> Chunks:
        return Chunks(self.frame_chunk, self.corr_pairs, self.token_chunk)

    def resolve_config(self) -> CoTracker3Config:
        cfg = self.model_config
        if isinstance(cfg, dict):
            cfg = config_from_dict(cfg)
        if cfg is None and self.checkpoint is not None:
            cfg = student_config(self.checkpoint)
        return with_variant(cfg or default_config(), self.offline)

    def checkpoint_hint(self) -> str:
        return " or ".join(OFFLINE_FILES if self.offline else ONLINE_FILES) + " (or a student export)"

    def build_model(self) -> CoTracker3:
        return CoTracker3(self.resolve_config())

    def checkpoint_filter(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return checkpoint_filter(state, self.resolve_config(), self.checkpoint)

    def model_label(self) -> str:
        return model_label(self.resolve_config())

    def support_points(self, frames: np.ndarray) -> np.ndarray:
        """[M, 3] (t, x, y) context points in model pixels; deterministic per clip size and seed."""
        mh, mw = self.model_resolution()
        t, h, w = frames.shape[:3]
        rng = np.random.default_rng([self.seed, t, h, w])
        if self.offline:
            m = self.support_uniform
            return np.stack(
                [rng.integers(0, t, m), rng.uniform(0, mw - 1, m), rng.uniform(0, mh - 1, m)], axis=1
            ).astype(np.float32)
        grid = grid_points(self.support_grid, mh, mw).astype(np.float32)
        grid = np.concatenate([np.zeros((len(grid), 1), np.float32), grid], axis=1)
        sift = early_sift_points(frames, self.support_sift, rng)
        sift[:, 1] *= (mw - 1) / max(w - 1, 1)
        sift[:, 2] *= (mh - 1) / max(h - 1, 1)
        return np.concatenate([grid, sift]).astype(np.float32)

    def forward(self, group: list[Prepared]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """One forward over clips of equal length and track count -> per clip (tracks, vis, conf), queries only.

        Chunk budgets count (frame, track) pairs and tokens over the whole
        batch, so a batch of B clips needs about the memory of one clip plus B
        clips' feature maps.
        """
        assert self.model is not None
        size = self.model_resolution()
        with torch.inference_mode(), self.autocast():
            video = torch.cat([resize_frames(p.frames, size, self.device, self.frame_chunk) for p in group])
            queries = to_device(np.stack([p.model_queries for p in group]), self.device)
            out = self.model(video, queries, self.iters, self.chunks)
            results = []
            for b, p in enumerate(group):
                tracks = out.tracks[b, :, : p.n].float().cpu().numpy() / p.to_model
                vis = out.visibility[b, :, : p.n].float().cpu().numpy()
                conf = out.confidence[b, :, : p.n].float().cpu().numpy()
                results.append((tracks.astype(np.float32), vis, conf))
        return results

    def finish(self, p: Prepared, raw: tuple[np.ndarray, np.ndarray, np.ndarray]) -> TeacherOutput:
        tracks, vis, conf = raw
        visible = vis * conf > self.visibility_threshold
        pin_query_frames(p, tracks, visible)
        return TeacherOutput(tracks, visible, conf)


def predictor_from_model(net: CoTracker3, offline: bool | None = None, **options) -> CoTracker3Teacher:
    """A teacher around a network already in memory (a student being evaluated); no checkpoint needed."""
    offline = net.cfg.offline if offline is None else offline
    device = next(net.parameters()).device
    return CoTracker3Teacher(offline=offline, model=net, device=device, **options)


def _make_online(**options) -> CoTracker3Teacher:
    return CoTracker3Teacher(offline=False, **options)


def _make_offline(**options) -> CoTracker3Teacher:
    return CoTracker3Teacher(offline=True, **options)


ONLINE_SPEC = register_teacher(
    TeacherSpec(
        name="cotracker3_online",
        factory=_make_online,
        needs_checkpoint=True,
        checkpoint_names=ONLINE_FILES,
        description="CoTracker3 online (windows of 16 frames, step 8), official checkpoints; with confidence",
    )
)
OFFLINE_SPEC = register_teacher(
    TeacherSpec(
        name="cotracker3_offline",
        factory=_make_offline,
        needs_checkpoint=True,
        checkpoint_names=OFFLINE_FILES,
        description="CoTracker3 offline (whole clip at once), official checkpoints; with confidence",
    )
)
