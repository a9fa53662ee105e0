"""Probe and decode source videos into clips at the label resolution, with decord.

Every failure on a bad file is a `SampleError("decode", reason)` whose reason
starts with a stable category ("empty file", "not a video", "truncated or
corrupt", "cannot decode", "too short", "too large", "too long") followed by
details (tasks/containers.py checks the file before decord sees it). No other
exception escapes for a bad file (checked on files cut and damaged at 16 places
each in seven container/codec pairs, and on the hostile corpus of
tests/test_hostile_input.py).

Time and memory stay bounded whatever a file declares: a file over
MAX_SOURCE_BYTES is refused from its listed size, unread; frames over
MAX_SOURCE_PIXELS or more than MAX_SOURCE_FRAMES frames are refused before
FFmpeg allocates for them; and a clip decodes only its own frames (from the
keyframe before the first), so a 100,000-frame video costs about what a short
one does.

Valid files that need care decode as a player shows them: a rotation in the
MP4 display matrix (phones' portrait videos) is applied by decord before the
resize, so frames are upright and `VideoFacts` gives the displayed size; a
variable-frame-rate video is read by frame index (every decoded frame once, in
order) and its `fps` is the average rate.

How a frame becomes height x width (`resize`, issue 18): `squeeze` scales the
whole frame to it whatever its shape (a 272x640 portrait video is squeezed
3.1x); `crop` scales the frame just enough to cover height x width, keeping its
aspect, and takes a random crop of that size (the same box on every frame);
`mixed` draws one of the two per video, as the CoTracker3 authors' real-data
loader does with `random_resize`. The draws come from the video's own
generator, so a clip is the same whatever batch or worker decodes it.

The probe reads its facts from the PyAV container `check_container` opens
anyway (frames counted from the packets as decord counts them, the first
keyframe decoded without conversion for its displayed size), so decord opens a
video once, at the clip's size. decord (FFmpeg) decodes the clip, and it is the
decoder that resizes, which is much cheaper than decoding full frames and
resizing after. Its habits shape the code
(DESIGN.md pitfalls): torch is imported before it, both width and height are
passed, sorted indices are read with one `get_batch`, and data goes in as
`io.BytesIO`.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np

from ..config import RESIZE_MODES
from ..errors import SampleError
from .containers import MAX_SOURCE_FRAMES, MAX_SOURCE_PIXELS, check_and_look
from .containers import short as _short

log = logging.getLogger(__name__)

DEFAULT_FPS = 30.0  # assumed when a container gives no usable frame rate (VideoFacts.fps_assumed)
MIN_FRAMES = 8


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
    resize:        how the frames were brought to the label size: "squeeze" or "crop"
    crop_box:      (x0, y0, x1, y1) of the source frame the clip shows, in source pixels (the whole frame
                   when squeezed); a clip pixel (u, v) shows source point x0 + (u + 0.5) * (x1 - x0) / W - 0.5
    """

    frames: np.ndarray
    frame_indices: np.ndarray
    stride: int
    source_fps: float
    fps: float
    source_size: tuple[int, int]
    resize: str = "squeeze"
    crop_box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)


# --------------------------------------------------------------------------- decord


def _decord():
    """decord, imported after torch (DESIGN.md pitfalls), late so that encoding clips never loads torch."""
    import torch  # noqa: F401, I001  (this order on purpose)
    import decord

    return decord


def _to_numpy(batch) -> np.ndarray:
    """decord returns its own NDArray, or a torch tensor if some other code switched decord's bridge.

    An NDArray is taken over through DLPack rather than copied: `asnumpy`
    copies the whole clip into fresh memory (page faults included), a large
    share of decoding's CPU for a 64-frame clip (bench/bench_cpu_stages.py).
    The array keeps decord's buffer alive and frees it when it goes.
    """
    if hasattr(batch, "to_dlpack"):
        from torch.utils.dlpack import from_dlpack  # torch is loaded before decord (`_decord`)

        return from_dlpack(batch.to_dlpack()).numpy()
    if hasattr(batch, "asnumpy"):
        return batch.asnumpy()
    if hasattr(batch, "numpy"):
        return batch.numpy()
    return np.asarray(batch)


