"""TAPIR and BootsTAPIR teachers: official key layout, strict loading, reference parity, predictor."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from reference import BOOTSTAPIR_TINY, REFERENCE, TAPIR_TINY, random_queries, weights_rule

from pseudotrack.errors import CheckpointError, ConfigError
from pseudotrack.teachers.base import Teacher, create_teacher, sha256_file, teacher_spec
from pseudotrack.teachers.tapir import (
    BOOTSTAPIR_CONFIG,
    TAPIR_CONFIG,
    Tapir,
    TapirConfig,
    TapirTeacher,
    load_tapir,
    refinement_resolutions,
)

MODELS = {"tapir": TAPIR_CONFIG, "bootstapir": BOOTSTAPIR_CONFIG}
CASES = [(name, case) for name in MODELS for case in sorted((REFERENCE / name).glob("case_*.npz"))]


def _save_random(cfg: TapirConfig, path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    torch.save(Tapir(cfg).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return _save_random(TAPIR_TINY, tmp_path_factory.mktemp("tapir") / "tiny_tapir.pt")


@pytest.fixture(scope="module")
def tiny_boots_checkpoint(tmp_path_factory) -> Path:
    return _save_random(BOOTSTAPIR_TINY, tmp_path_factory.mktemp("bootstapir") / "tiny_bootstapir.pt", seed=1)


@pytest.fixture(scope="module")
def tiny_teacher(tiny_checkpoint) -> TapirTeacher:
    teacher = create_teacher("tapir", checkpoint=tiny_checkpoint, config=TAPIR_TINY)
    teacher.setup("cpu")
    return teacher


def _clip(t: int = 8, h: int = 40, w: int = 60, seed: int = 0, static: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # smooth blobs rather than pixel noise, so resizing keeps the texture
    coarse = rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8)
    base = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.stack([base if static else np.roll(base, shift=i, axis=1) for i in range(t)])


# ---------------------------------------------------------------- layout and loading


@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_matches_official_manifest(name):
    manifest = json.loads((REFERENCE / name / "manifest.json").read_text())["state_dict"]
    model = Tapir(MODELS[name])
    ours = model.state_dict()
    assert sorted(ours) == sorted(manifest)
    for key, entry in manifest.items():
        assert list(ours[key].shape) == entry["shape"], key
    assert not [key for key, entry in manifest.items() if entry["kind"] == "buffer"]


def test_official_mixer_widths():
    assert TAPIR_CONFIG.mixer_in_dim == 486 and BOOTSTAPIR_CONFIG.mixer_in_dim == 535
    assert TAPIR_CONFIG.mixer_out_dim == BOOTSTAPIR_CONFIG.mixer_out_dim == 388


def test_invalid_config_is_named():
    with pytest.raises(ConfigError, match="initial_resolution"):
        Tapir(replace(TAPIR_TINY, initial_resolution=(60, 64)))
    with pytest.raises(ConfigError, match="num_pips_iter"):
        Tapir(replace(TAPIR_TINY, num_pips_iter=0))


def test_refinement_resolutions_follow_the_authors_schedule():
    """Expected values computed with the authors' `generate_default_resolutions`."""
    assert refinement_resolutions((96, 128), (256, 256)) == [(256, 256)]
    assert refinement_resolutions((256, 256), (256, 256)) == [(256, 256)]
    assert refinement_resolutions((512, 512), (256, 256)) == [(256, 256), (512, 512)]
    assert refinement_resolutions((384, 512), (256, 256)) == [(256, 256), (384, 512)]
    assert refinement_resolutions((300, 520), (256, 256)) == [(256, 256), (272, 360), (296, 520)]
    assert refinement_resolutions((1080, 1920), (256, 256)) == [(256, 256), (408, 496), (664, 976), (1080, 1920)]


