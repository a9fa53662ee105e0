"""Probe and decode source videos into clips, and store clips as near-lossless bytes.

Every failure on a bad file is a `SampleError("decode", reason)` whose reason
starts with a stable category ("empty file", "not a video", "truncated or
corrupt", "cannot decode", "too short", "too large", "too long") followed by
details, so failure tables can group by the category while a person still sees
what was wrong. No other exception escapes for a bad file (checked on files cut
and damaged at 16 places each in seven container/codec pairs, and on the
hostile corpus of tests/test_hostile_input.py).

Time and memory stay bounded whatever a file declares: a file over
MAX_SOURCE_BYTES is refused from its listed size, unread; MP4/MOV and AVI
headers are read before decoding, and a file with no video track, frames over
MAX_SOURCE_PIXELS, more than MAX_SOURCE_FRAMES frames or a sample index the
file cannot hold is refused before FFmpeg allocates for it; and a clip decodes
only its own frames (from the keyframe before the first), so a 100,000-frame
video costs about what a short one does.

Valid files that need care decode as a player shows them: a rotation in the
MP4 display matrix (phones' portrait videos) is applied by decord before the
resize, so frames are upright and `VideoFacts` gives the displayed size; a
variable-frame-rate video is read by frame index (every decoded frame once, in
order) and its `fps` is the average rate.

decord (FFmpeg) decodes, and it is the decoder that resizes to the label
resolution, which is much cheaper than decoding full frames and resizing after.
Its habits shape the code (DESIGN.md pitfalls): torch is imported before it,
both width and height are passed, sorted indices are read with one
`get_batch`, and data goes in as `io.BytesIO`. Before decord sees a file, its
first bytes are checked against the containers a bucket may hold, the top-level
boxes of MP4/QuickTime files are walked, and so are the chunks of AVI files.
That is cheap, turns an uploaded image, a text file or a cut-off upload into a
reason a person can act on, and is needed: decord kills the whole process with
SIGSEGV on an MJPEG AVI whose last frame is cut short.

Stored clips (the shard's `mp4` field) are Motion-JPEG in AVI. The OpenCV
wheel has no H.264 encoder and its video writers subsample chroma (4:2:0),
which costs saturated colour edges 8 dB (a synthetic scene came back at 36 dB).
So each frame is a 4:4:4 JPEG from `cv2.imencode` at quality 95 in a minimal
AVI container that FFmpeg-based readers open: 43-47 dB on the sample clips at
384x512 for 50-100 KB a frame. A clip that would come back below `min_psnr`
(film grain, noise, tiny textured frames) is stored at quality 100, which
gives about 50 dB on anything, pure noise included. Reading a stored clip back
unpacks the AVI and decodes the JPEGs with OpenCV (twice as fast as decord).
"""

from __future__ import annotations

import io
import logging
import math
import re
import struct
from dataclasses import dataclass

import cv2
import numpy as np

from ..errors import SampleError

log = logging.getLogger(__name__)

DEFAULT_FPS = 30.0  # assumed when a container gives no usable frame rate (VideoFacts.fps_assumed)
MIN_FRAMES = 8
MAX_SOURCE_PIXELS = 8192 * 8192  # larger frames are refused rather than exhausting a worker's memory
MAX_SOURCE_FRAMES = 1_000_000  # 9 hours at 30 fps; decord indexes every frame (~20 us, ~700 bytes each)
MAX_SOURCE_BYTES = 4 * 1024**3  # a worker reads the whole file into memory; larger files are refused unread
CLIP_QUALITY = 95  # JPEG quality of stored frames; raised to 100 when a clip would fall below MIN_PSNR
MIN_PSNR = 40.0
_PSNR_CHECK_FRAMES = 8  # frames decoded back to check a stored clip's quality

# Top-level boxes an ISO base media file (MP4, MOV, M4V, 3GP) may start with.
_ISO_FIRST_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid"}
_NOT_VIDEO_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"ID3", "an MP3 audio file"),
)


@dataclass(frozen=True)
class VideoFacts:
    """What the catalog records about a source video.

    fps_assumed: the container gave no usable frame rate (zero, NaN or absurd)
    and `fps` is DEFAULT_FPS; the frames themselves decode.
    """

    num_frames: int
    fps: float
    width: int
    height: int
    duration_s: float
    fps_assumed: bool = False


