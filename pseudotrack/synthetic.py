"""Synthetic scenes with exact point tracks: textured shapes moving over a panning, textured background.

Real benchmarks are big downloads and their labels are human clicks; a
generated scene gives tests and the demo a benchmark with *exact* ground truth
at no cost. Each layer (the background, then objects from far to near) is a
texture carried by a known affine map per frame, so a point is a fixed texture
coordinate ``u`` and its position is that map applied to ``u``: no
interpolated labels. A point is occluded when a nearer object's shape contains
its position, or when it is outside the image.

Conventions: pixel centres sit at integer coordinates (as in OpenCV and the
TAP-Vid readers), tracks are ``(x, y)``, the image spans ``[-0.5, W - 0.5)``.
Colours are drawn by bilinear sampling of the texture at each pixel centre's
texture coordinate, so the colour under a track is the same texture colour in
every frame where the point is visible (up to interpolation and rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

BACKGROUND = 0


@dataclass(frozen=True)
class Layer:
    """One depth layer. ``matrices[t]`` maps texture-centred coordinates u to frame (x, y): p = A u + c.

    kind: 'background' (covers everything), 'rectangle' or 'ellipse' with
    ``half_size`` (hx, hy) in texture pixels; texture float32 [h, w, 3] in 0..255.
    """

    kind: str
    half_size: tuple[float, float]
    texture: np.ndarray
    matrices: np.ndarray  # float64 [T, 2, 3]

    @property
    def texture_centre(self) -> np.ndarray:
        h, w = self.texture.shape[:2]
        return np.array([(w - 1) / 2.0, (h - 1) / 2.0])

    def to_local(self, xy: np.ndarray, t: np.ndarray | int) -> np.ndarray:
        """Frame positions [..., 2] at frame(s) t (broadcast) -> texture-centred coordinates [..., 2]."""
        m = self.matrices[t]
        a, c = m[..., :2], m[..., 2]
        rel = np.asarray(xy, np.float64) - c
        # A is scale * rotation, so its inverse is cheap and exact enough; solve keeps it general
        return np.linalg.solve(a, rel[..., None])[..., 0]

    def to_frame(self, u: np.ndarray, t: np.ndarray | int) -> np.ndarray:
        m = self.matrices[t]
        return np.einsum("...ij,...j->...i", m[..., :2], u) + m[..., 2]

    def contains(self, u: np.ndarray) -> np.ndarray:
        """bool [...]: texture-centred coordinates inside the layer's shape."""
        if self.kind == "background":
            return np.ones(u.shape[:-1], bool)
        hx, hy = self.half_size
        if self.kind == "rectangle":
            return (np.abs(u[..., 0]) <= hx) & (np.abs(u[..., 1]) <= hy)
        return (u[..., 0] / hx) ** 2 + (u[..., 1] / hy) ** 2 <= 1.0


