"""What kind of file a source is, and whether its container is a whole video, with a reason a person can act on.

Every refusal is a `SampleError("decode", reason)` whose reason starts with a
stable category ("empty file", "not a video", "truncated or corrupt", "cannot
decode", "too large", "too long") followed by details, so failure tables group
by the category while a person still sees what was wrong.

Three layers, cheapest first, all before decord opens the file (decord kills
the whole process with SIGSEGV on an MJPEG AVI whose last frame is cut short):

1. The first bytes must announce a video container. FFmpeg itself happily
   "opens" a PNG or JPEG (as a one-frame image stream) and often probes random
   bytes as MP3, so this small allowlist is what turns an uploaded photo, a
   text file or noise into "not a video: ... holds a PNG image".
2. What the header of an MP4/MOV or AVI declares for its video track: frame
   size and frame count. These few reads stay byte-level on purpose: FFmpeg
   sizes its sample index and frame buffers from these declarations while
   opening the file, so a 20 KB file claiming 10^8 samples costs it 800 MB
   before any library call could refuse it. Nothing else is parsed by hand.
3. PyAV (FFmpeg's demuxers) opens the container and says the rest: no video
   stream (an audio-only upload), a header it cannot read (a cut-off upload
   without its `moov` index), a codec it has no decoder for, and, from the
   packets at the end of the stream, a file cut short: the demuxer flags a
   packet the file ends inside, or finds none where the index promises them.
   Only the last group of pictures is read (a seek), so a 100,000-frame video
   costs what a short one does.
"""

from __future__ import annotations

import contextlib
import io
import re
import struct
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import SampleError

MAX_SOURCE_PIXELS = 8192 * 8192  # larger frames are refused rather than exhausting a worker's memory
MAX_SOURCE_FRAMES = 1_000_000  # 9 hours at 30 fps; decord indexes every frame (~20 us, ~700 bytes each)
MAX_SOURCE_BYTES = 4 * 1024**3  # a worker reads the whole file into memory; larger files are refused unread

T = TypeVar("T")

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


def describe_non_video(head: bytes) -> str:
    """What a file that announces no video container seems to hold, in words."""
    for signature, what in _NOT_VIDEO_SIGNATURES:
        if head.startswith(signature):
            return what
    text = head[:512].decode("utf-8", errors="replace")
    if text.count("\ufffd") <= 1 and all(c.isprintable() or c in "\r\n\t\ufffd" for c in text):
        return "text"
    return f"no known video container (first bytes {head[:8].hex(' ')})"


def short(exc: BaseException, limit: int = 200) -> str:
    """Library messages carry timestamps, build paths and errno numbers; keep the part a person can read."""
    text = str(exc).strip()
    text = text.splitlines()[-1] if text else type(exc).__name__
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", text)
    text = re.sub(r"^\[Errno -?\d+\] ", "", text)
    return text.replace(": '<none>'", "")[:limit]


# --------------------------------------------------------------------------- declared sizes (bytes, see layer 2)


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


def _iso_video_declarations(data: bytes) -> list[tuple[int, int, int | None, str | None]]:
    """(width, height, declared frames, why the sample table is impossible) of each video track of an MP4's moov."""
    moov = _iso_child(data, 0, len(data), b"moov")
    found = []
    for kind, start, end in _iso_children(data, *moov) if moov else ():
        mdia = kind == b"trak" and _iso_child(data, start, end, b"mdia")
        hdlr = mdia and _iso_child(data, *mdia, b"hdlr")
        if not hdlr or data[hdlr[0] + 8 : hdlr[0] + 12] != b"vide":
            continue
        minf = _iso_child(data, *mdia, b"minf")
        stbl = minf and _iso_child(data, *minf, b"stbl")
        if not stbl:
            continue
        width = height = 0
        stsd = _iso_child(data, *stbl, b"stsd")
        if stsd and stsd[1] - stsd[0] >= 8 + 36:
            # the first VisualSampleEntry: size, format, 6 reserved, data ref (2), 16 bytes, then width and height
            width, height = struct.unpack(">HH", data[stsd[0] + 8 + 32 : stsd[0] + 8 + 36])
        frames, problem = None, None
        stsz = _iso_child(data, *stbl, b"stsz")
        if stsz and stsz[1] - stsz[0] >= 12:
            sample_size, frames = struct.unpack(">II", data[stsz[0] + 4 : stsz[0] + 12])
            if sample_size and sample_size * frames > len(data):
                problem = f"its index claims {frames} samples of {sample_size} bytes but the file has {len(data)} bytes"
            elif not sample_size and 12 + 4 * frames > stsz[1] - stsz[0]:
                problem = f"its index claims {frames} samples but lists only {(stsz[1] - stsz[0] - 12) // 4}"
        found.append((width, height, frames, problem))
    return found


def _riff_children(data: bytes, start: int, end: int):
    pos = start
    while pos + 8 <= end:
        size = struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        if pos + 8 + size > end:
            return
        yield data[pos : pos + 4], pos + 8, pos + 8 + size
        pos += 8 + size + (size & 1)