@dataclass
class Clip:
    """A clip exactly as the teachers see it, and where it came from.

    frames:        uint8 [T, H, W, 3] RGB at the label resolution
    frame_indices: int64 [T] source frame of each clip frame
    stride:        source frames between consecutive clip frames
    source_fps:    frame rate of the source video
    fps:           frame rate of the clip (source_fps / stride)
    source_size:   (height, width) of the source video
    """

    frames: np.ndarray
    frame_indices: np.ndarray
    stride: int
    source_fps: float
    fps: float
    source_size: tuple[int, int]


# --------------------------------------------------------------------------- checks before decoding


def container_of(head: bytes) -> str | None:
    """The container family the first bytes announce, or None when they announce no video container."""
    if len(head) >= 8 and head[4:8] in _ISO_FIRST_BOXES:
        return "mp4"
    if head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"AVIX"):
        return "avi"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3"):
        return "mpeg"
    if len(head) > 188 and head[0] == 0x47 and head[188] == 0x47:
        return "mpegts"
    if head[:3] == b"FLV":
        return "flv"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x30\x26\xb2\x75":
        return "asf"
    return None


def _describe_non_video(head: bytes) -> str:
    for signature, what in _NOT_VIDEO_SIGNATURES:
        if head.startswith(signature):
            return what
    text = head[:512].decode("utf-8", errors="replace")
    if text.count("\ufffd") <= 1 and all(c.isprintable() or c in "\r\n\t\ufffd" for c in text):
        return "text"
    return f"no known video container (first bytes {head[:8].hex(' ')})"


def _iso_boxes_problem(data: bytes) -> str | None:
    """Why the top-level boxes of an MP4/QuickTime file show it cut off or damaged, or None.

    Junk after a complete `moov` and `mdat` is tolerated (decoders ignore it);
    an `mdat` running past the end of the file never is: its frames are missing.
    """
    pos, seen = 0, set()
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        header = 8
        if size == 1 and pos + 16 <= len(data):
            size, header = struct.unpack(">Q", data[pos + 8 : pos + 16])[0], 16
        elif size == 0:  # the last box runs to the end of the file
            size = len(data) - pos
        complete = {b"moov", b"mdat"} <= seen
        if not all(32 <= c < 127 for c in kind) or size < header:
            return None if complete else f"truncated or corrupt: unreadable box at byte {pos} of {len(data)}"
        if pos + size > len(data):
            if complete and kind != b"mdat":
                return None
            return (
                f"truncated or corrupt: the '{kind.decode('ascii')}' box at byte {pos} needs {size} bytes "
                f"but the file has only {len(data) - pos} left; re-upload the whole file"
            )
        seen.add(kind)
        pos += size
    if b"moov" not in seen:
        return "truncated or corrupt: no 'moov' index box (the upload may be incomplete)"
    return None


def _riff_problem(data: bytes, start: int = 0, end: int | None = None, depth: int = 0) -> str | None:
    """Why the chunks of an AVI (RIFF) file show it cut off or damaged, or None.

    Checked because decord crashes the whole process (SIGSEGV) on an MJPEG AVI
    whose last frame is cut short; every chunk must fit inside its parent.
    """
    end = len(data) if end is None else end
    pos = start
    while pos + 8 <= end:
        fourcc, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        if depth == 0 and fourcc != b"RIFF":
            return None if pos else "truncated or corrupt: no RIFF header"  # junk after the last RIFF chunk
        if pos + 8 + size > end + (depth == 0):  # a missing final pad byte is harmless
            where = "file" if depth == 0 else "enclosing list"
            return (
                f"truncated or corrupt: the '{fourcc.decode('latin-1')}' chunk at byte {pos} needs {size} bytes "
                f"but the {where} has only {end - pos - 8} left; re-upload the whole file"
            )
        if fourcc in (b"RIFF", b"LIST"):
            if size < 4:
                return f"truncated or corrupt: an unfinished '{fourcc.decode()}' chunk at byte {pos} (size {size})"
            if depth < 3:
                problem = _riff_problem(data, pos + 12, pos + 8 + size, depth + 1)
                if problem:
                    return problem
        pos += 8 + size + (size & 1)
    return None


@dataclass(frozen=True)
class _Track:
    """What the header of one track declares, read before any decoder allocates for it."""

    kind: str  # "video", "audio", or the container's own word for other tracks
    width: int = 0  # coded frame size (0: not declared)
    height: int = 0
    frames: int | None = None  # declared frame (sample) count; None: not declared


