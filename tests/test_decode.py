"""Decoding: probing, clip choice and resizing, every kind of bad file, and the near-lossless stored clip."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import videos

from pseudotrack.errors import SampleError
from pseudotrack.synthetic import render_scene
from pseudotrack.tasks.clip_codec import (
    decode_clip_bytes,
    encode_clip,
    encode_clip_described,
    jpegs,
    mux_jpegs,
    psnr,
)
from pseudotrack.tasks.decode import _decord, choose_stride, decode_clip, probe_video


@pytest.fixture(scope="module")
def real(sample_videos) -> dict[str, bytes]:
    return {p.stem: p.read_bytes() for p in sample_videos}


def test_probe_real_clips(real):
    facts = {name: probe_video(data, name) for name, data in real.items()}
    bear, cat, apple = facts["bear"], facts["cat"], facts["apple"]
    assert (bear.num_frames, bear.width, bear.height, bear.fps) == (82, 854, 480, 30.0)
    assert (cat.num_frames, cat.width, cat.height, cat.fps) == (87, 368, 480, 20.0)
    assert (apple.num_frames, apple.width, apple.height, apple.fps) == (50, 1296, 720, 10.0)
    assert cat.duration_s == pytest.approx(87 / 20) and not cat.fps_assumed


def source_frame(data: bytes, index: int, height: int, width: int) -> np.ndarray:
    """Frame `index` decoded by OpenCV instead of decord, resized the same way."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.mp4"
        path.write_bytes(data)
        cap = cv2.VideoCapture(str(path))
        for _ in range(index + 1):
            ok, frame = cap.read()
            assert ok
        cap.release()
    return cv2.resize(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), (width, height), interpolation=cv2.INTER_AREA)


def test_clip_frames_are_the_source_frames_it_names(real):
    data = real["cat"]
    clip = decode_clip(data, "cat", 96, 128, 16, stride=2, rng=np.random.default_rng(5))
    assert clip.frames.shape == (16, 96, 128, 3) and clip.frames.dtype == np.uint8
    assert clip.frame_indices.dtype == np.int64 and np.all(np.diff(clip.frame_indices) == 2)
    assert clip.stride == 2 and clip.fps == 10.0 and clip.source_fps == 20.0 and clip.source_size == (480, 368)
    k = 5
    here = source_frame(data, int(clip.frame_indices[k]), 96, 128).astype(float)
    later = source_frame(data, int(clip.frame_indices[k]) + 4, 96, 128).astype(float)
    error = np.abs(clip.frames[k] - here).mean()
    assert error < 4.0 and error < np.abs(clip.frames[k] - later).mean()


def test_random_stride_and_start_are_reproducible(real):
    data = real["cat"]
    a = decode_clip(data, "cat", 48, 64, 16, rng=np.random.default_rng(4))
    b = decode_clip(data, "cat", 48, 64, 16, rng=np.random.default_rng(4))
    np.testing.assert_array_equal(a.frame_indices, b.frame_indices)
    np.testing.assert_array_equal(a.frames, b.frames)
    clips = [decode_clip(data, "cat", 48, 64, 16, rng=np.random.default_rng(s)) for s in range(8)]
    assert len({c.stride for c in clips}) > 1 and len({int(c.frame_indices[0]) for c in clips}) > 1
    assert all(c.frame_indices[-1] < 87 and len(c.frames) == 16 for c in clips)


def test_stride_is_lowered_then_the_clip_shortened():
    rng = np.random.default_rng(0)
    assert {choose_stride(30, 16, 4, rng) for _ in range(20)} == {1}  # stride 2 would need 31 frames
    assert {choose_stride(61, 16, 4, rng) for _ in range(40)} == {1, 2, 3, 4}
    data = videos.mp4_bytes(videos.translating_frames(12, 48, 64, 1, 0))
    clip = decode_clip(data, "short", 48, 64, 16, min_frames=8, rng=rng)
    assert clip.stride == 1 and clip.frame_indices.tolist() == list(range(12))
    with pytest.raises(SampleError, match=r"too short: 12 frames give a 3-frame clip at stride 4"):
        decode_clip(data, "short", 48, 64, 16, stride=4, min_frames=8, rng=rng)


