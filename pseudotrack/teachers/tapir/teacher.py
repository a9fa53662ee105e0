"""TAPIR and BootsTAPIR behind the `Teacher` interface, with the authors' demo conventions.

TAPIR cannot follow a point while it is hidden, so the teacher reports
`tracks_occluded=False` and the student ignores its occluded labels.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ..base import TeacherOutput, TeacherSpec, register_teacher
from ..neural import NeuralTeacher, Prepared, pin_query_frames, resize_frames, to_device
from .model import BOOTSTAPIR_CONFIG, OFFICIAL_FILE, TAPIR_CONFIG, Tapir, TapirConfig, checkpoint_filter


@dataclass
class TapirTeacher(NeuralTeacher):
    """TAPIR or BootsTAPIR as a teacher.

    Frames are resized to `resolution` (256x256 in the authors' demos for both
    models; bilinear with antialiasing) and scaled to [-1, 1]. Our clip pixels
    put pixel centres at whole numbers (CoTracker's convention, used by the
    rest of pseudotrack) while TAPIR puts them at +0.5, so coordinates are
    shifted by half a pixel on the way in and out.

    visibility = (1 - sigmoid(occlusion)) * (1 - sigmoid(expected_dist)) > 0.5 (the authors' rule);
    confidence = 1 - sigmoid(expected_dist), the model's probability that the
    position is within its training threshold of the truth, which is what
    CoTracker3's confidence means too. At each query's own frame the track is
    the query point, visible, confidence 1.

    A TAPIR track depends only on its own query (cost volume, refinement mixer
    and normalisation are per query), so clips of equal length share a forward
    whatever their query counts: the shorter ones are padded with dummy
    queries at (0, 0, 0) that are dropped afterwards. Frame counts must match
    (the mixer's temporal convolutions see the clip's ends).

    Keep `resolution` square: above the training size the model refines at
    resolutions up to this one, and the authors' port samples non-square
    refinement maps with both axes scaled by the height (kept for parity).
    """

    config: TapirConfig = TAPIR_CONFIG
    resolution: tuple[int, int] | None = None
    query_chunk: int = 64
    frame_chunk: int = 10
    name: str = "tapir"
    tracks_occluded: bool = False
    queries_independent: bool = True

    @property
    def input_hw(self) -> tuple[int, int]:
        return tuple(self.resolution or self.config.initial_resolution)

    def model_resolution(self) -> tuple[int, int]:
        return self.input_hw

    def checkpoint_hint(self) -> str:
        return OFFICIAL_FILE[self.config.extra_convs]

    def validate(self) -> None:
        mh, mw = self.input_hw
        if mh % 8 or mw % 8 or mh < 8 or mw < 8:
            raise ConfigError(
                f"teacher {self.name!r}: resolution {self.input_hw} must be multiples of 8 "
                "(the authors run both models at 256x256)"
            )

    def build_model(self) -> Tapir:
        return Tapir(self.config)

    def checkpoint_filter(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return checkpoint_filter(state, self.config, self.checkpoint, self.name)

    def batch_key(self, frames: np.ndarray, queries: np.ndarray) -> int:
        """Clips of equal frame count share a forward; query counts may differ."""
        return len(frames)

    def group_key(self, p: Prepared) -> Hashable:
        return p.frames.shape[0]

    def prepare(self, frames: np.ndarray, queries: np.ndarray) -> Prepared:
        """Queries as (t, y, x) in the model's raster (pixel centres at +0.5); no support points."""
        mh, mw = self.input_hw
        h, w = frames.shape[1:3]
        to_model = np.array([mh / h, mw / w], np.float32)
        q = np.concatenate([np.rint(queries[:, :1]), (queries[:, [2, 1]] + 0.5) * to_model], axis=1)
        return Prepared(frames, queries, q.astype(np.float32), to_model)

    def forward(self, group: list[Prepared]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """One forward over clips of equal length -> per clip (tracks [T, N, 2] clip pixels, occlusion and
        expected_dist logits [T, N]).

        The cost volumes grow with the batch, so queries run `query_chunk / B`
        at a time (queries are independent: same result).
        """
        assert self.model is not None
        most = max(p.n for p in group)
        size = self.input_hw
        with torch.inference_mode(), self.autocast():
            video = torch.cat(
                [resize_frames(p.frames, size, self.device, self.frame_chunk, False, True) for p in group]
            )
            video = (video / 255 * 2 - 1).permute(0, 1, 3, 4, 2)  # B T mh mw 3 in [-1, 1]
            queries = [F.pad(torch.from_numpy(p.model_queries), (0, 0, 0, most - p.n)) for p in group]  # dummies
            chunk = max(1, self.query_chunk // len(group)) if self.query_chunk > 0 else self.query_chunk
            out = self.model(video, to_device(torch.stack(queries), self.device), chunk, self.frame_chunk)
            results = []
            for b, p in enumerate(group):
                to_model = to_device(p.to_model, self.device)
                tracks = out["tracks"][b, : p.n].float() / to_model.flip(0) - 0.5  # N T 2 (x, y) clip pixels
                occ, expd = out["occlusion"][b, : p.n].float(), out["expected_dist"][b, : p.n].float()
                results.append(
                    (
                        tracks.permute(1, 0, 2).cpu().numpy(),
                        occ.permute(1, 0).cpu().numpy(),
                        expd.permute(1, 0).cpu().numpy(),
                    )
                )
        return results

    def finish(self, p: Prepared, raw: tuple[np.ndarray, np.ndarray, np.ndarray]) -> TeacherOutput:
        tracks, occlusion, expected_dist = raw
        accurate = 1 - _sigmoid(expected_dist)
        visible = (1 - _sigmoid(occlusion)) * accurate > 0.5
        pin_query_frames(p, tracks, visible)
        accurate[np.rint(p.queries[:, 0]).astype(np.int64), np.arange(p.n)] = 1.0
        return TeacherOutput(tracks, visible, accurate)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def _make_tapir(**options) -> TapirTeacher:
    return TapirTeacher(**{"config": TAPIR_CONFIG, "name": "tapir", **options})


def _make_bootstapir(**options) -> TapirTeacher:
    return TapirTeacher(**{"config": BOOTSTAPIR_CONFIG, "name": "bootstapir", **options})


TAPIR_SPEC = register_teacher(
    TeacherSpec(
        name="tapir",
        factory=_make_tapir,
        needs_checkpoint=True,
        checkpoint_names=("tapir_checkpoint_panning.pt",),
        description="TAPIR (PyTorch port, panning checkpoint) at 256x256; cannot track through occlusion",
    )
)
BOOTSTAPIR_SPEC = register_teacher(
    TeacherSpec(
        name="bootstapir",
        factory=_make_bootstapir,
        needs_checkpoint=True,
        checkpoint_names=("bootstapir_checkpoint_v2.pt",),
        description="BootsTAPIR (pyramid level 1, extra convs) at 256x256; cannot track through occlusion",
    )
)