_ISO_HANDLERS = {b"vide": "video", b"soun": "audio", b"text": "text", b"sbtl": "subtitle", b"subt": "subtitle"}


def _iso_children(data: bytes, start: int, end: int):
    """(kind, payload start, box end) of the boxes in data[start:end]; stops at the first box that does not fit."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        header = 8
        if size == 1 and pos + 16 <= end:
            size, header = struct.unpack(">Q", data[pos + 8 : pos + 16])[0], 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            return
        yield kind, pos + header, pos + size
        pos += size


def _iso_child(data: bytes, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    return next(((s, e) for k, s, e in _iso_children(data, start, end) if k == kind), None)


def _iso_track(data: bytes, start: int, end: int) -> tuple[_Track, str | None]:
    """One `trak` box: its kind, coded size and sample count, and why its sample table cannot be right (or None)."""
    mdia = _iso_child(data, start, end, b"mdia")
    hdlr = mdia and _iso_child(data, *mdia, b"hdlr")
    handler = data[hdlr[0] + 8 : hdlr[0] + 12] if hdlr and hdlr[1] - hdlr[0] >= 12 else b""
    kind = _ISO_HANDLERS.get(handler, handler.decode("latin-1").strip() or "unknown")
    minf = mdia and _iso_child(data, *mdia, b"minf")
    stbl = minf and _iso_child(data, *minf, b"stbl")
    if not stbl:
        return _Track(kind), None
    width = height = 0
    stsd = _iso_child(data, *stbl, b"stsd")
    if kind == "video" and stsd and stsd[1] - stsd[0] >= 8 + 36:
        # the first VisualSampleEntry: size, format, 6 reserved, data ref (2), 16 bytes, then width and height
        width, height = struct.unpack(">HH", data[stsd[0] + 8 + 32 : stsd[0] + 8 + 36])
    frames, problem = None, None
    stsz = _iso_child(data, *stbl, b"stsz")
    stz2 = _iso_child(data, *stbl, b"stz2")
    if stsz and stsz[1] - stsz[0] >= 12:
        sample_size, frames = struct.unpack(">II", data[stsz[0] + 4 : stsz[0] + 12])
        table = 0 if sample_size else 4 * frames
        # (audio is left out: old QuickTime audio counts samples with a nominal size of 1 byte)
        if sample_size and kind == "video" and sample_size * frames > len(data):
            problem = f"its index claims {frames} samples of {sample_size} bytes but the file has {len(data)} bytes"
        elif 12 + table > stsz[1] - stsz[0]:
            problem = f"its index claims {frames} samples but lists only {(stsz[1] - stsz[0] - 12) // 4}"
    elif stz2 and stz2[1] - stz2[0] >= 12:
        field = data[stz2[0] + 7]
        frames = struct.unpack(">I", data[stz2[0] + 8 : stz2[0] + 12])[0]
        if 12 + (frames * max(field, 4) + 7) // 8 > stz2[1] - stz2[0]:
            problem = f"its index claims {frames} samples but lists fewer"
    return _Track(kind, width, height, frames), problem


def _iso_tracks(data: bytes) -> tuple[list[_Track], str | None] | None:
    """The tracks the `moov` box declares, and the first impossible sample table; None without a readable moov."""
    moov = _iso_child(data, 0, len(data), b"moov")
    if moov is None:
        return None
    tracks, problem = [], None
    for kind, start, end in _iso_children(data, *moov):
        if kind == b"trak":
            track, why = _iso_track(data, start, end)
            tracks.append(track)
            if why and problem is None:
                problem = f"{track.kind} track {len(tracks)}: {why}"
    return tracks, problem


def _avi_tracks(data: bytes) -> list[_Track] | None:
    """The streams of an AVI's `hdrl` list (kind, frame size and count from strh/strf), or None without one."""
    hdrl = next(
        (
            (s + 4, e)
            for k, s, e in _riff_children(data, 12, min(len(data), 8 + struct.unpack("<I", data[4:8])[0]))
            if k == b"LIST" and data[s : s + 4] == b"hdrl"
        ),
        None,
    )
    if hdrl is None:
        return None
    tracks = []
    for kind, start, end in _riff_children(data, *hdrl):
        if kind != b"LIST" or data[start : start + 4] != b"strl":
            continue
        chunks = {k: (s, e) for k, s, e in _riff_children(data, start + 4, end)}
        strh, strf = chunks.get(b"strh"), chunks.get(b"strf")
        if strh is None or strh[1] - strh[0] < 36:
            continue
        fcc = data[strh[0] : strh[0] + 4]
        frames = struct.unpack("<I", data[strh[0] + 32 : strh[0] + 36])[0]
        if fcc == b"vids":
            width = height = 0
            if strf and strf[1] - strf[0] >= 12:
                width, height = (abs(v) for v in struct.unpack("<ii", data[strf[0] + 4 : strf[0] + 12]))
            tracks.append(_Track("video", width, height, frames))
        else:
            tracks.append(_Track({b"auds": "audio", b"txts": "text"}.get(fcc, fcc.decode("latin-1")), frames=frames))
    return tracks