def _open_reader(data: bytes, name: str, width: int = -1, height: int = -1):
    """A decord reader, only for bytes `probe_video` has checked (decode_clip takes its facts)."""
    decord = _decord()
    try:
        return decord.VideoReader(io.BytesIO(data), width=width, height=height, num_threads=1)
    except Exception as exc:  # RuntimeError, DECORDError or AssertionError, depending on where it gives up
        if "cannot find video stream" in str(exc):
            raise SampleError("decode", f"not a video: {name} has no video stream (audio only?)") from None
        raise SampleError("decode", f"cannot decode: {name} does not open as a video ({_short(exc)})") from None


def _usable_fps(rate, name: str) -> tuple[float, bool]:
    try:
        fps = float(rate)
    except (TypeError, ValueError, ZeroDivisionError):
        fps = float("nan")
    if math.isfinite(fps) and 0.5 <= fps <= 1000:
        return fps, False
    log.info("%s reports no usable frame rate (%s); assuming %.0f fps", name, fps, DEFAULT_FPS)
    return DEFAULT_FPS, True


def _first_look(container, data: bytes, name: str, skip: bool = True) -> tuple[int, int, int, object]:
    """(frames, displayed width, height, average rate) of the video stream, from one pass over its packets.

    Frames are counted as decord counts them (every packet of the stream, read until the demuxer stops),
    so the indices drawn from the count are decord's. Only the first frame is decoded, on one thread and
    without converting it: to know the stream decodes at all, and its size as shown (a quarter turn in
    the display matrix swaps width and height, as decord turns the frames upright). With `skip`, the
    packets after the first keyframe are not decoded at all (the decoder hands the held-back first frame
    over when flushed); a stream that gives no frame that way is decoded again from a fresh open.
    """
    import av

    stream = container.streams.video[0]
    codec = stream.codec_context
    codec.thread_count = 1
    frames, first = 0, None
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            break
        except av.FFmpegError:  # a read error ends the stream for decord's index too
            break
        if packet.size:
            frames += 1
            if frames > MAX_SOURCE_FRAMES:
                raise SampleError("decode", f"too long: over {MAX_SOURCE_FRAMES} frames; cut the video")
        if first is None:
            try:
                first = next(iter(packet.decode()), None)  # the empty packet at the end flushes the decoder
            except Exception as exc:
                raise SampleError(
                    "decode", f"truncated or corrupt: the first frame of {name} does not decode ({_short(exc)})"
                ) from None
            if skip and first is None and packet.is_keyframe:
                codec.skip_frame = "ALL"
    if first is None and skip:  # e.g. a keyframe whose picture needs the packets after it
        with av.open(io.BytesIO(data), "r") as again:
            return _first_look(again, data, name, skip=False)
    if first is None:
        raise SampleError("decode", f"truncated or corrupt: the first frame of {name} does not decode (no frame)")
    width, height = first.width, first.height
    if abs(round(first.rotation or 0)) % 180 == 90:
        width, height = height, width
    return frames, width, height, stream.average_rate


def probe_video(data: bytes, name: str, min_frames: int = MIN_FRAMES) -> VideoFacts:
    """Frame count, rate and size of a video, from the PyAV container `check_container` opens anyway.

    decord is not opened here: the clip's reader opens at the clip's size (`decode_clip`), so a video is
    opened once by each library, and the probe decodes only its first frame.
    """
    _, (num_frames, width, height, rate) = check_and_look(
        data, name, lambda container: _first_look(container, data, name)
    )
    if num_frames < min_frames:
        plural = "frame" if num_frames == 1 else "frames"
        raise SampleError("decode", f"too short: only {num_frames} {plural}; need at least {min_frames}")
    if width * height > MAX_SOURCE_PIXELS:
        raise SampleError("decode", f"too large: frames of {width}x{height} exceed {MAX_SOURCE_PIXELS} pixels")
    fps, assumed = _usable_fps(rate, name)
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


