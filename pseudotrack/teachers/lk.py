"""`lk`: the weight-free teacher of the embedded default, pyramidal Lucas–Kanade with a consistency check.

Each point is tracked forward from its query frame to the end and backward to
the start. Every step is checked by tracking back again: a point whose round
trip misses by more than `fb_threshold` pixels (or that leaves the frame) is
lost and stays invisible from then on, holding its last position. LK cannot
re-find a point after an occlusion, so `tracks_occluded` is False and the
student's loss ignores its occluded labels.

All active points move together one frame pair at a time, so a clip costs
about four LK calls per frame whatever the number of query frames.
"""

from __future__ import annotations

import cv2
import numpy as np

from .base import TeacherOutput, TeacherSpec, register_teacher


class LKTeacher:
    name = "lk"
    checkpoint_sha256 = ""
    tracks_occluded = False

    def __init__(self, window: int = 21, levels: int = 3, fb_threshold: float = 1.0, **_ignored):
        self.window = (window, window)
        self.levels = levels
        self.fb_threshold = fb_threshold
        self.criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01)

    def setup(self, device: str = "cpu") -> None:
        """Nothing to load; LK runs on the CPU whatever the device."""

    @staticmethod
    def _gray(frames: np.ndarray) -> list[np.ndarray]:
        # OpenCV 5's Python binding no longer accepts prebuilt grays here, so LK builds them per call
        return [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames]

    def _step(self, src, dst, points: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Track points src -> dst and back: (new points [M,2], ok [M], round-trip error [M])."""
        p0 = points.reshape(-1, 1, 2).astype(np.float32)
        kw = dict(winSize=self.window, maxLevel=self.levels, criteria=self.criteria)
        p1, st1, _ = cv2.calcOpticalFlowPyrLK(src, dst, p0, None, **kw)
        back, st2, _ = cv2.calcOpticalFlowPyrLK(dst, src, p1, None, **kw)
        p1, back = p1.reshape(-1, 2), back.reshape(-1, 2)
        err = np.linalg.norm(back - points, axis=1)
        h, w = size
        inside = (p1[:, 0] >= 0) & (p1[:, 0] <= w - 1) & (p1[:, 1] >= 0) & (p1[:, 1] <= h - 1)
        ok = (st1.ravel() == 1) & (st2.ravel() == 1) & (err < self.fb_threshold) & inside & np.isfinite(p1).all(1)
        return p1, ok, err

    def _sweep(self, grays, queries, order, tracks, visible, confidence, size) -> None:
        """Track every point through frames in `order` (forward or backward), starting at its query frame."""
        q_t = np.round(queries[:, 0]).astype(int)
        started = np.zeros(len(queries), bool)
        alive = np.zeros(len(queries), bool)
        for i, t in enumerate(order[:-1]):
            starting = q_t == t
            started |= starting
            alive |= starting
            nxt = order[i + 1]
            held = started & ~alive
            tracks[nxt, held] = tracks[t, held]  # lost points hold their last position, invisible
            active = np.flatnonzero(alive)
            if active.size == 0:
                continue
            p1, ok, err = self._step(grays[t], grays[nxt], tracks[t, active], size)
            kept, lost = active[ok], active[~ok]
            tracks[nxt, kept] = p1[ok]
            visible[nxt, kept] = True
            confidence[nxt, kept] = np.exp(-err[ok] / self.fb_threshold)
            tracks[nxt, lost] = tracks[t, lost]
            alive[lost] = False

    def predict(self, frames: np.ndarray, queries: np.ndarray) -> TeacherOutput:
        """frames uint8 [T,H,W,3]; queries float32 [N,3] (t, x, y) -> tracks [T,N,2] in the same pixels."""
        t_len, h, w = frames.shape[:3]
        n = len(queries)
        tracks = np.zeros((t_len, n, 2), np.float32)
        visible = np.zeros((t_len, n), bool)
        confidence = np.zeros((t_len, n), np.float32)
        if n == 0:
            return TeacherOutput(tracks, visible, confidence)
        q_t = np.clip(np.round(queries[:, 0]).astype(int), 0, t_len - 1)
        queries = np.column_stack([q_t, queries[:, 1:]]).astype(np.float32)
        tracks[q_t, np.arange(n)] = queries[:, 1:]
        visible[q_t, np.arange(n)] = True
        confidence[q_t, np.arange(n)] = 1.0
        grays = self._gray(frames)
        self._sweep(grays, queries, list(range(t_len)), tracks, visible, confidence, (h, w))
        self._sweep(grays, queries, list(range(t_len - 1, -1, -1)), tracks, visible, confidence, (h, w))
        return TeacherOutput(tracks, visible, confidence)


register_teacher(
    TeacherSpec(
        name="lk",
        factory=LKTeacher,
        needs_checkpoint=False,
        description="OpenCV pyramidal Lucas-Kanade, forward and backward, forward-backward consistency check",
    )
)
