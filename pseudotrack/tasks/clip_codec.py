"""Store a clip exactly as the teachers saw it, near-lossless, and read stored clips back.

A stored clip is Motion-JPEG in Matroska: each frame a 4:4:4 JPEG from
`cv2.imencode` at quality 95, muxed by PyAV (FFmpeg's Matroska writer), so any
FFmpeg-based player or reader opens it. 4:4:4 matters: chroma subsampling
(4:2:0, what video writers default to) costs saturated colour edges about 8 dB.
A clip that would come back below `min_psnr` (film grain, noise, tiny textured
frames) is stored at quality 100, about 50 dB on anything, pure noise included;
the check decodes the frames with the largest JPEGs (the likeliest to fall
below) with the same decoder readers use.

Why MJPEG and not H.264 (bench/bench_clip_codec.py, on the sample clips at
64x384x512): x264 in 4:4:4 at CRF 10 stores a clip in a half to a quarter of
the bytes, but even its fastest preset costs several times MJPEG's encode CPU
(plus a whole-clip decode for the quality check, since its frames depend on
each other), and on a GPU host the CPU stages of a label batch are the
bottleneck. The figures and the choice are in the README.

Reading goes through PyAV whatever the container and codec, so shards written
before this format (an MJPEG AVI under the field `mp4`) still decode.
"""

from __future__ import annotations

import io
import math
from fractions import Fraction

import cv2
import numpy as np

from ..errors import SampleError
from .containers import check_container, short

CLIP_FIELD = "clip.mkv"  # the shard field of the stored clip (WebDataset: `<key>.clip.mkv`)
LEGACY_CLIP_FIELDS = ("mp4",)  # shards written before: an MJPEG AVI under a misleading name
CLIP_FORMAT = "matroska"
CLIP_CODEC = "mjpeg"
CLIP_QUALITY = 95  # JPEG quality of stored frames; raised to 100 when a clip would fall below MIN_PSNR
MIN_PSNR = 40.0
DEFAULT_FPS = 30.0  # written when a clip's frame rate is unusable
_PSNR_CHECK_FRAMES = 4  # frames decoded back to check a stored clip's quality (the largest JPEGs)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 arrays in dB (inf when equal).

    OpenCV sums the squared differences in one pass without float copies of
    both frames (the same value as numpy's float64 mean, to rounding).
    """
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    if a.shape != b.shape:
        raise ValueError(f"psnr of arrays of different shapes {a.shape} and {b.shape}")
    mse = cv2.norm(a.reshape(-1), b.reshape(-1), cv2.NORM_L2SQR) / a.size if a.size else 0.0
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def clip_description(quality: int = CLIP_QUALITY) -> dict:
    """What a sample's JSON records about its stored clip."""
    return {"field": CLIP_FIELD, "container": CLIP_FORMAT, "codec": CLIP_CODEC, "jpeg_quality": quality}


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] with T >= 1, got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frame size {frames.shape[1]}x{frames.shape[2]} must be even; resize the clip first")
    return frames


def jpegs(frames: np.ndarray, quality: int) -> list[bytes]:
    """Each RGB frame as a 4:4:4 JPEG (OpenCV's libjpeg-turbo: FFmpeg's own MJPEG encoder is slower and coarser).

    Each frame goes to OpenCV's BGR order in one reused buffer: a fresh array per frame (or one for the
    whole clip) costs page faults on memory written once.
    """
    params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    bgr = np.empty(frames.shape[1:], np.uint8)
    out = []
    for frame in frames:
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR, dst=bgr), params)
        if not ok:
            raise RuntimeError(f"OpenCV could not JPEG-encode a frame of {frame.shape}")
        out.append(buf.tobytes())
    return out


def _decode_jpegs(data: list[bytes]) -> list[np.ndarray]:
    """JPEG frames decoded by FFmpeg's MJPEG decoder, as `decode_clip_bytes` decodes them.

    On one thread, decoder and colour conversion alike (the same pixels; FFmpeg's default of a thread per
    core only adds CPU seconds in a worker that is one of many).
    """
    import av

    codec = av.CodecContext.create("mjpeg", "r")
    codec.thread_count = 1
    return [
        frame.reformat(format="rgb24", threads=1).to_ndarray()
        for jpeg in data
        for frame in codec.decode(av.Packet(jpeg))
    ]