def _riff_children(data: bytes, start: int, end: int):
    pos = start
    while pos + 8 <= end:
        size = struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        if pos + 8 + size > end:
            return
        yield data[pos : pos + 4], pos + 8, pos + 8 + size
        pos += 8 + size + (size & 1)


def _header_problem(tracks: list[_Track], name: str) -> str | None:
    """Why the declared tracks cannot give a clip (no video, frames too large, too many frames), or None.

    Checked before the decoder sees the file: FFmpeg allocates frame buffers and
    its frame index from these declarations, so a few hundred bytes of header
    could otherwise claim gigabytes of memory.
    """
    video = [t for t in tracks if t.kind == "video"]
    if not video:
        kinds = " and ".join(sorted({t.kind for t in tracks}))
        return f"not a video: {name} holds only {kinds} tracks and no video track"
    track = video[0]
    if track.width * track.height > MAX_SOURCE_PIXELS:
        return (
            f"too large: its header declares frames of {track.width}x{track.height}, over {MAX_SOURCE_PIXELS} "
            "pixels; downscale the video"
        )
    if track.frames is not None and track.frames > MAX_SOURCE_FRAMES:
        return f"too long: its header declares {track.frames} frames, over {MAX_SOURCE_FRAMES}; cut the video"
    return None


def check_container(data: bytes, name: str) -> str:
    """The container family of `data`; SampleError for anything that is not a whole video file.

    MP4/MOV and AVI headers are also read for what they declare: a file with no
    video track, frames over MAX_SOURCE_PIXELS, more than MAX_SOURCE_FRAMES
    frames, or a sample index the file cannot hold is refused before decoding.
    """
    if not data:
        raise SampleError("decode", "empty file: 0 bytes; re-upload the video")
    head = data[:1024]
    kind = container_of(head)
    if kind is None:
        raise SampleError(
            "decode", f"not a video: {name} holds {_describe_non_video(head)}; expected MP4, MOV, AVI, MKV or WebM"
        )
    problem = _iso_boxes_problem(data) if kind == "mp4" else _riff_problem(data) if kind == "avi" else None
    if problem:
        raise SampleError("decode", problem)
    if kind == "mp4":
        found = _iso_tracks(data)
        if found is not None and found[1]:
            raise SampleError("decode", f"truncated or corrupt: {found[1]}; re-upload or re-encode the video")
        tracks = found[0] if found is not None else None
    else:
        tracks = _avi_tracks(data) if kind == "avi" else None
    problem = _header_problem(tracks, name) if tracks else None  # no tracks read (a compressed moov): FFmpeg's call
    if problem:
        raise SampleError("decode", problem)
    return kind


def check_source_size(size: int, name: str) -> None:
    """Refuse a file too big to read into a worker's memory, from its listed size, before reading it."""
    if size > MAX_SOURCE_BYTES:
        raise SampleError(
            "decode",
            f"too large: {name} is {size / 1024**3:.1f} GiB, over the {MAX_SOURCE_BYTES / 1024**3:.0f} GiB a worker "
            "reads into memory; cut it into shorter videos",
        )


# --------------------------------------------------------------------------- decord


def _decord():
    """decord, imported after torch (DESIGN.md pitfalls), late so that encoding clips never loads torch."""
    import torch  # noqa: F401, I001  (this order on purpose)
    import decord

    return decord


def _to_numpy(batch) -> np.ndarray:
    """decord returns its own NDArray, or a torch tensor if some other code switched decord's bridge."""
    if hasattr(batch, "asnumpy"):
        return batch.asnumpy()
    if hasattr(batch, "numpy"):
        return batch.numpy()
    return np.asarray(batch)


