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


def _find_box(data: bytes | bytearray, path: tuple[bytes, ...], start: int = 0, end: int | None = None):
    """(payload start, box end) of the first box at `path` (e.g. moov/trak/tkhd), or None."""
    end = len(data) if end is None else end
    for kind, pos, header, size in _boxes(data, start, end):
        if kind == path[0]:
            if len(path) == 1:
                return pos + header, pos + size
            found = _find_box(data, path[1:], pos + header, pos + size)
            if found:
                return found
    return None


# --------------------------------------------------------------------------- files made with a real encoder (PyAV)
#
# PyAV (FFmpeg's libraries, with libx264 and aac) makes the files OpenCV's writer cannot: audio-only MP4s, a
# display matrix, irregular timestamps, and long streams. Imported here, not at the top, so the other tests
# need no PyAV.


def av_encode(
    frames: np.ndarray | None,
    fps: float = 24.0,
    *,
    codec: str = "libx264",
    options: dict[str, str] | None = None,
    pts_ms: list[int] | None = None,
    audio_seconds: float = 0.0,
) -> bytes:
    """An MP4 of `frames` (RGB, even sizes) and/or a sine tone; pts_ms: each frame's timestamp in milliseconds
    (a variable frame rate)."""
    import io
    from fractions import Fraction

    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        video = audio = None
        if frames is not None:
            video = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
            video.height, video.width = frames.shape[1:3]
            video.pix_fmt = "yuv420p"
            video.options = {"preset": "ultrafast", **(options or {})} if codec == "libx264" else options or {}
            if pts_ms is not None:
                video.time_base = video.codec_context.time_base = Fraction(1, 1000)
        if audio_seconds:
            audio = out.add_stream("aac", rate=16000)
        if video is not None:
            for i, frame in enumerate(frames):
                picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
                if pts_ms is not None:
                    picture.pts, picture.time_base = int(pts_ms[i]), Fraction(1, 1000)
                out.mux(video.encode(picture))
            out.mux(video.encode())
        if audio is not None:
            total = int(16000 * audio_seconds)
            tone = (0.3 * np.sin(np.arange(total) * 0.1)).astype(np.float32)[None]
            for start in range(0, total, 1024):
                chunk = av.AudioFrame.from_ndarray(tone[:, start : start + 1024], format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts = 16000, start
                out.mux(audio.encode(chunk))
            out.mux(audio.encode())
    return buf.getvalue()


def audio_only_mp4(seconds: float = 1.0) -> bytes:
    """An MP4 holding an AAC track and no video track (a podcast uploaded as .mp4)."""
    return av_encode(None, audio_seconds=seconds)


def with_audio_mp4(frames: np.ndarray, fps: float = 24.0) -> bytes:
    """A video with a sound track, as most uploads are."""
    return av_encode(frames, fps, audio_seconds=len(frames) / fps)


def rotated_mp4(frames: np.ndarray, degrees: int, fps: float = 24.0) -> bytes:
    """`frames` stored as given, with a display matrix saying to show them rotated `degrees` counter-clockwise
    (as a phone writes a portrait video). The track header's matrix is written here, in the convention
    PyAV's VideoFrame.rotation reads back (checked), so no particular PyAV release is needed for it."""
    import math

    out = bytearray(av_encode(frames, fps))
    start, _ = _find_box(out, (b"moov", b"trak", b"tkhd"))
    at = start + (52 if out[start] == 1 else 40)  # version 1 has 64-bit times: the matrix is 12 bytes later
    radians = math.radians(degrees)
    c, s = round(math.cos(radians) * 65536), round(math.sin(radians) * 65536)
    out[at : at + 36] = struct.pack(">9i", c, -s, 0, s, c, 0, 0, 0, 1 << 30)
    return bytes(out)


def vfr_mp4(frames: np.ndarray, durations_ms: list[int]) -> bytes:
    """A variable-frame-rate MP4: frame i lasts durations_ms[i] milliseconds (B-frames and short GOPs included)."""
    pts = np.concatenate([[0], np.cumsum(durations_ms[: len(frames) - 1])]).astype(int).tolist()
    return av_encode(frames, pts_ms=pts, options={"g": "10", "bf": "2"})


BARCODE_BITS = 20


def index_frames(count: int, height: int, width: int, start: int = 0, seed: int = 0) -> np.ndarray:
    """uint8 [T, H, W, 3]: a still texture (features for SIFT and LK) whose bottom quarter shows each frame's
    index (start + t) as a barcode of BARCODE_BITS black or white cells, which survives compression and resizing."""
    frames = np.repeat(texture(height, width, seed)[None], count, axis=0)
    band = height - height // 4
    cells = BARCODE_BITS // 2
    for t in range(count):
        value = start + t
        for bit in range(BARCODE_BITS):
            row, col = divmod(bit, cells)
            y0 = band + row * (height - band) // 2
            y1 = band + (row + 1) * (height - band) // 2
            x0, x1 = col * width // cells, (col + 1) * width // cells
            frames[t, y0:y1, x0:x1] = 255 if (value >> bit) & 1 else 0
    return frames


def frame_index_of(frame: np.ndarray) -> int:
    """The index `index_frames` drew into a frame, read from the centres of its cells (at any size)."""
    height, width = frame.shape[:2]
    band = height - height // 4
    cells = BARCODE_BITS // 2
    value = 0
    for bit in range(BARCODE_BITS):
        row, col = divmod(bit, cells)
        y = band + (2 * row + 1) * (height - band) // 4
        x = (2 * col + 1) * width // (2 * cells)
        if frame[y - 1 : y + 2, x - 1 : x + 2].mean() > 127:
            value |= 1 << bit
    return value


def long_mp4(gop: np.ndarray, repeats: int, fps: float = 25.0) -> bytes:
    """A real H.264 MP4 of len(gop) * repeats frames, made in about a second: one closed GOP is encoded once
    and its packets muxed `repeats` times with shifted timestamps. Frame i shows gop[i % len(gop)]."""
    import io

    import av

    one = av_encode(gop, fps, options={"g": str(len(gop)), "keyint_min": str(len(gop)), "bf": "0", "sc_threshold": "0"})
    buf = io.BytesIO()
    with av.open(io.BytesIO(one)) as src, av.open(buf, "w", format="mp4") as out:
        packets = [p for p in src.demux(video=0) if p.size]
        stream = out.add_stream_from_template(src.streams.video[0])
        span = len(gop) * (packets[1].pts - packets[0].pts)
        for r in range(repeats):
            for p in packets:
                copy = av.Packet(bytes(p))
                copy.pts, copy.dts = p.pts + r * span, p.dts + r * span
                copy.is_keyframe, copy.time_base, copy.stream = p.is_keyframe, p.time_base, stream
                out.mux(copy)
    return buf.getvalue()


def mjpeg_avi_file(frames: np.ndarray, fps: float = 24.0, quality: int = 90) -> bytes:
    """Frames as a Motion-JPEG AVI (any size: JPEG goes to 65535 pixels a side, quick even for huge frames)."""
    from pseudotrack.tasks.clip_codec import mux_jpegs

    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    jpegs = [cv2.imencode(".jpg", cv2.cvtColor(f, cv2.COLOR_RGB2BGR), params)[1].tobytes() for f in frames]
    return mux_jpegs(jpegs, frames.shape[2], frames.shape[1], fps, container_format="avi")


def huge_frames_avi(height: int = 8200, width: int = 8200, frames: int = 8) -> bytes:
    """A real MJPEG AVI of `frames` copies of one height x width frame (a flat grey with lines: small, quick)."""
    from pseudotrack.tasks.clip_codec import mux_jpegs

    image = np.full((height, width, 3), 120, np.uint8)
    image[::256] = 230
    jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 50])[1].tobytes()
    return mux_jpegs([jpeg] * frames, width, height, 24.0, container_format="avi")