def choose_resize(mode: str, rng: np.random.Generator) -> str:
    """The resize a clip gets: `mode` itself, or for "mixed" squeeze or crop with even odds."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize={mode!r}: choose one of {', '.join(RESIZE_MODES)}")
    if mode == "mixed":
        return "squeeze" if rng.random() < 0.5 else "crop"
    return mode


def crop_geometry(
    source_size: tuple[int, int], height: int, width: int, rng: np.random.Generator
) -> tuple[tuple[int, int], tuple[int, int], tuple[float, float, float, float]]:
    """Where a random height x width crop comes from: ((scaled height, width), (top, left), source box).

    The frame is scaled by the smallest factor that makes it cover the crop,
    keeping its aspect, so the crop spans it along one side; the box is in
    source pixels (x0, y0, x1, y1).
    """
    src_h, src_w = source_size
    scale = max(height / src_h, width / src_w)
    scaled_h, scaled_w = max(height, round(src_h * scale)), max(width, round(src_w * scale))
    top = int(rng.integers(0, scaled_h - height + 1))
    left = int(rng.integers(0, scaled_w - width + 1))
    sy, sx = scaled_h / src_h, scaled_w / src_w
    box = (left / sx, top / sy, (left + width) / sx, (top + height) / sy)
    return (scaled_h, scaled_w), (top, left), box


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
    resize: str = "squeeze",
) -> Clip:
    """Up to `num_frames` frames at `stride` from a random start, brought to height x width by the decoder.

    A given stride is kept; a random one (stride=None) is lowered until
    `num_frames` fit. A video too short even then gives a shorter clip, down to
    `min_frames`. `resize` is "squeeze", "crop" or "mixed" (module docstring);
    squeeze draws nothing from `rng`. Pass `facts` from `probe_video` to skip
    probing again.
    """
    _check_clip_args(height, width, num_frames, stride, max_stride, min_frames)
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize={resize!r}: choose one of {', '.join(RESIZE_MODES)}")
    if facts is None:
        facts = probe_video(data, name, min_frames=min_frames)
    num_source = facts.num_frames
    if stride is None:
        stride = choose_stride(num_source, num_frames, max_stride, rng)
    indices = choose_frames(num_source, num_frames, stride, min_frames, rng)
    applied = choose_resize(resize, rng)
    source_size = (facts.height, facts.width)
    if applied == "crop":
        (scaled_h, scaled_w), (top, left), box = crop_geometry(source_size, height, width, rng)
    else:
        (scaled_h, scaled_w), (top, left) = (height, width), (0, 0)
        box = (0.0, 0.0, float(facts.width), float(facts.height))
    frames = _decode_at(data, name, indices, scaled_h, scaled_w)[:, top : top + height, left : left + width]
    if frames.shape != (len(indices), height, width, 3) or frames.dtype != np.uint8:
        raise SampleError("decode", f"cannot decode: the decoder returned {frames.dtype} frames of {frames.shape}")
    return Clip(
        frames=np.ascontiguousarray(frames),
        frame_indices=indices,
        stride=stride,
        source_fps=facts.fps,
        fps=facts.fps / stride,
        source_size=source_size,
        resize=applied,
        crop_box=tuple(float(v) for v in box),
    )


def _decode_at(data: bytes, name: str, indices: np.ndarray, height: int, width: int) -> np.ndarray:
    """The frames at `indices`, resized to height x width by decord's scaler (or by OpenCV where it errs)."""
    reader = _open_reader(data, name, width=width, height=height)
    try:
        frames = _to_numpy(reader.get_batch(indices.tolist()))
    except Exception as exc:
        if "from_size == to_size" not in str(exc):
            raise SampleError(
                "decode", f"truncated or corrupt: frames {indices[0]}..{indices[-1]} do not decode ({_short(exc)})"
            ) from None
        return _decode_then_resize(data, name, indices, height, width)
    return frames


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
