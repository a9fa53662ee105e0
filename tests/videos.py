"""Small videos made by the tests: textures moving by a known amount, and the bad files a bucket can hold.

Clips are tiny (tens of frames, about 100x100) so a test that writes and
decodes one takes milliseconds. Files go through cv2.VideoWriter (mp4v), the
encoder the OpenCV wheel has, into a temporary directory and come back as bytes.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import cv2
import numpy as np

# --------------------------------------------------------------------------- good clips


def texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB texture: corners everywhere for SIFT, gradients everywhere for LK."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
    big = cv2.resize(small, (width + 16, height + 16), interpolation=cv2.INTER_CUBIC)
    return cv2.GaussianBlur(big, (3, 3), 0)[:height, :width]


def translating_frames(frames: int, height: int, width: int, dx: float, dy: float, seed: int = 0) -> np.ndarray:
    """uint8 [T, H, W, 3]: a texture whose content moves by (dx, dy) pixels per frame.

    A point at (x, y) in frame 0 is at (x + t*dx, y + t*dy) in frame t; sub-pixel
    shifts come from bilinear warps of a smooth texture, so they are accurate.
    """
    pad = 32 + int(np.ceil(max(abs(dx), abs(dy)) * frames))
    base = texture(height + 2 * pad, width + 2 * pad, seed)
    out = []
    for t in range(frames):
        m = np.float32([[1, 0, dx * t - pad], [0, 1, dy * t - pad]])
        out.append(cv2.warpAffine(base, m, (width, height), flags=cv2.INTER_LINEAR))
    return np.stack(out)


def write_mp4(frames: np.ndarray, path: Path, fps: float = 24.0) -> Path:
    """frames: uint8 [T, H, W, 3] RGB -> an MPEG-4 Part 2 file (moov at the end, as OpenCV writes it)."""
    t, h, w, _ = frames.shape
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def mp4_bytes(frames: np.ndarray, fps: float = 24.0) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        return write_mp4(frames, Path(tmp) / "clip.mp4", fps).read_bytes()


def moving_clip(frames: int = 24, height: int = 96, width: int = 128, fps: float = 24.0, seed: int = 0) -> bytes:
    """An mp4 of a texture drifting by (1.5, -0.5) px a frame."""
    return mp4_bytes(translating_frames(frames, height, width, 1.5, -0.5, seed), fps)


# --------------------------------------------------------------------------- bad files


def empty_file() -> bytes:
    return b""


def random_bytes(size: int = 4096, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(size)


def png_file() -> bytes:
    ok, buf = cv2.imencode(".png", texture(32, 32))
    assert ok
    return buf.tobytes()


def text_file() -> bytes:
    return b"These are my holiday notes, saved with the wrong name.\n"


def one_frame_video() -> bytes:
    return mp4_bytes(translating_frames(1, 64, 64, 0, 0))


def ftyp_then_garbage(seed: int = 0) -> bytes:
    """A valid-looking `ftyp` header followed by random bytes (what the demo bucket's broken file holds)."""
    return b"\x00\x00\x00\x18ftypmp42" + random_bytes(2048, seed)


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    """The first `keep` fraction of a file, like an upload cut short."""
    return data[: int(len(data) * keep)]


_ISO_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"dinf"}


def _boxes(data: bytes | bytearray, start: int, end: int):
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", data[pos + 8 : pos + 16])[0], 16
        elif size == 0:
            size = end - pos
        yield kind, pos, header, size
        pos += size


def faststart(data: bytes) -> bytes:
    """The same MP4 with its `moov` index moved before `mdat` (chunk offsets shifted to match).

    Cutting such a file keeps an index that promises frames the file no longer
    has: the truncation decoders meet only while reading frames.
    """
    top = list(_boxes(data, 0, len(data)))
    kind, pos, _, size = next(b for b in top if b[0] == b"moov")
    moov = bytearray(data[pos : pos + size])

    def shift(start: int, end: int) -> None:
        for kind, pos, header, size in _boxes(moov, start, end):
            if kind in _ISO_CONTAINERS:
                shift(pos + header, pos + size)
            elif kind in (b"stco", b"co64"):
                width, fmt = (4, ">I") if kind == b"stco" else (8, ">Q")
                count = struct.unpack(">I", moov[pos + header + 4 : pos + header + 8])[0]
                for k in range(count):
                    at = pos + header + 8 + k * width
                    moov[at : at + width] = struct.pack(fmt, struct.unpack(fmt, moov[at : at + width])[0] + len(moov))

    shift(8, len(moov))
    out = bytearray()
    for kind, pos, _, size in top:
        if kind == b"mdat":
            out += moov
        if kind != b"moov":
            out += data[pos : pos + size]
    return bytes(out)