def claim_size(data: bytes, width: int, height: int) -> bytes:
    """The MP4 with its video sample entry and track header declaring width x height (the frames stay as they are)."""
    out = bytearray(data)
    stsd = _find_box(out, (b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stsd"))
    out[stsd[0] + 8 + 32 : stsd[0] + 8 + 36] = struct.pack(">HH", width, height)
    tkhd = _find_box(out, (b"moov", b"trak", b"tkhd"))
    out[tkhd[1] - 8 : tkhd[1]] = struct.pack(">II", width << 16, height << 16)
    return bytes(out)


def claim_frames(data: bytes, count: int) -> bytes:
    """The MP4 with its sample size table claiming `count` frames while listing only the ones it has."""
    out = bytearray(data)
    stsz = _find_box(out, (b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stsz"))
    out[stsz[0] + 8 : stsz[0] + 12] = struct.pack(">I", count)
    return bytes(out)


def damage_frames(data: bytes, fraction: float = 0.5, seed: int = 0) -> bytes:
    """The MP4 with the first `fraction` of its frame data (the `mdat` payload) replaced by random bytes."""
    out = bytearray(data)
    start, end = _find_box(out, (b"mdat",))
    count = int((end - start) * fraction)
    out[start : start + count] = random_bytes(count, seed)
    return bytes(out)