def corrupt_middle(data: bytes) -> bytes:
    out = bytearray(data)
    out[len(out) // 3 : len(out) // 3 + 2000] = videos.random_bytes(2000)
    return bytes(out)


CLIP = videos.moving_clip(24, 64, 64)
BAD_FILES = {
    "empty": (videos.empty_file(), r"empty file: 0 bytes"),
    "text": (videos.text_file(), r"not a video: .* holds text"),
    "png": (videos.png_file(), r"not a video: .* holds a PNG image"),
    "random": (videos.random_bytes(), r"not a video: .* no known video container"),
    "ftyp then garbage": (videos.ftyp_then_garbage(), r"truncated or corrupt: .*no 'moov' index box.*re-upload"),
    "cut before the index": (videos.truncated(CLIP, 0.6), r"truncated or corrupt: .*no 'moov' index box.*re-upload"),
    "cut after the index": (
        videos.truncated(videos.faststart(CLIP), 0.6),
        r"truncated or corrupt: .* ends inside a frame .*re-upload the whole file",
    ),
    "one frame": (videos.one_frame_video(), r"too short: only 1 frame; need at least 8"),
    # decord dies with SIGSEGV on an MJPEG AVI whose last frame is cut: the RIFF check must catch it first
    "avi cut short": (
        videos.truncated(videos.mjpeg_avi_file(videos.translating_frames(8, 64, 64, 1, 0)), 0.7),
        r"truncated or corrupt: bad\.mp4 ends inside a frame .*re-upload the whole file",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_files_fail_with_a_reason(kind):
    data, reason = BAD_FILES[kind]
    for call in (
        lambda: probe_video(data, "bad.mp4"),
        lambda: decode_clip(data, "bad.mp4", 64, 64, 8, rng=np.random.default_rng(0)),
    ):
        with pytest.raises(SampleError, match=reason) as info:
            call()
        assert info.value.stage == "decode"


def test_damaged_frames_fail_while_decoding():
    assert probe_video(videos.faststart(CLIP), "moved index").num_frames == 24  # the helper keeps files valid
    damaged = corrupt_middle(CLIP)
    # decord's threaded decoder meets the damage in the probe's first frame or in the clip, by chance
    with pytest.raises(SampleError, match=r"truncated or corrupt: (frames 0\.\.23|the first frame)") as info:
        decode_clip(damaged, "damaged.mp4", 64, 64, 24, stride=1, rng=np.random.default_rng(0))
    assert info.value.stage == "decode"


def test_missing_frame_rate_is_assumed_not_fatal():
    frames = videos.translating_frames(12, 64, 64, 1, 0)
    data = mux_jpegs(jpegs(frames, 95), 64, 64, fps=0.001, container_format="avi")  # the file says 0.001 fps
    facts = probe_video(data, "slow.avi")
    assert facts.fps_assumed and facts.fps == 30.0 and facts.num_frames == 12
    clip = decode_clip(data, "slow.avi", 64, 64, 8, stride=1, rng=np.random.default_rng(0))
    assert clip.fps == 30.0 and len(clip.frames) == 8


def test_bad_arguments_are_refused(real):
    with pytest.raises(ValueError, match="even"):
        decode_clip(real["cat"], "cat", 95, 128, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="min_frames"):
        decode_clip(real["cat"], "cat", 96, 128, num_frames=8, min_frames=9, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="even"):
        encode_clip(np.zeros((2, 33, 32, 3), np.uint8), 24.0)


def test_stored_clip_of_a_real_video_is_near_lossless(real):
    clip = decode_clip(real["cat"], "cat", 384, 512, 16, rng=np.random.default_rng(1))
    data = encode_clip(clip.frames, clip.fps)
    back = decode_clip_bytes(data)
    assert back.shape == clip.frames.shape
    assert psnr(back, clip.frames) >= 40.0
    assert len(data) < clip.frames.nbytes / 4  # compressed, not raw
    reader = _decord().VideoReader(io.BytesIO(data))  # FFmpeg-based readers open it too, and agree
    assert reader.get_avg_fps() == pytest.approx(clip.fps, rel=1e-3) and len(reader) == len(back)
    assert np.abs(reader.get_batch(list(range(len(back)))).asnumpy().astype(int) - back).mean() < 0.5


@pytest.mark.parametrize(
    "make",
    [
        lambda: videos.translating_frames(10, 96, 128, 1.5, 0.5),
        lambda: render_scene(0, num_frames=6, height=128, width=128).frames,  # saturated colour edges
        lambda: np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8),  # pure noise
    ],
    ids=["texture", "saturated", "noise"],
)
def test_stored_generated_clips_are_near_lossless(make):
    frames = make()
    back = decode_clip_bytes(encode_clip(frames, 12.0))
    assert back.shape == frames.shape and psnr(back, frames) >= 40.0


def test_a_clip_stores_as_the_same_bytes_every_time():
    """Labels are bit-identical whatever process encodes them: no random container UIDs in the stored clip."""
    frames = videos.translating_frames(4, 32, 48, 1, 0)
    assert encode_clip(frames, 24.0) == encode_clip(frames, 24.0)


def test_one_noisy_frame_among_smooth_ones_raises_the_quality():
    """The PSNR check decodes back the largest JPEGs, so one noise frame in a long smooth clip is caught
    wherever it sits (evenly spaced picks would miss frame 13 of 40); every frame then reads back at 40 dB."""
    frames = videos.translating_frames(40, 64, 64, 1.0, 0.5)
    frames[13] = np.random.default_rng(1).integers(0, 256, frames[13].shape, dtype=np.uint8)
    data, described = encode_clip_described(frames, 12.0)
    assert described["jpeg_quality"] == 100
    back = decode_clip_bytes(data)
    assert min(psnr(b, f) for b, f in zip(back, frames, strict=True)) >= 40.0
    smooth = encode_clip_described(videos.translating_frames(40, 64, 64, 1.0, 0.5), 12.0)[1]
    assert smooth["jpeg_quality"] == 95  # a smooth clip keeps quality 95


def test_stored_clip_that_is_not_a_whole_clip_fails_cleanly():
    with pytest.raises(SampleError, match="not a video"):
        decode_clip_bytes(b"nothing here")
    data = encode_clip(videos.translating_frames(6, 64, 64, 1, 0), 24.0)
    with pytest.raises(SampleError, match="truncated or corrupt"):
        decode_clip_bytes(data[: len(data) // 2])


def test_stored_clip_reads_back_at_widths_decord_rejects():
    frames = videos.translating_frames(3, 32, 48, 1, 0)  # decord fails on 48-pixel-wide MJPEG
    assert psnr(decode_clip_bytes(encode_clip(frames, 24.0)), frames) >= 40.0


@pytest.mark.parametrize("width", [16, 48])
def test_sizes_the_decoders_scaler_gets_wrong_still_decode(shared_dir, width):
    """decord returns 64-px-wide frames when asked for 48 from this clip; those sizes are resized by OpenCV."""
    data = (shared_dir / "videos" / "cat.mp4").read_bytes()
    clip = decode_clip(data, "cat.mp4", height=32, width=width, num_frames=8, stride=2, rng=np.random.default_rng(0))
    assert clip.frames.shape == (8, 32, width, 3) and clip.frames.dtype == np.uint8
    reference = decode_clip(
        data, "cat.mp4", height=480, width=368, num_frames=8, stride=2, rng=np.random.default_rng(0)
    )
    np.testing.assert_array_equal(clip.frame_indices, reference.frame_indices)
    small = np.stack([cv2.resize(f, (width, 32), interpolation=cv2.INTER_AREA) for f in reference.frames])
    assert np.abs(clip.frames.astype(int) - small.astype(int)).mean() < 3.0


# --------------------------------------------------------------------------- --resize squeeze | crop | mixed

PORTRAIT = videos.translating_frames(12, 320, 136, 1, 0.5, seed=9)  # 136x320: a phone video standing up


def test_a_portrait_video_is_cropped_at_its_own_aspect():
    data = videos.mp4_bytes(PORTRAIT)
    clip = decode_clip(data, "portrait", 48, 64, 8, stride=1, rng=np.random.default_rng(0), resize="crop")
    assert clip.resize == "crop" and clip.frames.shape == (8, 48, 64, 3) and clip.source_size == (320, 136)
    x0, y0, x1, y1 = clip.crop_box
    assert (x0, x1) == (0.0, 136.0) and 0 <= y0 < y1 <= 320  # the crop spans the frame's width
    assert (x1 - x0) / (y1 - y0) == pytest.approx(64 / 48, rel=0.02)  # the clip's aspect, not a squeeze
    # the frames show that box of the source, scaled, not the whole frame squeezed
    k = int(clip.frame_indices[3])
    box = PORTRAIT[k, round(y0) : round(y1), round(x0) : round(x1)]
    shown = cv2.resize(box, (64, 48), interpolation=cv2.INTER_AREA).astype(float)
    squeezed = cv2.resize(PORTRAIT[k], (64, 48), interpolation=cv2.INTER_AREA).astype(float)
    error = np.abs(clip.frames[3] - shown).mean()
    assert error < 10 and error < np.abs(clip.frames[3] - squeezed).mean() / 2


def test_squeeze_keeps_the_old_behaviour(real):
    """squeeze is the resize of earlier rounds: the whole frame, and no draw from the generator."""
    data = real["cat"]
    rng = np.random.default_rng(3)
    clip = decode_clip(data, "cat", 96, 128, 16, rng=rng, resize="squeeze")
    assert clip.resize == "squeeze" and clip.crop_box == (0.0, 0.0, 368.0, 480.0)
    plain = decode_clip(data, "cat", 96, 128, 16, rng=np.random.default_rng(3))  # the function's default
    np.testing.assert_array_equal(plain.frames, clip.frames)
    replay = np.random.default_rng(3)  # only stride and start were drawn, as before
    stride = choose_stride(87, 16, 4, replay)
    start = int(replay.integers(0, 87 - 15 * stride))
    assert clip.stride == stride and int(clip.frame_indices[0]) == start
    assert rng.random() == replay.random()
    k = 5
    here = source_frame(data, int(clip.frame_indices[k]), 96, 128).astype(float)
    assert np.abs(clip.frames[k] - here).mean() < 4.0


def test_mixed_is_deterministic_per_seed_and_draws_both():
    data = videos.mp4_bytes(PORTRAIT)

    def clip(seed: int):
        return decode_clip(data, "portrait", 48, 64, 8, rng=np.random.default_rng(seed), resize="mixed")

    clips = [clip(seed) for seed in range(12)]
    again = [clip(seed) for seed in range(12)]
    for a, b in zip(clips, again, strict=True):
        assert (a.resize, a.crop_box) == (b.resize, b.crop_box)
        np.testing.assert_array_equal(a.frames, b.frames)
    assert {c.resize for c in clips} == {"squeeze", "crop"}
    assert len({c.crop_box for c in clips if c.resize == "crop"}) > 1  # the crop's place is drawn too


def test_unknown_resize_is_refused():
    from pseudotrack.config import RoundConfig
    from pseudotrack.errors import ConfigError

    with pytest.raises(ValueError, match="resize='zoom': choose one of squeeze, crop, mixed"):
        decode_clip(b"", "x", resize="zoom", rng=np.random.default_rng(0))
    with pytest.raises(ConfigError, match="resize='zoom': choose squeeze .* crop .* or mixed"):
        RoundConfig(bucket="b", workspace="w", resize="zoom")
    assert RoundConfig(bucket="b", workspace="w").resize == "mixed"
