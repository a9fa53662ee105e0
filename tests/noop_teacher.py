"""`noop`: a teacher that does no tracking, for tests and benchmarks of everything around the teachers.

Not a production teacher: the suite registers it (conftest imports this module
and names it in PSEUDOTRACK_TEACHERS for processes it starts), and
`bench/bench_orchestration.py` does the same for its workers.

Orchestration overhead (scheduling, flow runs, decoding, shard and catalog
writes) is what is left of a round's time once the teachers' time is taken
out; with `lk` or a neural teacher that remainder drowns in noise. `noop`
holds every query still at its query position and calls it visible in every
frame, so a round runs through the whole pipeline, writes real shards, and
costs nothing in the teacher. Its labels are worthless for training: never use
it for a round whose shards a student will learn from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pseudotrack.errors import ConfigError
from pseudotrack.teachers.base import TeacherOutput, TeacherSpec, check_predict_inputs, register_teacher


class NoopTeacher:
    """Queries held still, all visible, full confidence; no weights, no device."""

    name = "noop"
    checkpoint_sha256 = ""
    tracks_occluded = True
    queries_independent = True

    def __init__(self, checkpoint: str | Path | None = None):
        if checkpoint is not None:
            raise ConfigError(f"teacher 'noop' has no weights; drop the checkpoint {checkpoint} (use --teacher noop)")

    def setup(self, device: str = "cpu") -> None:
        """Nothing to load."""

    def predict(self, frames: np.ndarray, queries: np.ndarray) -> TeacherOutput:
        """frames uint8 [T, H, W, 3] RGB; queries float32 [N, 3] (t, x, y) pixels."""
        t, _, _ = check_predict_inputs(frames, queries)
        xy = np.asarray(queries, np.float32)[:, 1:3]
        tracks = np.broadcast_to(xy, (t, *xy.shape))
        ones = np.ones((t, len(xy)), np.float16)
        return TeacherOutput(tracks, ones.astype(bool), ones)


register_teacher(
    TeacherSpec(
        name="noop",
        factory=NoopTeacher,
        needs_checkpoint=False,
        description="no tracking: queries held still and visible (orchestration benchmarks only)",
    )
)