def _short(exc: BaseException, limit: int = 160) -> str:
    """decord's messages carry timestamps and build paths; keep the part a person can read."""
    text = str(exc).strip()
    text = text.splitlines()[-1] if text else type(exc).__name__
    return re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", text)[:limit]


def _open_reader(data: bytes, name: str, width: int = -1, height: int = -1):
    check_container(data, name)
    decord = _decord()
    try:
        return decord.VideoReader(io.BytesIO(data), width=width, height=height, num_threads=1)
    except Exception as exc:  # RuntimeError, DECORDError or AssertionError, depending on where it gives up
        if "cannot find video stream" in str(exc):
            raise SampleError("decode", f"not a video: {name} has no video stream (audio only?)") from None
        raise SampleError("decode", f"cannot decode: {name} does not open as a video ({_short(exc)})") from None


def _usable_fps(reader, name: str) -> tuple[float, bool]:
    try:
        fps = float(reader.get_avg_fps())
    except Exception:
        fps = float("nan")
    if math.isfinite(fps) and 0.5 <= fps <= 1000:
        return fps, False
    log.info("%s reports no usable frame rate (%s); assuming %.0f fps", name, fps, DEFAULT_FPS)
    return DEFAULT_FPS, True


def probe_video(data: bytes, name: str, min_frames: int = MIN_FRAMES) -> VideoFacts:
    """Frame count, rate and size of a video; decodes only its first frame, to know it decodes at all."""
    reader = _open_reader(data, name)
    num_frames = len(reader)
    if num_frames < min_frames:
        plural = "frame" if num_frames == 1 else "frames"
        raise SampleError("decode", f"too short: only {num_frames} {plural}; need at least {min_frames}")
    if num_frames > MAX_SOURCE_FRAMES:  # containers whose headers check_container does not read
        raise SampleError("decode", f"too long: {num_frames} frames, over {MAX_SOURCE_FRAMES}; cut the video")
    try:
        height, width = _to_numpy(reader[0]).shape[:2]
    except Exception as exc:
        raise SampleError(
            "decode", f"truncated or corrupt: the first frame of {name} does not decode ({_short(exc)})"
        ) from None
    if width * height > MAX_SOURCE_PIXELS:
        raise SampleError("decode", f"too large: frames of {width}x{height} exceed {MAX_SOURCE_PIXELS} pixels")
    fps, assumed = _usable_fps(reader, name)
    return VideoFacts(int(num_frames), fps, int(width), int(height), num_frames / fps, assumed)


def choose_stride(num_source: int, num_frames: int, max_stride: int, rng: np.random.Generator) -> int:
    """A random stride in 1..max_stride (the recipe's random frame rate), lowered until the clip fits."""
    stride = int(rng.integers(1, max_stride + 1))
    while stride > 1 and (num_frames - 1) * stride + 1 > num_source:
        stride -= 1
    return stride


