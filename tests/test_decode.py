"""Decoding with decord: probing, clip choice, resizing, bad files, and the near-lossless stored clip."""

from __future__ import annotations

import numpy as np
import pytest
from videos import mp4_bytes, translating_frames

from pseudotrack.errors import SampleError
from pseudotrack.tasks.decode import choose_frames, decode_clip, decode_clip_bytes, encode_clip, probe_video


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def test_probe_real_clips(sample_videos):
    facts = {p.name: probe_video(p.read_bytes(), p.name) for p in sample_videos}
    assert (facts["bear.mp4"].num_frames, facts["bear.mp4"].width, facts["bear.mp4"].height) == (82, 854, 480)
    assert facts["cat.mp4"].num_frames == 87 and round(facts["cat.mp4"].fps) == 20
    assert facts["apple.mp4"].width == 1296 and facts["apple.mp4"].height == 720


def test_decode_clip_resizes_strides_and_is_reproducible(sample_videos):
    data = sample_videos[1].read_bytes()  # bear, 82 frames
    a = decode_clip(data, "bear", height=96, width=128, num_frames=16, rng=np.random.default_rng(4))
    b = decode_clip(data, "bear", height=96, width=128, num_frames=16, rng=np.random.default_rng(4))
    assert a.frames.shape == (16, 96, 128, 3) and a.frames.dtype == np.uint8
    assert a.frame_indices == b.frame_indices and np.array_equal(a.frames, b.frames)
    assert np.all(np.diff(a.frame_indices) == a.stride) and 1 <= a.stride <= 4
    assert a.fps == pytest.approx(30.0 / a.stride, rel=0.05)
    strides = {decode_clip(data, "b", 96, 128, 16, rng=np.random.default_rng(s)).stride for s in range(12)}
    assert len(strides) > 1  # the recipe's random frame rate


def test_choose_frames_shrinks_stride_then_length():
    rng = np.random.default_rng(0)
    indices, stride = choose_frames(30, 16, 4, 8, rng, stride=4)
    assert stride == 1 and len(indices) == 16  # stride 4 would need 61 frames
    indices, stride = choose_frames(10, 16, 4, 8, rng, stride=None)
    assert stride == 1 and indices == list(range(10))
    with pytest.raises(SampleError, match="too short"):
        choose_frames(5, 16, 4, 8, rng, stride=None)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda tmp: b"", "empty file"),
        (lambda tmp: b"hello, I am text with a video name", "text"),
        (lambda tmp: b"\x89PNG\r\n\x1a\n" + bytes(100), "image"),
        (lambda tmp: np.random.default_rng(0).bytes(5000), "not a video"),
        (lambda tmp: mp4_bytes(translating_frames(12, 64, 64, 1, 0), tmp)[:1500], "corrupt or truncated"),
        (lambda tmp: mp4_bytes(translating_frames(1, 64, 64, 1, 0), tmp), "1 frame"),
    ],
)
def test_bad_files_fail_with_a_reason(tmp_path, make, reason):
    with pytest.raises(SampleError, match=reason) as info:
        decode_clip(make(tmp_path), "bad.mp4", 64, 64, 8, rng=np.random.default_rng(0))
    assert info.value.stage == "decode"


def test_odd_label_resolution_is_refused(sample_videos):
    with pytest.raises(ValueError, match="even"):
        decode_clip(sample_videos[0].read_bytes(), "apple", 95, 128)


def test_stored_clip_is_near_lossless(sample_videos, tmp_path):
    clip = decode_clip(sample_videos[2].read_bytes(), "cat", 384, 512, 24, rng=np.random.default_rng(1))
    data = encode_clip(clip.frames, clip.fps)
    back = decode_clip_bytes(data)
    assert back.shape == clip.frames.shape
    assert psnr(back, clip.frames) >= 40.0
    generated = translating_frames(10, 96, 128, 1.5, 0.5)
    assert psnr(decode_clip_bytes(encode_clip(generated, 12.0)), generated) >= 40.0
