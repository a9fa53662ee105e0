"""CoTracker2 teacher: official key layout, strict loading, parity with the reference cases, predictor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import CT2_TINY, REFERENCE, random_queries, sliding_clip, weights_rule

from pseudotrack.errors import CheckpointError, ConfigError
from pseudotrack.teachers.base import Teacher, create_teacher, sha256_file, teacher_spec
from pseudotrack.teachers.cotracker2 import (
    CoTracker2,
    CoTracker2Config,
    CoTracker2Teacher,
    load_cotracker2,
    support_grid,
    window_len_for,
    window_starts,
)

REF = REFERENCE / "cotracker2"
CASES = sorted(REF.glob("case_*.npz"))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = CoTracker2(CT2_TINY)
    with torch.no_grad():
        # A small flow head (the authors also start it near zero) keeps random-weight dynamics calm,
        # so float rounding differences between equivalent runs stay small instead of growing chaotically.
        model.updateformer.flow_head.weight.mul_(0.01)
    path = tmp_path_factory.mktemp("ct2") / "tiny_cotracker2.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tiny_teacher(tiny_checkpoint) -> CoTracker2Teacher:
    teacher = create_teacher("cotracker2", checkpoint=tiny_checkpoint, config=CT2_TINY)
    teacher.setup("cpu")
    return teacher


# ---------------------------------------------------------------- layout and loading


def test_state_dict_matches_official_manifest():
    manifest = json.loads((REF / "manifest.json").read_text())["state_dict"]
    model = CoTracker2(CoTracker2Config(window_len=16))
    ours = model.state_dict()
    assert sorted(ours) == sorted(manifest)
    for name, entry in manifest.items():
        assert list(ours[name].shape) == entry["shape"], name
    buffers = {name for name, _ in model.named_buffers()}
    assert buffers == {name for name, entry in manifest.items() if entry["kind"] == "buffer"}


def test_window_length_from_file_name():
    assert window_len_for("/x/cotracker2v1.pth") == 16
    assert window_len_for("cotracker2.pth") == 8
    assert window_len_for("my_finetune.pth", default=12) == 12


def test_window_schedule_matches_original():
    assert window_starts(24, 16) == [0, 8]
    assert window_starts(16, 16) == [0]
    assert window_starts(9, 16) == [0]
    assert window_starts(8, 16) == []  # the original runs no window at all here
    assert window_starts(33, 16) == [0, 8, 16, 24]


def test_refuses_checkpoint_of_another_model(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3), "head.bias": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError) as err:
        load_cotracker2(path, config=CT2_TINY)
    message = str(err.value)
    assert str(path) in message and "encoder.weight" in message and "fnet.conv1.weight" in message


def test_refuses_truncated_checkpoint(tiny_checkpoint, tmp_path):
    path = tmp_path / "cotracker2v1.pth"
    data = tiny_checkpoint.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_cotracker2(path, config=CT2_TINY)
    assert str(path) in str(err.value)


def test_refuses_missing_and_unexpected_keys(tiny_checkpoint, tmp_path):
    state = torch.load(tiny_checkpoint, weights_only=True)
    del state["vis_predictor.0.bias"]
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "broken.pth"
    torch.save({"model": state}, path)  # the authors' container is unwrapped first
    with pytest.raises(CheckpointError) as err:
        load_cotracker2(path, config=CT2_TINY)
    message = str(err.value)
    assert "missing keys: vis_predictor.0.bias" in message and "unexpected keys: extra.weight" in message
    assert str(path) in message


def test_refuses_window_mismatch_with_a_hint(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="pass window_len=8"):
        load_cotracker2(tiny_checkpoint, window_len=4, config=CT2_TINY)


def test_loads_official_container_and_keeps_buffers(tiny_checkpoint, tmp_path):
    state = torch.load(tiny_checkpoint, weights_only=True)
    state["time_emb"] = torch.randn_like(state["time_emb"])
    path = tmp_path / "wrapped.pth"
    torch.save({"model": state}, path)
    model = load_cotracker2(path, config=CT2_TINY)
    assert torch.equal(model.time_emb, state["time_emb"])
    assert not model.training


# ---------------------------------------------------------------- parity with the authors' outputs


def test_reference_cases_are_present():
    assert CASES, f"no case_*.npz under {REF}: set PSEUDOTRACK_SHARED to the shared folder"


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_parity_with_reference(case, tmp_path):
    meta = json.loads(case.with_suffix(".json").read_text())
    state = weights_rule().make_state_dict(REF, case)
    path = tmp_path / "cotracker2v1.pth"
    torch.save(state, path)
    # the buffers fix the window and the model resolution the reference was built with
    window = state["time_emb"].shape[1]
    h, w = state["pos_emb"].shape[-2:]
    cfg = CoTracker2Config(window_len=window, model_resolution=(h * 4, w * 4))
    model = load_cotracker2(path, config=cfg)

    arrays = np.load(case)
    video = torch.from_numpy(arrays["video"]).permute(0, 3, 1, 2)[None].float()
    queries = torch.from_numpy(arrays["queries"])[None].float()
    with torch.no_grad():
        tracks, visibility = model(video, queries, iters=meta["iters"])
    expected_tracks = arrays["expected/tracks"]
    expected_vis = arrays["expected/visibility"]
    assert tracks.shape == expected_tracks.shape and visibility.shape == expected_vis.shape
    assert np.abs(tracks.numpy() - expected_tracks).max() < 0.1
    assert np.abs(visibility.numpy() - expected_vis).max() < 1e-3


# ---------------------------------------------------------------- predictor


def test_registered_with_official_file_names():
    spec = teacher_spec("cotracker2")
    assert spec.checkpoint_names == ("cotracker2v1.pth", "cotracker2.pth")
    with pytest.raises(ConfigError, match="needs a checkpoint"):
        create_teacher("cotracker2")


def test_setup_refuses_missing_checkpoint(tmp_path):
    teacher = create_teacher("cotracker2", checkpoint=tmp_path / "cotracker2v1.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        teacher.setup("cpu")


def test_predict_before_setup_is_refused(tiny_checkpoint):
    teacher = create_teacher("cotracker2", checkpoint=tiny_checkpoint, config=CT2_TINY)
    with pytest.raises(RuntimeError, match="setup"):
        teacher.predict(sliding_clip(), random_queries(10, 40, 60))


def test_setup_records_checkpoint_hash(tiny_teacher, tiny_checkpoint):
    assert isinstance(tiny_teacher, Teacher)
    assert tiny_teacher.checkpoint_sha256 == sha256_file(tiny_checkpoint)
    assert tiny_teacher.tracks_occluded is True
    assert tiny_teacher.model.cfg.window_len == 8


def test_predict_shapes_and_dtypes(tiny_teacher):
    frames, queries = sliding_clip(), random_queries(10, 40, 60, n=7)
    out = tiny_teacher.predict(frames, queries)
    assert out.tracks.shape == (10, 7, 2) and out.tracks.dtype == np.float32
    assert out.visibility.shape == (10, 7) and out.visibility.dtype == bool
    assert out.confidence.dtype == np.float16 and np.all(out.confidence == 1)
    assert out.is_finite()


def test_query_frame_holds_the_query_point(tiny_teacher):
    queries = random_queries(10, 40, 60, n=6, seed=3)
    out = tiny_teacher.predict(sliding_clip(), queries)
    rows = queries[:, 0].astype(int)
    np.testing.assert_array_equal(out.tracks[rows, np.arange(6)], queries[:, 1:])
    assert out.visibility[rows, np.arange(6)].all()


def test_support_points_are_tracked_and_dropped(tiny_teacher):
    seen = []
    handle = tiny_teacher.model.register_forward_hook(lambda m, args, out: seen.append(out[0].shape))
    try:
        out = tiny_teacher.predict(sliding_clip(), random_queries(10, 40, 60, n=3))
    finally:
        handle.remove()
    assert seen == [torch.Size([1, 10, 3 + 36, 2])]
    assert out.tracks.shape == (10, 3, 2)


def test_support_grid_covers_the_frame():
    grid = support_grid(6, 384, 512)
    assert grid.shape == (36, 2)
    np.testing.assert_allclose(grid[0], [8, 8])
    np.testing.assert_allclose(grid[-1], [504, 376])
    assert np.all(grid[1:6, 1] == grid[0, 1])  # row-major: x varies first


def test_chunked_equals_unchunked(tiny_checkpoint):
    frames, queries = sliding_clip(t=12), random_queries(12, 40, 60, n=9, seed=5)
    outs = []
    for point_chunk, frame_chunk in ((256, 16), (2, 3)):
        teacher = CoTracker2Teacher(tiny_checkpoint, config=CT2_TINY, point_chunk=point_chunk, frame_chunk=frame_chunk)
        teacher.setup("cpu")
        outs.append(teacher.predict(frames, queries))
    np.testing.assert_allclose(outs[0].tracks, outs[1].tracks, atol=1e-4)
    np.testing.assert_array_equal(outs[0].visibility, outs[1].visibility)


def test_coordinates_map_back_to_the_input_frames(tiny_teacher):
    """A clip upsampled 2x with aligned corners resizes back exactly, so tracks must scale by 2."""
    mh, mw = CT2_TINY.model_resolution
    small = sliding_clip(t=9, h=mh, w=mw, seed=7)
    big = torch.nn.functional.interpolate(
        torch.from_numpy(small).permute(0, 3, 1, 2).float(),
        (2 * mh - 1, 2 * mw - 1),
        mode="bilinear",
        align_corners=True,
    )
    big = big.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    queries = random_queries(9, mh, mw, n=4, seed=8)
    out_small = tiny_teacher.predict(small, queries)
    out_big = tiny_teacher.predict(big, queries * np.array([1, 2, 2], np.float32))
    np.testing.assert_allclose(out_big.tracks, 2 * out_small.tracks, atol=1e-3)
    np.testing.assert_array_equal(out_big.visibility, out_small.visibility)


def test_short_clip_gets_a_window(tiny_teacher):
    """Clips of at most half a window get no window in the original; the predictor pads them."""
    frames = sliding_clip(t=3)
    queries = np.array([[0, 10.0, 10.0], [0, 30.0, 20.0]], np.float32)
    out = tiny_teacher.predict(frames, queries)
    assert out.tracks.shape == (3, 2, 2)
    assert np.all(np.abs(out.tracks[1:]) > 0)  # zeros would mean no window ran


def test_predict_with_no_queries(tiny_teacher):
    out = tiny_teacher.predict(sliding_clip(), np.zeros((0, 3), np.float32))
    assert out.tracks.shape == (10, 0, 2) and out.visibility.shape == (10, 0)


@pytest.mark.parametrize(
    ("frames", "queries", "match"),
    [
        (np.zeros((4, 16, 16, 3), np.float32), np.zeros((1, 3), np.float32), "uint8"),
        (np.zeros((4, 16, 16), np.uint8), np.zeros((1, 3), np.float32), r"\[T, H, W, 3\]"),
        (np.zeros((4, 16, 16, 3), np.uint8), np.zeros((1, 2), np.float32), r"\[N, 3\]"),
        (np.zeros((4, 16, 16, 3), np.uint8), np.array([[4, 1, 1]], np.float32), r"\[0, 3\]"),
        (np.zeros((4, 16, 16, 3), np.uint8), np.array([[1.5, 1, 1]], np.float32), "whole numbers"),
        (np.zeros((4, 16, 16, 3), np.uint8), np.array([[0, np.nan, 1]], np.float32), "NaN"),
    ],
)
def test_bad_inputs_are_named(tiny_teacher, frames, queries, match):
    with pytest.raises(ValueError, match=match):
        tiny_teacher.predict(frames, queries)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_close_to_cpu(tiny_checkpoint):
    frames, queries = sliding_clip(t=12), random_queries(12, 40, 60, n=6, seed=9)
    cpu = CoTracker2Teacher(tiny_checkpoint, config=CT2_TINY)
    cpu.setup("cpu")
    gpu = CoTracker2Teacher(tiny_checkpoint, config=CT2_TINY)
    gpu.setup("cuda")
    a, b = cpu.predict(frames, queries), gpu.predict(frames, queries)
    assert b.is_finite()
    assert np.median(np.abs(a.tracks - b.tracks)) < 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_parity_on_cuda_float32(case, tmp_path):
    meta = json.loads(case.with_suffix(".json").read_text())
    state = weights_rule().make_state_dict(REF, case)
    path = tmp_path / "cotracker2v1.pth"
    torch.save(state, path)
    h, w = state["pos_emb"].shape[-2:]
    cfg = CoTracker2Config(window_len=state["time_emb"].shape[1], model_resolution=(h * 4, w * 4))
    model = load_cotracker2(path, config=cfg, device="cuda")
    arrays = np.load(case)
    video = torch.from_numpy(arrays["video"]).permute(0, 3, 1, 2)[None].float().cuda()
    queries = torch.from_numpy(arrays["queries"])[None].float().cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        tracks, visibility = model(video, queries, iters=meta["iters"])
    assert np.abs(tracks.cpu().numpy() - arrays["expected/tracks"]).max() < 0.1
    assert np.abs(visibility.cpu().numpy() - arrays["expected/visibility"]).max() < 1e-3