def choose_frames(
    num_source: int,
    num_frames: int,
    stride: int,
    min_frames: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Source indices of a clip at `stride` from a random start; shorter than `num_frames` only if it must be."""
    length = min(num_frames, (num_source - 1) // stride + 1)
    if length < min_frames:
        raise SampleError(
            "decode",
            f"too short: {num_source} frames give a {length}-frame clip at stride {stride}; need at least {min_frames}",
        )
    span = (length - 1) * stride + 1
    start = int(rng.integers(0, num_source - span + 1))
    return start + stride * np.arange(length, dtype=np.int64)


def _check_clip_args(
    height: int, width: int, num_frames: int, stride: int | None, max_stride: int, min_frames: int
) -> None:
    if height < 2 or width < 2 or height % 2 or width % 2:
        raise ValueError(
            f"label resolution {height}x{width} must be even (odd sizes come back a pixel smaller "
            "from video encoders); use e.g. 384x512"
        )
    if not 1 <= min_frames <= num_frames:
        raise ValueError(f"need 1 <= min_frames ({min_frames}) <= num_frames ({num_frames})")
    if max_stride < 1 or (stride is not None and stride < 1):
        raise ValueError(f"stride ({stride}) and max_stride ({max_stride}) must be at least 1")


def decode_clip(
    data: bytes,
    name: str,
    height: int = 384,
    width: int = 512,
    num_frames: int = 64,
    stride: int | None = None,
    max_stride: int = 4,
    min_frames: int = MIN_FRAMES,
    *,
    rng: np.random.Generator,
    facts: VideoFacts | None = None,
) -> Clip:
    """Up to `num_frames` frames at `stride` from a random start, resized to height x width by the decoder.

    A given stride is kept; a random one (stride=None) is lowered until
    `num_frames` fit. A video too short even then gives a shorter clip, down to
    `min_frames`. Pass `facts` from `probe_video` to skip probing again.
    """
    _check_clip_args(height, width, num_frames, stride, max_stride, min_frames)
    if facts is None:
        facts = probe_video(data, name, min_frames=min_frames)
    reader = _open_reader(data, name, width=width, height=height)
    num_source = len(reader)
    if stride is None:
        stride = choose_stride(num_source, num_frames, max_stride, rng)
    indices = choose_frames(num_source, num_frames, stride, min_frames, rng)
    try:
        frames = _to_numpy(reader.get_batch(indices.tolist()))
    except Exception as exc:
        if "from_size == to_size" not in str(exc):
            raise SampleError(
                "decode", f"truncated or corrupt: frames {indices[0]}..{indices[-1]} do not decode ({_short(exc)})"
            ) from None
        frames = _decode_then_resize(data, name, indices, height, width)
    if frames.shape != (len(indices), height, width, 3) or frames.dtype != np.uint8:
        raise SampleError("decode", f"cannot decode: the decoder returned {frames.dtype} frames of {frames.shape}")
    return Clip(
        frames=np.ascontiguousarray(frames),
        frame_indices=indices,
        stride=stride,
        source_fps=facts.fps,
        fps=facts.fps / stride,
        source_size=(facts.height, facts.width),
    )


def _decode_then_resize(data: bytes, name: str, indices: np.ndarray, height: int, width: int) -> np.ndarray:
    """decord's scaler returns frames of the wrong size for some targets (e.g. 48 px wide from 368x480).

    Then the frames are decoded at their own size and resized here; area
    averaging when shrinking keeps them close to what the decoder would give.
    """
    reader = _open_reader(data, name)
    try:
        full = _to_numpy(reader.get_batch(indices.tolist()))
    except Exception as exc:
        raise SampleError(
            "decode", f"truncated or corrupt: frames {indices[0]}..{indices[-1]} do not decode ({_short(exc)})"
        ) from None
    shrink = full.shape[1] >= height and full.shape[2] >= width
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return np.stack([cv2.resize(frame, (width, height), interpolation=interpolation) for frame in full])


# --------------------------------------------------------------------------- stored clips


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 arrays in dB (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _jpegs(frames: np.ndarray, quality: int) -> list[np.ndarray]:
    params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    out = []
    for frame in frames:
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), params)
        if not ok:
            raise RuntimeError(f"OpenCV could not JPEG-encode a frame of {frame.shape}")
        out.append(buf)
    return out


def _worst_psnr(frames: np.ndarray, jpegs: list[np.ndarray]) -> float:
    """The lowest PSNR over a few evenly spaced frames decoded back (about 10 ms a frame at 384x512)."""
    picks = np.unique(np.linspace(0, len(frames) - 1, min(len(frames), _PSNR_CHECK_FRAMES)).round().astype(int))
    return min(
        psnr(cv2.cvtColor(cv2.imdecode(jpegs[i], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB), frames[i]) for i in picks
    )


def encode_clip(frames: np.ndarray, fps: float, min_psnr: float | None = MIN_PSNR) -> bytes:
    """frames: uint8 [T, H, W, 3] RGB, H and W even -> MJPEG-in-AVI bytes that `decode_clip_bytes` reads.

    Quality 95 unless a few frames checked back fall below `min_psnr` dB, then
    quality 100; `min_psnr=None` skips the check.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] with T >= 1, got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frame size {frames.shape[1]}x{frames.shape[2]} must be even; resize the clip first")
    fps = float(fps) if math.isfinite(fps) and fps > 0 else DEFAULT_FPS
    jpegs = _jpegs(frames, CLIP_QUALITY)
    if min_psnr is not None and _worst_psnr(frames, jpegs) < min_psnr:
        jpegs = _jpegs(frames, 100)
    return mjpeg_avi([j.tobytes() for j in jpegs], frames.shape[2], frames.shape[1], fps)


