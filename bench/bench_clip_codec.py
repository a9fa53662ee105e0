"""Which codec stores a labelled clip: bytes, worst-frame PSNR and CPU seconds per clip, MJPEG against H.264.

Clips are decoded from the sample videos as a label batch decodes them (64
frames at 384x512, squeezed), then stored by each candidate and read back:

- the shipped codec (tasks/clip_codec.py): 4:4:4 JPEGs at quality 95 from
  OpenCV, muxed into Matroska by PyAV;
- H.264 from PyAV's libx264, 4:4:4 (yuv444p, full range), at a few CRFs and
  presets, in Matroska.

Columns: MB per clip; the worst PSNR over all frames (dB); CPU seconds
(process time, all threads) to encode, to check the quality guarantee (decode
back what `MIN_PSNR` needs: a few JPEGs for MJPEG, the whole clip for H.264,
whose frames depend on each other), and to read the whole clip back. Each
figure is the best of --repeats runs.

    PYTHONPATH=. /work/main/.venv/bin/python bench/bench_clip_codec.py [--videos DIR] [--repeats 2]
"""

from __future__ import annotations

import argparse
import io
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from pseudotrack.tasks.clip_codec import (
    CLIP_QUALITY,
    MIN_PSNR,
    decode_clip_bytes,
    jpegs,
    mux_jpegs,
    psnr,
    worst_psnr,
)
from pseudotrack.tasks.decode import decode_clip

H264 = [("ultrafast", 10), ("superfast", 10), ("veryfast", 10), ("veryfast", 8), ("medium", 10)]


def encode_h264(frames: np.ndarray, fps: float, crf: int, preset: str) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv444p"
        stream.options = {"crf": str(crf), "preset": preset}
        stream.codec_context.color_range = 2  # full range (JPEG): limited range costs bear 0.5 dB at CRF 10
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv444p", dst_color_range=2)
            out.mux(stream.encode(picture))
        out.mux(stream.encode())
    return buf.getvalue()


def cpu(fn, *args):
    """fn(*args) and the CPU seconds it took (process time: every thread of this process)."""
    start = time.process_time()
    result = fn(*args)
    return result, time.process_time() - start


def encode_mjpeg(frames: np.ndarray, fps: float) -> tuple[bytes, list[bytes]]:
    """The shipped encoder without its quality check (timed separately): JPEGs, then the Matroska mux."""
    encoded = jpegs(frames, CLIP_QUALITY)
    return mux_jpegs(encoded, frames.shape[2], frames.shape[1], fps), encoded


def measure(frames: np.ndarray, fps: float, codec: str, repeats: int) -> dict:
    best: dict = {}
    for _ in range(repeats):
        if codec == "mjpeg":
            (data, encoded), enc = cpu(encode_mjpeg, frames, fps)
            _, check = cpu(worst_psnr, frames, encoded)
        else:
            preset, crf = codec.split()
            data, enc = cpu(encode_h264, frames, fps, int(crf), preset)
            _, check = cpu(decode_clip_bytes, data)
        back, dec = cpu(decode_clip_bytes, data)
        run = {"enc": enc, "check": check, "dec": dec}
        best = {k: min(v, best.get(k, v)) for k, v in run.items()}
    assert back.shape == frames.shape
    best["mb"] = len(data) / 1e6
    best["psnr"] = min(psnr(a, b) for a, b in zip(back, frames, strict=True))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "videos"))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    paths = sorted(Path(args.videos).glob("*.mp4"))
    if not paths:
        raise SystemExit(f"no .mp4 videos in {args.videos}")
    codecs = ["mjpeg"] + [f"{preset} {crf}" for preset, crf in H264]
    rows: dict[str, list[dict]] = {c: [] for c in codecs}
    print(f"{'clip':8s} {'codec':28s} {'MB':>6s} {'worst dB':>8s} {'enc s':>6s} {'check s':>7s} {'read s':>6s}")
    for path in paths:
        clip = decode_clip(path.read_bytes(), path.name, 384, 512, 64, rng=np.random.default_rng(0))
        for codec in codecs:
            got = measure(clip.frames, clip.fps, codec, args.repeats)
            rows[codec].append(got)
            label = "MJPEG q95 4:4:4" if codec == "mjpeg" else "H.264 4:4:4 {} crf{}".format(*codec.split())
            print(
                f"{path.stem:8s} {label:28s} {got['mb']:6.2f} {got['psnr']:8.1f} {got['enc']:6.2f} "
                f"{got['check']:7.2f} {got['dec']:6.2f}  ({len(clip.frames)} frames)",
                flush=True,
            )
    print(f"\nover {len(paths)} clips (min-max); worst-frame PSNR must stay >= {MIN_PSNR:.0f} dB")
    for codec, got in rows.items():
        label = "MJPEG q95 4:4:4" if codec == "mjpeg" else "H.264 4:4:4 {} crf{}".format(*codec.split())

        def span(key: str, fmt: str, got=got) -> str:
            values = [g[key] for g in got]
            return f"{format(min(values), fmt)}-{format(max(values), fmt)}"

        ok = "ok" if min(g["psnr"] for g in got) >= MIN_PSNR else "BELOW"
        print(
            f"{label:28s} MB {span('mb', '.2f'):>10s}  dB {span('psnr', '.1f'):>9s} {ok:5s}  "
            f"enc {span('enc', '.2f')} s  check {span('check', '.2f')} s  read {span('dec', '.2f')} s"
        )


if __name__ == "__main__":
    main()