def worst_psnr(frames: np.ndarray, data: list[bytes]) -> float:
    """The lowest PSNR over the frames whose JPEGs are largest, decoded back.

    At one quality setting the quantisation error grows with a frame's fine
    detail and noise, and so does its JPEG, so the largest JPEGs are the
    frames likeliest to fall below the bar: a clip whose one frame is noise is
    caught, where evenly spaced picks could miss it. Checking a few frames,
    not all, keeps the check a small part of encoding.
    """
    sizes = np.array([len(jpeg) for jpeg in data])
    picks = np.sort(np.argsort(-sizes, kind="stable")[: min(len(frames), _PSNR_CHECK_FRAMES)])
    back = _decode_jpegs([data[i] for i in picks])
    if len(back) != len(picks):
        return -math.inf
    return min(psnr(b, frames[i]) for b, i in zip(back, picks, strict=True))


def mux_jpegs(data: list[bytes], width: int, height: int, fps: float, container_format: str = CLIP_FORMAT) -> bytes:
    """JPEG frames (4:4:4) as an MJPEG video stream in a container PyAV writes, one packet per frame."""
    import av

    rate = Fraction(fps if math.isfinite(fps) and fps > 0 else DEFAULT_FPS).limit_denominator(1001)
    buf = io.BytesIO()
    # bitexact: without it FFmpeg's Matroska writer puts random segment and track UIDs (and its version) in
    # every file, so the same clip would not give the same bytes in two runs or two worker processes
    with av.open(buf, "w", format=container_format, container_options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream("mjpeg", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuvj444p"
        # Matroska's statistics tag, in the header: a reader can tell a clip cut short from a short clip
        stream.metadata["NUMBER_OF_FRAMES"] = str(len(data))
        for index, jpeg in enumerate(data):
            packet = av.Packet(jpeg)
            packet.stream, packet.time_base = stream, 1 / rate
            packet.pts = packet.dts = index
            packet.duration, packet.is_keyframe = 1, True
            out.mux(packet)
    return buf.getvalue()


def encode_clip(frames: np.ndarray, fps: float, min_psnr: float | None = MIN_PSNR) -> bytes:
    """frames: uint8 [T, H, W, 3] RGB, H and W even -> Matroska bytes that `decode_clip_bytes` reads.

    Quality 95 unless the frames with the largest JPEGs, decoded back, fall below `min_psnr` dB, then
    quality 100; `min_psnr=None` skips the check.
    """
    return encode_clip_described(frames, fps, min_psnr)[0]


def encode_clip_described(frames: np.ndarray, fps: float, min_psnr: float | None = MIN_PSNR) -> tuple[bytes, dict]:
    """`encode_clip`, and what the sample's JSON records about the stored clip (`clip_description`)."""
    frames = _check_frames(frames)
    quality = CLIP_QUALITY
    data = jpegs(frames, quality)
    if min_psnr is not None and worst_psnr(frames, data) < min_psnr:
        quality = 100
        data = jpegs(frames, quality)
    return mux_jpegs(data, frames.shape[2], frames.shape[1], fps), clip_description(quality)


def _int(text: str | None) -> int:
    try:
        return max(0, int(text or 0))
    except ValueError:
        return 0


def decode_clip_bytes(data: bytes) -> np.ndarray:
    """A stored clip -> uint8 [T, H, W, 3] RGB, all frames; any container and codec FFmpeg reads.

    This reads today's Matroska clips and the MJPEG AVIs of older shards alike,
    and never imports torch (the dashboard reads clips too).
    """
    import av

    name = f"stored clip of {len(data)} bytes"
    check_container(data, name)
    try:
        with av.open(io.BytesIO(data), "r") as container:
            stream = container.streams.video[0]
            declared = stream.frames or _int(stream.metadata.get("NUMBER_OF_FRAMES"))
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except Exception as exc:
        raise SampleError("decode", f"truncated or corrupt: {name} does not decode ({short(exc)})") from None
    if not frames or (declared and len(frames) < declared):
        raise SampleError("decode", f"truncated or corrupt: {name} holds {len(frames)} of its {declared} frames")
    if any(f.shape != frames[0].shape for f in frames):
        raise SampleError("decode", f"cannot decode: {name} changes frame size mid-clip")
    return np.stack(frames)