def _chunk(fourcc: bytes, payload: bytes) -> bytes:
    return fourcc + struct.pack("<I", len(payload)) + payload + (b"\0" if len(payload) % 2 else b"")


def _list(kind: bytes, payload: bytes) -> bytes:
    return b"LIST" + struct.pack("<I", len(payload) + 4) + kind + payload


def mjpeg_avi(jpegs: list[bytes], width: int, height: int, fps: float) -> bytes:
    """JPEG frames in an AVI (RIFF) file: one MJPG video stream and an `idx1` index.

    Written by hand because OpenCV's AVI writer re-encodes frames itself (4:2:0);
    the layout follows the AVI 1.0 reference (main header, one stream header and
    BITMAPINFOHEADER, a `movi` list of `00dc` chunks, index offsets from `movi`).
    """
    rate = max(1, round(fps * 1000))  # frames per 1000 s, so fractional rates survive
    largest = max((len(j) for j in jpegs), default=0)
    avih = struct.pack(
        "<10I16x", round(1e9 / rate), largest * rate // 1000, 0, 0x10, len(jpegs), 0, 1, largest, width, height
    )
    strh = struct.pack(
        "<4s4sIHHIIIIIIIIhhhh",
        b"vids",
        b"MJPG",
        0,
        0,
        0,
        0,
        1000,
        rate,
        0,
        len(jpegs),
        largest,
        0xFFFFFFFF,
        0,
        0,
        0,
        width,
        height,
    )
    strf = struct.pack("<IiiHH4sIiiII", 40, width, height, 1, 24, b"MJPG", width * height * 3, 0, 0, 0, 0)
    header = _list(b"hdrl", _chunk(b"avih", avih) + _list(b"strl", _chunk(b"strh", strh) + _chunk(b"strf", strf)))
    movi, index, offset = [], [], 4
    for jpeg in jpegs:
        chunk = _chunk(b"00dc", jpeg)
        index.append(struct.pack("<4sIII", b"00dc", 0x10, offset, len(jpeg)))
        movi.append(chunk)
        offset += len(chunk)
    body = b"AVI " + header + _list(b"movi", b"".join(movi)) + _chunk(b"idx1", b"".join(index))
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _avi_jpegs(data: bytes) -> list[bytes] | None:
    """The JPEG frames of an MJPEG AVI as `mjpeg_avi` writes it, or None for any other file."""
    if data[:4] != b"RIFF" or data[8:12] != b"AVI ":
        return None
    pos, mjpeg, frames = 12, False, None
    while pos + 12 <= len(data):
        fourcc, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        if fourcc == b"LIST" and data[pos + 8 : pos + 12] == b"hdrl":
            mjpeg = b"vidsMJPG" in data[pos : pos + 8 + size]
        elif fourcc == b"LIST" and data[pos + 8 : pos + 12] == b"movi":
            frames, inner, end = [], pos + 12, min(pos + 8 + size, len(data))
            while inner + 8 <= end:
                kind, length = data[inner : inner + 4], struct.unpack("<I", data[inner + 4 : inner + 8])[0]
                if kind[2:] != b"dc" or inner + 8 + length > end:
                    return None  # audio, 'rec ' lists or a cut file: leave it to FFmpeg
                frames.append(data[inner + 8 : inner + 8 + length])
                inner += 8 + length + (length & 1)
        pos += 8 + size + (size & 1)
    return frames if mjpeg and frames else None


def decode_clip_bytes(data: bytes) -> np.ndarray:
    """A stored clip (`encode_clip` output) -> uint8 [T, H, W, 3] RGB, all frames.

    Our own MJPEG AVI is unpacked here and its JPEGs decoded by OpenCV: no torch
    import for readers such as the dashboard, and no dependence on a decord bug
    that rejects some small widths (48 pixels, for one). Anything else goes to decord.
    """
    jpegs = _avi_jpegs(data)
    if jpegs is not None:
        frames = [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR) for j in jpegs]
        if all(f is not None and f.shape == frames[0].shape for f in frames):
            return np.stack([cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in frames])
    reader = _open_reader(data, "stored clip")
    try:
        return _to_numpy(reader.get_batch(list(range(len(reader)))))
    except Exception as exc:
        raise SampleError("decode", f"cannot decode: stored clip of {len(data)} bytes ({_short(exc)})") from None