@pytest.mark.parametrize(
    ("model_cfg", "file_cfg", "hint"),
    [
        (BOOTSTAPIR_TINY, TAPIR_TINY, "has no extra_convs"),
        (TAPIR_TINY, BOOTSTAPIR_TINY, "has extra_convs"),
    ],
)
def test_refuses_file_of_the_other_model(tmp_path, model_cfg, file_cfg, hint):
    path = _save_random(file_cfg, tmp_path / "other.pt")
    with pytest.raises(CheckpointError) as err:
        load_tapir(path, model_cfg, name="x")
    message = str(err.value)
    assert str(path) in message and hint in message and "extra_convs" in message
    other = "tapir_checkpoint_panning.pt" if model_cfg.extra_convs else "bootstapir_checkpoint_v2.pt"
    assert other in message


def test_refuses_file_with_another_pyramid_level(tmp_path):
    path = _save_random(replace(TAPIR_TINY, pyramid_level=2), tmp_path / "pyr2.pt")
    with pytest.raises(CheckpointError, match="torch_pips_mixer.linear.weight") as err:
        load_tapir(path, TAPIR_TINY)
    assert str(path) in str(err.value) and "pyramid_level=0" in str(err.value)


def test_refuses_truncated_checkpoint(tiny_checkpoint, tmp_path):
    path = tmp_path / "tapir_checkpoint_panning.pt"
    data = tiny_checkpoint.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_tapir(path, TAPIR_TINY)
    assert str(path) in str(err.value)


def test_refuses_missing_and_unexpected_keys(tiny_checkpoint, tmp_path):
    state = torch.load(tiny_checkpoint, weights_only=True)
    del state["torch_cost_volume_track_mods.occ_out.bias"]
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_tapir(path, TAPIR_TINY)
    message = str(err.value)
    assert "missing keys: torch_cost_volume_track_mods.occ_out.bias" in message
    assert "unexpected keys: extra.weight" in message and str(path) in message


