"""Small videos made in the tests: moving textures of known motion, and bad files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB texture with plenty of corners for SIFT and LK."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
    big = cv2.resize(small, (width + 16, height + 16), interpolation=cv2.INTER_CUBIC)
    return cv2.GaussianBlur(big, (3, 3), 0)[:height, :width]


def translating_frames(frames: int, height: int, width: int, dx: float, dy: float, seed: int = 0) -> np.ndarray:
    """uint8 [T,H,W,3]: a texture shifted by (dx, dy) pixels per frame (sub-pixel with bilinear warps)."""
    base = texture(height + 64, width + 64, seed)
    out = []
    for t in range(frames):
        m = np.float32([[1, 0, dx * t - 32], [0, 1, dy * t - 32]])
        shifted = cv2.warpAffine(base, m, (width + 64, height + 64), flags=cv2.INTER_LINEAR)
        out.append(shifted[:height, :width])
    return np.stack(out)


def write_mp4(frames: np.ndarray, path: Path, fps: float = 24.0) -> Path:
    t, h, w, _ = frames.shape
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def mp4_bytes(frames: np.ndarray, tmp_path: Path, fps: float = 24.0, name: str = "v.mp4") -> bytes:
    return write_mp4(frames, tmp_path / name, fps).read_bytes()