@dataclass(frozen=True)
class SyntheticScene:
    """A rendered scene and its exact ground truth.

    frames uint8 [T, H, W, 3] RGB; tracks float32 [N, T, 2] (x, y) pixels;
    occluded bool [N, T]; point_layer int16 [N] (0 = background, k = k-th object
    from the back); layer_map uint8 [T, H, W]: the layer drawn at each pixel;
    depth_order: layer ids from far to near.
    """

    frames: np.ndarray
    tracks: np.ndarray
    occluded: np.ndarray
    point_layer: np.ndarray
    layer_map: np.ndarray
    depth_order: tuple[int, ...]
    layers: tuple[Layer, ...]

    def track_queries(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exact tracks of arbitrary queries [M, 3] (t, x, y): an oracle for evaluation tests.

        Returns tracks float32 [M, T, 2], occluded bool [M, T] and the layer of each query.
        """
        return _track_queries(self.layers, np.asarray(queries, np.float64), self.frames.shape[1:3])


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """[h, w, 3] zero-mean noise with features about `cell` pixels wide (a coarse grid, cubic upsampled)."""
    gh, gw = max(2, int(np.ceil(h / cell)) + 1), max(2, int(np.ceil(w / cell)) + 1)
    coarse = rng.standard_normal((gh, gw, 3)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def _texture(rng: np.random.Generator, h: int, w: int, detail: float) -> np.ndarray:
    """A colourful texture with broad blobs plus finer detail, so trackers and SIFT find features.

    `detail` is the width in pixels of the finest features.
    """
    base = rng.uniform(50, 205, size=3).astype(np.float32)
    tex = base + 40.0 * _smooth_noise(rng, h, w, 4 * detail) + 28.0 * _smooth_noise(rng, h, w, detail)
    return np.clip(tex, 0, 255).astype(np.float32)


def _affine(theta: np.ndarray, scale: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """[T, 2, 3] maps p = scale * R(theta) u + centre."""
    cos, sin = np.cos(theta) * scale, np.sin(theta) * scale
    m = np.zeros((len(theta), 2, 3))
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, -sin, sin, cos
    m[:, :, 2] = centre
    return m


def _background(rng: np.random.Generator, t_len: int, h: int, w: int, unit: float) -> Layer:
    """A texture larger than the frame, seen through a window that pans slowly (a camera pan)."""
    velocity = rng.uniform(-0.8, 0.8, size=2) * unit
    wobble = rng.uniform(0, 1.0, size=2) * unit
    t = np.arange(t_len)[:, None]
    sway = wobble * np.sin(t * rng.uniform(0.1, 0.3) + rng.uniform(0, 2 * np.pi))
    offset = velocity * (t - (t_len - 1) / 2) + sway
    margin = int(np.ceil(np.abs(offset).max())) + 4
    texture = _texture(rng, h + 2 * margin, w + 2 * margin, detail=rng.uniform(6, 10) * unit)
    centre = np.array([(w - 1) / 2.0, (h - 1) / 2.0]) + offset
    matrices = _affine(np.zeros(t_len), np.ones(t_len), centre)
    return Layer("background", (np.inf, np.inf), texture, matrices)


def _object(rng: np.random.Generator, t_len: int, h: int, w: int, unit: float) -> Layer:
    """A textured rectangle or ellipse moving along a gentle curve, turning and scaling a little."""
    short = min(h, w)
    half = rng.uniform(0.09, 0.22, size=2) * short
    kind = "rectangle" if rng.random() < 0.5 else "ellipse"
    t = np.arange(t_len, dtype=np.float64)
    mid = rng.uniform([0.15 * w, 0.15 * h], [0.85 * w, 0.85 * h])
    speed = rng.uniform(0.5, 3.0) * unit
    heading = rng.uniform(0, 2 * np.pi)
    velocity = speed * np.array([np.cos(heading), np.sin(heading)])
    sway = rng.uniform(0, 6.0, size=2) * unit
    phase = rng.uniform(0, 2 * np.pi, size=2)
    freq = rng.uniform(0.1, 0.35)
    tc = (t - (t_len - 1) / 2)[:, None]
    centre = mid + velocity * tc + sway * np.sin(freq * t[:, None] + phase)
    theta = rng.uniform(-np.pi, np.pi) + np.deg2rad(rng.uniform(-1.5, 1.5)) * t
    scale = np.exp(rng.uniform(-0.008, 0.008) * tc[:, 0])
    size = (2 * np.ceil(half) + 3).astype(int)
    texture = _texture(rng, int(size[1]), int(size[0]), detail=rng.uniform(5, 9) * unit)
    return Layer(kind, (float(half[0]), float(half[1])), texture, _affine(theta, scale, centre))


def _track_queries(
    layers: tuple[Layer, ...], queries: np.ndarray, hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact tracks for queries [M, 3] (t, x, y): the query belongs to the nearest layer covering it."""
    if queries.ndim != 2 or queries.shape[1] != 3:
        raise ValueError(f"queries must be [M, 3] rows of (t, x, y), got shape {queries.shape}")
    t_len = layers[0].matrices.shape[0]
    h, w = hw
    m = len(queries)
    qt = np.clip(np.rint(queries[:, 0]).astype(int), 0, t_len - 1)
    qxy = queries[:, 1:3]
    owner = np.zeros(m, np.int16)
    for k, layer in enumerate(layers[1:], start=1):  # far to near: the last layer covering the query wins
        owner[layer.contains(layer.to_local(qxy, qt))] = k
    tracks = np.zeros((m, t_len, 2))
    for k, layer in enumerate(layers):
        sel = owner == k
        if sel.any():
            u = layer.to_local(qxy[sel], qt[sel])  # [S, 2]
            tracks[sel] = layer.to_frame(u[:, None, :], np.arange(t_len)[None, :])
    x, y = tracks[..., 0], tracks[..., 1]
    occluded = (x < -0.5) | (x >= w - 0.5) | (y < -0.5) | (y >= h - 0.5)
    frames = np.broadcast_to(np.arange(t_len), (m, t_len))
    for k, layer in enumerate(layers[1:], start=1):
        nearer = owner < k
        if nearer.any():
            occluded[nearer] |= layer.contains(layer.to_local(tracks[nearer], frames[nearer]))
    return tracks.astype(np.float32), occluded, owner


def _texture_to_frame(layer: Layer, t: int) -> np.ndarray:
    """[2, 3] affine map from texture pixel (column, row) to frame (x, y) at frame t."""
    m = layer.matrices[t]
    return np.concatenate([m[:, :2], (m[:, 2] - m[:, :2] @ layer.texture_centre)[:, None]], axis=1)


def _draw_object(canvas: np.ndarray, labels: np.ndarray, layer: Layer, t: int, k: int) -> None:
    """Paint layer k over the pixels its shape covers at frame t (only its bounding box is computed)."""
    h, w = labels.shape
    m = layer.matrices[t]
    reach = np.abs(m[:, :2]) @ np.asarray(layer.half_size) + 1.5
    lo = np.maximum(0, np.floor(m[:, 2] - reach)).astype(int)
    hi = np.minimum([w, h], np.ceil(m[:, 2] + reach) + 1).astype(int)
    if np.any(lo >= hi):
        return
    box = (slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    ys, xs = np.mgrid[box].astype(np.float32)
    a_inv = np.linalg.inv(m[:, :2]).astype(np.float32)
    dx, dy = xs - np.float32(m[0, 2]), ys - np.float32(m[1, 2])
    u = np.stack([a_inv[0, 0] * dx + a_inv[0, 1] * dy, a_inv[1, 0] * dx + a_inv[1, 1] * dy], axis=-1)
    cx, cy = layer.texture_centre.astype(np.float32)
    colour = cv2.remap(layer.texture, u[..., 0] + cx, u[..., 1] + cy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    inside = layer.contains(u)
    canvas[box][inside] = colour[inside]
    labels[box][inside] = k


def _render(layers: tuple[Layer, ...], h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames uint8 [T, H, W, 3] and the layer drawn at each pixel, composited far to near."""
    t_len = layers[0].matrices.shape[0]
    frames = np.empty((t_len, h, w, 3), np.uint8)
    layer_map = np.zeros((t_len, h, w), np.uint8)
    background = layers[BACKGROUND]
    for t in range(t_len):
        canvas = cv2.warpAffine(
            background.texture,
            _texture_to_frame(background, t),
            (w, h),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REFLECT,
        )
        for k in range(1, len(layers)):
            _draw_object(canvas, layer_map[t], layers[k], t, k)
        frames[t] = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return frames, layer_map


def _sample_queries(rng: np.random.Generator, layer_map: np.ndarray, num_points: int) -> np.ndarray:
    """[N, 3] (t, x, y): half anywhere in the frame, half on visible object pixels; half on frame 0.

    Starting points on frame 0 suit 'first' queries; the rest start wherever
    they are visible so that points appear mid-clip, as in real benchmarks.
    """
    t_len, h, w = layer_map.shape
    t = np.where(rng.random(num_points) < 0.5, 0, rng.integers(0, t_len, num_points))
    xy = rng.uniform([-0.5, -0.5], [w - 0.5, h - 0.5], size=(num_points, 2))
    on_objects = rng.random(num_points) < 0.5
    pixels: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i in np.flatnonzero(on_objects):
        if t[i] not in pixels:
            pixels[t[i]] = np.nonzero(layer_map[t[i]] > BACKGROUND)
        ys, xs = pixels[t[i]]
        if len(xs):
            j = rng.integers(len(xs))
            xy[i] = (xs[j] + rng.uniform(-0.4, 0.4), ys[j] + rng.uniform(-0.4, 0.4))
    return np.concatenate([t[:, None].astype(np.float64), xy], axis=1)


def render_scene(
    seed: int,
    num_frames: int = 24,
    height: int = 256,
    width: int = 256,
    num_objects: int = 4,
    num_points: int = 64,
) -> SyntheticScene:
    """A deterministic scene: ``num_objects`` shapes over a background, ``num_points`` exact tracks.

    Motion and texture scale with the frame size (they are set for 256 pixels),
    so a scene looks alike at any resolution.
    """
    if num_frames < 1 or height < 8 or width < 8:
        raise ValueError(f"need num_frames >= 1 and frames at least 8x8, got {num_frames} x {height}x{width}")
    if num_objects < 0 or num_points < 0:
        raise ValueError(f"num_objects and num_points must be >= 0, got {num_objects} and {num_points}")
    rng = np.random.default_rng(seed)
    unit = min(height, width) / 256.0
    layers = (_background(rng, num_frames, height, width, unit),) + tuple(
        _object(rng, num_frames, height, width, unit) for _ in range(num_objects)
    )
    frames, layer_map = _render(layers, height, width)
    queries = _sample_queries(rng, layer_map, num_points)
    tracks, occluded, owner = _track_queries(layers, queries, (height, width))
    return SyntheticScene(
        frames=frames,
        tracks=tracks,
        occluded=occluded,
        point_layer=owner,
        layer_map=layer_map,
        depth_order=tuple(range(len(layers))),
        layers=layers,
    )