def test_refuses_checkpoint_of_an_unrelated_model(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fnet.conv1.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(CheckpointError) as err:
        load_tapir(path, TAPIR_TINY)
    message = str(err.value)
    assert str(path) in message and "unexpected keys: fnet.conv1.weight" in message
    assert "missing keys: resnet_torch." in message and "another model" in message


def test_loads_weights_exactly(tiny_checkpoint):
    model = load_tapir(tiny_checkpoint, TAPIR_TINY)
    state = torch.load(tiny_checkpoint, weights_only=True)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not model.training


# ---------------------------------------------------------------- parity with the authors' outputs


def test_reference_cases_are_present():
    for name in MODELS:
        assert list((REFERENCE / name).glob("case_*.npz")), (
            f"no case_*.npz under {REFERENCE / name}: set PSEUDOTRACK_SHARED to the shared folder"
        )


def _run_case(name: str, case: Path, tmp_path: Path, device: str = "cpu") -> tuple[dict, dict]:
    path = tmp_path / ("tapir_checkpoint_panning.pt" if name == "tapir" else "bootstapir_checkpoint_v2.pt")
    torch.save(weights_rule().make_state_dict(REFERENCE / name, case), path)
    model = load_tapir(path, MODELS[name], device=device, name=name)
    arrays = np.load(case)
    video = torch.from_numpy(arrays["video"]).float()[None].to(device) / 255 * 2 - 1
    queries = torch.from_numpy(arrays["queries"])[None][..., [0, 2, 1]].to(device)  # (t, x, y) -> (t, y, x)
    with torch.no_grad():
        out = model(video, queries)
    return {k: v.cpu().numpy() for k, v in out.items()}, arrays


@pytest.mark.slow
@pytest.mark.parametrize(("name", "case"), CASES, ids=[f"{n}-{c.stem}" for n, c in CASES])
def test_parity_with_reference(name, case, tmp_path):
    out, arrays = _run_case(name, case, tmp_path)
    for key, tol in (("tracks", 0.05), ("occlusion", 1e-3), ("expected_dist", 1e-3)):
        expected = arrays[f"expected/{key}"]
        assert out[key].shape == expected.shape, key
        assert np.abs(out[key] - expected).max() < tol, key


# ---------------------------------------------------------------- predictor


def test_registered_with_official_file_names():
    assert teacher_spec("tapir").checkpoint_names == ("tapir_checkpoint_panning.pt",)
    assert teacher_spec("bootstapir").checkpoint_names == ("bootstapir_checkpoint_v2.pt",)
    for name in MODELS:
        with pytest.raises(ConfigError, match="needs a checkpoint"):
            create_teacher(name)
    teacher = create_teacher("bootstapir", checkpoint="bootstapir_checkpoint_v2.pt")
    assert teacher.config == BOOTSTAPIR_CONFIG and teacher.name == "bootstapir"
    assert teacher.input_hw == (256, 256) and teacher.tracks_occluded is False


def test_setup_refuses_missing_checkpoint(tmp_path):
    teacher = create_teacher("tapir", checkpoint=tmp_path / "tapir_checkpoint_panning.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        teacher.setup("cpu")


def test_setup_refuses_resolution_off_the_grid(tiny_checkpoint):
    teacher = create_teacher("tapir", checkpoint=tiny_checkpoint, config=TAPIR_TINY, resolution=(60, 64))
    with pytest.raises(ConfigError, match="multiples of 8"):
        teacher.setup("cpu")


def test_predict_before_setup_is_refused(tiny_checkpoint):
    teacher = create_teacher("tapir", checkpoint=tiny_checkpoint, config=TAPIR_TINY)
    with pytest.raises(RuntimeError, match="setup"):
        teacher.predict(_clip(), random_queries(8, 40, 60))


def test_setup_records_checkpoint_hash(tiny_teacher, tiny_checkpoint):
    assert isinstance(tiny_teacher, Teacher)
    assert tiny_teacher.checkpoint_sha256 == sha256_file(tiny_checkpoint)
    assert tiny_teacher.tracks_occluded is False


@pytest.mark.parametrize("variant", ["tapir", "bootstapir"])
def test_predict_shapes_dtypes_and_visibility_rule(variant, tiny_teacher, tiny_boots_checkpoint):
    if variant == "tapir":
        teacher = tiny_teacher
    else:
        teacher = create_teacher("bootstapir", checkpoint=tiny_boots_checkpoint, config=BOOTSTAPIR_TINY)
        teacher.setup("cpu")
    frames, queries = _clip(), random_queries(8, 40, 60, n=7)
    out = teacher.predict(frames, queries)
    assert out.tracks.shape == (8, 7, 2) and out.tracks.dtype == np.float32
    assert out.visibility.shape == (8, 7) and out.visibility.dtype == bool
    assert out.confidence.shape == (8, 7) and out.confidence.dtype == np.float16
    assert out.is_finite() and out.confidence.min() >= 0 and out.confidence.max() <= 1

    _, occ, expd = teacher.run(frames, queries)
    p_visible = 1 / (1 + np.exp(occ)) * (1 / (1 + np.exp(expd)))
    not_query = np.ones((8, 7), bool)
    not_query[queries[:, 0].astype(int), np.arange(7)] = False
    np.testing.assert_array_equal(out.visibility[not_query], (p_visible > 0.5)[not_query])
    np.testing.assert_allclose(out.confidence[not_query], (1 / (1 + np.exp(expd)))[not_query], atol=1e-3)


def test_query_frame_holds_the_query_point(tiny_teacher):
    queries = random_queries(8, 40, 60, n=6, seed=3)
    out = tiny_teacher.predict(_clip(), queries)
    rows = queries[:, 0].astype(int)
    np.testing.assert_array_equal(out.tracks[rows, np.arange(6)], queries[:, 1:])
    assert out.visibility[rows, np.arange(6)].all() and np.all(out.confidence[rows, np.arange(6)] == 1)


def test_chunked_equals_unchunked(tiny_checkpoint):
    frames, queries = _clip(t=11), random_queries(11, 40, 60, n=9, seed=5)
    outs = []
    for query_chunk, frame_chunk in ((64, 10), (2, 3)):
        teacher = TapirTeacher(tiny_checkpoint, config=TAPIR_TINY, query_chunk=query_chunk, frame_chunk=frame_chunk)
        teacher.setup("cpu")
        outs.append(teacher.run(frames, queries))
    for a, b in zip(*outs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def _without_refinement(tmp_path: Path) -> Path:
    """Tiny weights whose refinement updates are zero, so each query frame keeps the exact query point."""
    torch.manual_seed(2)
    model = Tapir(TAPIR_TINY)
    with torch.no_grad():
        model.torch_pips_mixer.linear_1.weight.zero_()
        model.torch_pips_mixer.linear_1.bias.zero_()
    path = tmp_path / "no_refinement.pt"
    torch.save(model.state_dict(), path)
    return path


def test_coordinates_map_to_the_model_and_back(tmp_path):
    """Clip pixels have centres at whole numbers, TAPIR's raster at +0.5: x_model = (x + 0.5) * 64 / W."""
    teacher = TapirTeacher(_without_refinement(tmp_path), config=TAPIR_TINY)
    teacher.setup("cpu")
    t, h, w = 6, 48, 80  # not square, so a swapped axis or scale shows
    frames, queries = _clip(t, h, w, seed=4), random_queries(t, h, w, n=8, seed=4)
    seen = {}
    hooks = [
        teacher.model.register_forward_pre_hook(lambda m, args: seen.update(inputs=args)),
        teacher.model.register_forward_hook(lambda m, args, out: seen.update(outputs=out)),
    ]
    try:
        tracks, occ, _ = teacher.run(frames, queries)
    finally:
        for hook in hooks:
            hook.remove()
    video, model_queries = seen["inputs"][:2]
    assert video.shape == (1, t, 64, 64, 3) and video.min() >= -1 and video.max() <= 1
    expected_q = np.stack([queries[:, 0], (queries[:, 2] + 0.5) * 64 / h, (queries[:, 1] + 0.5) * 64 / w], axis=1)
    np.testing.assert_allclose(model_queries[0].numpy(), expected_q, rtol=1e-6, atol=1e-5)
    model_tracks = seen["outputs"]["tracks"][0].numpy()  # N T 2 (x, y) in the 64x64 raster
    expected_tracks = model_tracks * [w / 64, h / 64] - 0.5
    np.testing.assert_allclose(tracks, expected_tracks.transpose(1, 0, 2), rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(occ, seen["outputs"]["occlusion"][0].numpy().T)
    # through the whole path: the query frame returns the query point itself
    rows = queries[:, 0].astype(int)
    np.testing.assert_allclose(tracks[rows, np.arange(8)], queries[:, 1:], atol=1e-4)


def test_real_clip(tiny_teacher, shared_dir):
    cap = cv2.VideoCapture(str(shared_dir / "videos" / "bear.mp4"))
    frames = []
    while len(frames) < 5:
        ok, frame = cap.read()
        assert ok, "could not read bear.mp4"
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    cap.release()
    frames = np.stack(frames)
    t, h, w = frames.shape[:3]
    out = tiny_teacher.predict(frames, random_queries(t, h, w, n=4, seed=6))
    assert out.tracks.shape == (t, 4, 2) and out.is_finite()


def test_predict_with_no_queries(tiny_teacher):
    out = tiny_teacher.predict(_clip(), np.zeros((0, 3), np.float32))
    assert out.tracks.shape == (8, 0, 2) and out.visibility.shape == (8, 0)


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
    frames, queries = _clip(t=12), random_queries(12, 40, 60, n=6, seed=9)
    cpu = TapirTeacher(tiny_checkpoint, config=TAPIR_TINY)
    cpu.setup("cpu")
    gpu = TapirTeacher(tiny_checkpoint, config=TAPIR_TINY)
    gpu.setup("cuda")
    a, b = cpu.predict(frames, queries), gpu.predict(frames, queries)
    assert b.is_finite()
    assert np.median(np.abs(a.tracks - b.tracks)) < 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("name", "case"), CASES, ids=[f"{n}-{c.stem}" for n, c in CASES])
def test_parity_on_cuda_float32(name, case, tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out, arrays = _run_case(name, case, tmp_path, device="cuda")
    assert np.abs(out["tracks"] - arrays["expected/tracks"]).max() < 0.05
    for key in ("occlusion", "expected_dist"):
        assert np.abs(out[key] - arrays[f"expected/{key}"]).max() < 1e-3