def _avi_video_declarations(data: bytes) -> list[tuple[int, int, int | None, str | None]]:
    """(width, height, declared frames, None) of each video stream in an AVI's `hdrl` list."""
    if len(data) < 12:
        return []
    riff_end = min(len(data), 8 + struct.unpack("<I", data[4:8])[0])
    hdrl = next(
        ((s + 4, e) for k, s, e in _riff_children(data, 12, riff_end) if k == b"LIST" and data[s : s + 4] == b"hdrl"),
        None,
    )
    found = []
    for kind, start, end in _riff_children(data, *hdrl) if hdrl else ():
        if kind != b"LIST" or data[start : start + 4] != b"strl":
            continue
        chunks = {k: (s, e) for k, s, e in _riff_children(data, start + 4, end)}
        strh, strf = chunks.get(b"strh"), chunks.get(b"strf")
        if strh is None or strh[1] - strh[0] < 36 or data[strh[0] : strh[0] + 4] != b"vids":
            continue
        frames = struct.unpack("<I", data[strh[0] + 32 : strh[0] + 36])[0]
        width = height = 0
        if strf and strf[1] - strf[0] >= 12:
            width, height = (abs(v) for v in struct.unpack("<ii", data[strf[0] + 4 : strf[0] + 12]))
        found.append((width, height, frames, None))
    return found


def _declared_problem(data: bytes, kind: str) -> str | None:
    """Why what the header declares for its video track cannot be handed to FFmpeg, or None."""
    tracks = _iso_video_declarations(data) if kind == "mp4" else _avi_video_declarations(data) if kind == "avi" else []
    for number, (width, height, frames, problem) in enumerate(tracks, 1):
        if problem:
            return f"truncated or corrupt: video track {number}: {problem}; re-upload or re-encode the video"
        if width * height > MAX_SOURCE_PIXELS:
            return (
                f"too large: its header declares frames of {width}x{height}, over {MAX_SOURCE_PIXELS} "
                "pixels; downscale the video"
            )
        if frames is not None and frames > MAX_SOURCE_FRAMES:
            return f"too long: its header declares {frames} frames, over {MAX_SOURCE_FRAMES}; cut the video"
    return None


# --------------------------------------------------------------------------- the container, read by PyAV (layer 3)


def _stream_problem(container, name: str, size: int) -> str | None:
    """Why PyAV's view of an opened container shows no whole video stream, or None."""
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no"]
        return f"not a video: {name} holds only {' and '.join(kinds)} tracks and no video track"
    stream = container.streams.video[0]
    codec = stream.codec_context
    if codec is None or not codec.name:
        return f"cannot decode: {name} holds video in a codec FFmpeg has no decoder for; re-encode it as H.264"
    if stream.frames > MAX_SOURCE_FRAMES:
        return f"too long: its header declares {stream.frames} frames, over {MAX_SOURCE_FRAMES}; cut the video"
    # the end of the stream: seek to its last keyframe and read the packets from there
    if stream.duration:
        with contextlib.suppress(Exception):  # a container without an index cannot seek: read on from where it is
            container.seek((stream.start_time or 0) + stream.duration, stream=stream, backward=True)
    packets = 0
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's end-of-stream marker
            continue
        packets += 1
        ends_at = packet.pos + packet.size if packet.pos is not None and packet.pos >= 0 else 0
        if packet.is_corrupt or ends_at > size:
            return (
                f"truncated or corrupt: {name} ends inside a frame (byte {size} of a packet that needs "
                f"{max(ends_at, size + 1)}); re-upload the whole file"
            )
    if packets == 0:
        return f"truncated or corrupt: {name} has no frame data where its index says (cut short?); re-upload it"
    return None


def check_container(data: bytes, name: str) -> str:
    """The container family of `data`; SampleError for anything that is not a whole video file."""
    return check_and_look(data, name)[0]


def check_and_look(data: bytes, name: str, look: Callable[[Any], T] | None = None) -> tuple[str, T | None]:
    """`check_container`, and what `look(container)` finds in the PyAV container it opened, so that a file is
    opened once for both (decode.probe_video reads its facts this way).

    `look` runs before the end of the stream is read. A SampleError it raises is raised only once the
    container itself has passed, so a cut or damaged file is refused for what is wrong with the container.
    """
    import av

    if not data:
        raise SampleError("decode", "empty file: 0 bytes; re-upload the video")
    head = data[:1024]
    kind = container_of(head)
    if kind is None:
        raise SampleError(
            "decode", f"not a video: {name} holds {describe_non_video(head)}; expected MP4, MOV, AVI, MKV or WebM"
        )
    problem = _declared_problem(data, kind)
    if problem:
        raise SampleError("decode", problem)
    seen, refused = None, None
    try:
        with av.open(io.BytesIO(data), "r") as container:
            if look is not None and container.streams.video:
                try:
                    seen = look(container)
                except SampleError as exc:
                    refused = exc
            problem = _stream_problem(container, name, len(data))
    except Exception as exc:  # FFmpegError mostly; no other exception may escape for a bad file
        if kind == "mp4" and _iso_child(data, 0, len(data), b"moov") is None:  # FFmpeg's words for it go to its log
            problem = f"truncated or corrupt: FFmpeg cannot read {name}: it has no 'moov' index box"
        else:
            problem = f"truncated or corrupt: FFmpeg cannot read {name} as {kind} ({short(exc)})"
        problem += "; the upload may be incomplete: re-upload the whole file"
    if problem:
        raise SampleError("decode", problem)
    if refused is not None:
        raise refused
    return kind, seen


def check_source_size(size: int, name: str) -> None:
    """Refuse a file too big to read into a worker's memory, from its listed size, before reading it."""
    if size > MAX_SOURCE_BYTES:
        raise SampleError(
            "decode",
            f"too large: {name} is {size / 1024**3:.1f} GiB, over the {MAX_SOURCE_BYTES / 1024**3:.0f} GiB a worker "
            "reads into memory; cut it into shorter videos",
        )
