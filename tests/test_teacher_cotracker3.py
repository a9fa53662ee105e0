"""CoTracker3 online and offline: official key layout, strict loading, parity with the reference cases,
the explicit online state, training outputs, and the teacher/predictor."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import REFERENCE, random_queries, sliding_clip, weights_rule

from pseudotrack.errors import CheckpointError, ConfigError
from pseudotrack.teachers.base import Teacher, create_teacher, sha256_file, teacher_spec
from pseudotrack.teachers.cotracker3 import (
    Chunks,
    CoTracker3,
    CoTracker3Config,
    CoTracker3Teacher,
    default_config,
    load_cotracker3,
    predictor_from_model,
    tiny_config,
    train_forward,
    window_starts,
    with_variant,
)
from pseudotrack.teachers.support_points import grid_points

VARIANTS = ("offline", "online")
CASES = [(v, c) for v in VARIANTS for c in sorted((REFERENCE / f"cotracker3_{v}").glob("case_*.npz"))]


def _save_tiny(path: Path, offline: bool, seed: int = 0, still: bool = False) -> Path:
    """A random tiny CoTracker3 in the official layout; `still` zeroes the flow head (tracks never move)."""
    torch.manual_seed(seed)
    model = CoTracker3(tiny_config(offline))
    if still:
        with torch.no_grad():
            model.updateformer.flow_head.weight.zero_()
            model.updateformer.flow_head.bias.zero_()
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ct3")


@pytest.fixture(scope="module", params=VARIANTS)
def tiny_teacher(request, ckpt_dir) -> CoTracker3Teacher:
    offline = request.param == "offline"
    path = _save_tiny(ckpt_dir / f"tiny_{request.param}.pth", offline)
    teacher = create_teacher(f"cotracker3_{request.param}", checkpoint=path, model_config=tiny_config())
    teacher.setup("cpu")
    return teacher


def _video(t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """float [1, T, 3, H, W] 0..255 for model-level tests."""
    return torch.from_numpy(sliding_clip(t, h, w, seed)).permute(0, 3, 1, 2)[None].float()


# ---------------------------------------------------------------- layout and config


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_matches_official_manifest(variant):
    manifest = json.loads((REFERENCE / f"cotracker3_{variant}" / "manifest.json").read_text())["state_dict"]
    model = CoTracker3(default_config(offline=variant == "offline"))
    ours = model.state_dict()
    assert sorted(ours) == sorted(manifest)
    for name, entry in manifest.items():
        assert list(ours[name].shape) == entry["shape"], name
    assert {n for n, _ in model.named_buffers()} == {n for n, e in manifest.items() if e["kind"] == "buffer"}


def test_default_config_is_the_published_model():
    cfg = default_config()
    assert (cfg.input_dim, cfg.window_len, with_variant(cfg, True).window_len) == (1110, 16, 60)
    assert cfg.model_resolution == (384, 512) and cfg.stride == 4 and cfg.corr_radius == 3
    tiny = tiny_config()
    assert (
        sum(p.numel() for p in CoTracker3(tiny).parameters())
        < sum(p.numel() for p in CoTracker3(cfg).parameters()) / 20
    )


def test_time_embedding_matches_the_shipped_buffer():
    """Our sin-cos buffer equals the one in the published file (same frequencies, same order)."""
    for variant in VARIANTS:
        shipped = np.load(sorted((REFERENCE / f"cotracker3_{variant}").glob("case_*.npz"))[0])["buffer/time_emb"]
        ours = CoTracker3(default_config(variant == "offline")).time_emb.numpy()
        np.testing.assert_allclose(ours, shipped, atol=1e-6)


def test_invalid_config_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="num_heads"):
        CoTracker3(replace(tiny_config(), num_heads=5))
    with pytest.raises(ConfigError, match="model_resolution"):
        CoTracker3(replace(tiny_config(), model_resolution=(65, 96)))


def test_vis_conf_head_is_separate_and_named():
    model = CoTracker3(tiny_config())
    names = [n for n, _ in model.named_parameters() if n.startswith(CoTracker3.VIS_CONF_HEAD + ".")]
    assert sorted(names) == ["updateformer.vis_conf_head.bias", "updateformer.vis_conf_head.weight"]


# ---------------------------------------------------------------- loading


def test_refuses_checkpoint_of_another_model(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3), "head.bias": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError) as err:
        load_cotracker3(path, tiny_config())
    message = str(err.value)
    assert str(path) in message and "encoder.weight" in message and "fnet.conv1.weight" in message


def test_refuses_truncated_checkpoint(ckpt_dir, tmp_path):
    good = _save_tiny(ckpt_dir / "trunc_src.pth", offline=False)
    path = tmp_path / "truncated.pth"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=str(path)):
        load_cotracker3(path, tiny_config())


def test_refuses_missing_and_unexpected_keys(tmp_path):
    state = CoTracker3(tiny_config()).state_dict()
    del state["corr_mlp.fc2.bias"]
    state["updateformer.extra.weight"] = torch.zeros(2)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_cotracker3(path, tiny_config())
    message = str(err.value)
    assert str(path) in message and "corr_mlp.fc2.bias" in message and "updateformer.extra.weight" in message


def test_refuses_file_of_the_other_variant_with_a_hint(ckpt_dir):
    offline_file = _save_tiny(ckpt_dir / "variant.pth", offline=True)
    with pytest.raises(CheckpointError, match="cotracker3_offline") as err:
        load_cotracker3(offline_file, tiny_config(offline=False))
    assert str(offline_file) in str(err.value)


def test_loads_official_container_and_keeps_buffers(tmp_path):
    model = CoTracker3(tiny_config())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["time_emb"] = torch.randn_like(state["time_emb"])
    path = tmp_path / "wrapped.pth"
    torch.save({"model": state}, path)
    loaded = load_cotracker3(path, tiny_config())
    assert torch.equal(loaded.time_emb, state["time_emb"])
    assert torch.equal(loaded.corr_mlp.fc1.weight, state["corr_mlp.fc1.weight"])


# ---------------------------------------------------------------- parity with the reference


def test_reference_cases_are_present():
    for variant in VARIANTS:
        assert any(v == variant for v, _ in CASES), f"no case_*.npz in {REFERENCE / f'cotracker3_{variant}'}"


@pytest.mark.slow
@pytest.mark.parametrize("variant,case", CASES, ids=[f"{v}-{c.stem}" for v, c in CASES])
def test_parity_with_reference(variant, case, tmp_path):
    """The documented call on the case, weights from the rule through our normal loader."""
    model_dir = REFERENCE / f"cotracker3_{variant}"
    meta = json.loads(case.with_suffix(".json").read_text())
    path = tmp_path / ("scaled_offline.pth" if variant == "offline" else "scaled_online.pth")
    torch.save(weights_rule().make_state_dict(model_dir, case), path)
    model = load_cotracker3(path, default_config(offline=variant == "offline"))
    arrays = np.load(case)
    video = torch.from_numpy(arrays["video"]).permute(0, 3, 1, 2)[None].float()
    queries = torch.from_numpy(arrays["queries"])[None]
    t = video.shape[1]
    with torch.no_grad():
        if variant == "offline":
            out = model.forward_offline(video, queries, iters=meta["iters"])
            tracks, vis, conf = out.tracks, out.visibility, out.confidence
        else:
            state = model.init_online(queries)
            for ind in range(0, t - 8, 8):
                state, _ = model.online_step(state, video[:, ind : ind + 16], iters=meta["iters"])
            tracks, vis, conf = state.outputs()
    for name, ours, tol in (("tracks", tracks, 0.05), ("visibility", vis, 1e-3), ("confidence", conf, 1e-3)):
        expected = arrays[f"expected/{name}"]
        assert tuple(ours.shape) == expected.shape, name
        gap = float(np.abs(ours.numpy() - expected).max())
        assert gap <= tol, f"{name}: max gap {gap} > {tol} (roundoff probe {meta['roundoff_probe_max_abs_gap']})"


# ---------------------------------------------------------------- online state and windows


def test_window_schedule():
    assert window_starts(24, 16) == [0, 8]
    assert window_starts(20, 16) == [0, 8]
    assert window_starts(16, 16) == [0]
    assert window_starts(5, 16) == [0]  # the authors' loop would run none
    assert window_starts(33, 16) == [0, 8, 16, 24]


def test_online_steps_equal_windowed_run_and_leave_state_untouched():
    torch.manual_seed(0)
    model = CoTracker3(tiny_config()).eval()  # window 8, step 4
    video, queries = _video(14, 32, 48), torch.from_numpy(random_queries(14, 32, 48, n=6))[None]
    with torch.no_grad():
        whole = model.forward_windowed(video, queries, iters=2)
        state = model.init_online(queries)
        for ind in window_starts(14, 8):
            before = state
            state, window = model.online_step(state, video[:, ind : ind + 8], iters=2)
            assert before.start == ind and state.start == ind + 4  # a new state; the old one is unchanged
            assert window.start == ind and window.tracks[0].shape[1] == min(8, 14 - ind)
    tracks, vis, conf = state.outputs()
    assert tracks.shape == (1, 14, 6, 2) and state.frames_seen == 14
    torch.testing.assert_close(tracks, whole.tracks, atol=1e-4, rtol=0)
    torch.testing.assert_close(vis, whole.visibility, atol=1e-5, rtol=0)
    assert [w.start for w in whole.windows] == [0, 4, 8]


def test_online_chunk_longer_than_window_is_refused():
    model = CoTracker3(tiny_config())
    with pytest.raises(ValueError, match="1..8"):
        model.online_step(model.init_online(torch.zeros(1, 2, 3)), _video(9, 32, 48))


def test_chunking_does_not_change_results():
    torch.manual_seed(1)
    model = CoTracker3(tiny_config(offline=True)).eval()
    video, queries = _video(9, 32, 48), torch.from_numpy(random_queries(9, 32, 48, n=7))[None]
    with torch.no_grad():
        whole = model(video, queries, iters=2)
        parts = model(video, queries, iters=2, chunks=Chunks(frames=2, corr_pairs=10, tokens=20))
    torch.testing.assert_close(parts.tracks, whole.tracks, atol=1e-4, rtol=0)
    torch.testing.assert_close(parts.confidence, whole.confidence, atol=1e-5, rtol=0)


def test_offline_time_embedding_stretches_to_any_length():
    model = CoTracker3(tiny_config(offline=True)).eval()  # trained length 24
    for t in (1, 5, 30):
        with torch.no_grad():
            out = model(_video(t, 32, 48), torch.tensor([[[0.0, 10.0, 12.0]]]), iters=1)
        assert out.tracks.shape == (1, t, 1, 2) and torch.isfinite(out.tracks).all()


# ---------------------------------------------------------------- training support


@pytest.mark.parametrize("offline", [False, True])
def test_training_forward_gives_per_step_tracks_with_gradients(offline):
    torch.manual_seed(2)
    model = CoTracker3(tiny_config(offline)).train()
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(CoTracker3.VIS_CONF_HEAD))
    video, queries = _video(11, 32, 48), torch.from_numpy(random_queries(11, 32, 48, n=4))[None]
    windows = train_forward(model, video, queries, iters=2, online=not offline)
    expected = [(0, 11)] if offline else [(0, 8), (4, 7)]
    assert [(start, tracks[0].shape[1]) for start, tracks in windows] == expected
    assert all(len(tracks) == 2 and tracks[0].shape[-2:] == (4, 2) for _, tracks in windows)
    loss = sum(tracks[-1].square().mean() + 0.5 * tracks[0].square().mean() for _, tracks in windows)
    loss.backward()
    assert model.fnet.conv1.weight.grad is not None and model.fnet.conv1.weight.grad.abs().sum() > 0
    assert model.updateformer.flow_head.weight.grad.abs().sum() > 0
    assert model.updateformer.vis_conf_head.weight.grad is None


# ---------------------------------------------------------------- teacher


def test_registered_with_official_file_names():
    assert teacher_spec("cotracker3_online").checkpoint_names == ("scaled_online.pth", "baseline_online.pth")
    assert teacher_spec("cotracker3_offline").checkpoint_names == (
        "scaled_offline.pth",
        "baseline_offline.pth",
    )
    teacher = create_teacher("cotracker3_offline", checkpoint="x.pth")
    assert isinstance(teacher, Teacher) and teacher.name == "cotracker3_offline" and teacher.tracks_occluded


def test_create_without_checkpoint_is_refused():
    with pytest.raises(ConfigError, match="scaled_online.pth"):
        create_teacher("cotracker3_online")


def test_setup_refuses_missing_checkpoint(tmp_path):
    missing = tmp_path / "scaled_online.pth"
    teacher = create_teacher("cotracker3_online", checkpoint=missing)
    with pytest.raises(CheckpointError, match=str(missing)):
        teacher.setup("cpu")


def test_predict_before_setup_is_refused():
    with pytest.raises(RuntimeError, match="setup"):
        CoTracker3Teacher(checkpoint=Path("x.pth")).predict(sliding_clip(), random_queries(10, 40, 60))


def test_setup_records_checkpoint_hash(tiny_teacher):
    assert tiny_teacher.checkpoint_sha256 == sha256_file(tiny_teacher.checkpoint)
    assert tiny_teacher.model.cfg.offline == (tiny_teacher.name == "cotracker3_offline")


def test_predict_shapes_and_dtypes(tiny_teacher):
    frames = sliding_clip(10, 40, 60)
    out = tiny_teacher.predict(frames, random_queries(10, 40, 60, n=7))
    assert out.tracks.shape == (10, 7, 2) and out.tracks.dtype == np.float32
    assert out.visibility.shape == (10, 7) and out.visibility.dtype == bool
    assert out.confidence.shape == (10, 7) and out.confidence.dtype == np.float16
    assert out.is_finite() and (out.confidence >= 0).all() and (out.confidence <= 1).all()


def test_support_points_are_tracked_and_dropped(tiny_teacher):
    seen = []
    hook = tiny_teacher.model.register_forward_pre_hook(lambda _m, args: seen.append(args[1].shape[1]))
    try:
        out = tiny_teacher.predict(sliding_clip(10, 40, 60), random_queries(10, 40, 60, n=3))
    finally:
        hook.remove()
    extra = 100 if tiny_teacher.offline else 25  # online: 5x5 grid, plus SIFT points where found
    assert out.tracks.shape[1] == 3 and seen[0] >= 3 + extra


def test_support_points_follow_each_variants_rule(tiny_teacher):
    """Online: a 5x5 grid plus SIFT points from early keyframes; offline: uniform in space and time."""
    frames = sliding_clip(12, 64, 96)
    points = tiny_teacher.support_points(frames)
    mh, mw = tiny_teacher.model.cfg.model_resolution
    if tiny_teacher.offline:
        assert len(points) == 100 and len(np.unique(points[:, 0])) > 3
        assert (points[:, 1] >= 0).all() and (points[:, 1] <= mw - 1).all() and (points[:, 2] <= mh - 1).all()
        return
    assert len(points) > 25 and (points[25:, 0] <= 3).all()  # keyframes from the first quarter
    assert (points[:, 1] >= 0).all() and (points[:, 1] <= mw - 1).all() and (points[:, 2] <= mh - 1).all()


def test_visibility_is_vis_times_confidence_thresholded(tiny_teacher):
    frames, queries = sliding_clip(10, 40, 60), random_queries(10, 40, 60, n=6)
    _, vis, conf = tiny_teacher.run(frames, queries)
    out = tiny_teacher.predict(frames, queries)
    expected = vis * conf > tiny_teacher.visibility_threshold
    expected[np.rint(queries[:, 0]).astype(int), np.arange(6)] = True
    np.testing.assert_array_equal(out.visibility, expected)
    np.testing.assert_allclose(out.confidence.astype(np.float32), conf, atol=1e-3)


def test_coordinates_map_back_to_the_input_frames(ckpt_dir):
    """A still flow head returns the queries in every frame, so resizing there and back must be exact."""
    for variant in VARIANTS:
        path = _save_tiny(ckpt_dir / f"still_{variant}.pth", offline=variant == "offline", still=True)
        teacher = create_teacher(f"cotracker3_{variant}", checkpoint=path, model_config=tiny_config())
        teacher.setup("cpu")
        frames, queries = sliding_clip(9, 50, 70), random_queries(9, 50, 70, n=5)
        out = teacher.predict(frames, queries)
        np.testing.assert_allclose(out.tracks, np.broadcast_to(queries[None, :, 1:], out.tracks.shape), atol=1e-3)
        rows = np.rint(queries[:, 0]).astype(int)
        assert out.visibility[rows, np.arange(5)].all()


def test_chunked_teacher_equals_unchunked(ckpt_dir):
    path = _save_tiny(ckpt_dir / "chunks.pth", offline=False, seed=3)
    frames, queries = sliding_clip(11, 40, 60), random_queries(11, 40, 60, n=9)
    outs = []
    for chunking in (
        {"frame_chunk": 1000, "corr_pairs": None, "token_chunk": None},
        {"frame_chunk": 3, "corr_pairs": 64, "token_chunk": 200},
    ):
        teacher = create_teacher("cotracker3_online", checkpoint=path, model_config=tiny_config(), **chunking)
        teacher.setup("cpu")
        outs.append(teacher.predict(frames, queries))
    np.testing.assert_allclose(outs[0].tracks, outs[1].tracks, atol=1e-3)
    np.testing.assert_allclose(outs[0].confidence.astype(float), outs[1].confidence.astype(float), atol=2e-3)


def test_short_clip_and_single_frame(tiny_teacher):
    for t in (1, 3):
        out = tiny_teacher.predict(sliding_clip(t, 40, 60), random_queries(t, 40, 60, n=2))
        assert out.tracks.shape == (t, 2, 2) and out.is_finite()


def test_predict_with_no_queries(tiny_teacher):
    out = tiny_teacher.predict(sliding_clip(4, 40, 60), np.zeros((0, 3), np.float32))
    assert out.tracks.shape == (4, 0, 2)


@pytest.mark.parametrize(
    "frames,queries,match",
    [
        (np.zeros((4, 40, 60), np.uint8), np.zeros((1, 3), np.float32), "uint8 array"),
        (np.zeros((4, 40, 60, 3), np.float32), np.zeros((1, 3), np.float32), "uint8 array"),
        (np.zeros((4, 40, 60, 3), np.uint8), np.zeros((1, 2), np.float32), r"\[N, 3\]"),
        (np.zeros((4, 40, 60, 3), np.uint8), np.array([[5, 1, 1]], np.float32), "whole numbers"),
        (np.zeros((4, 40, 60, 3), np.uint8), np.array([[0, np.nan, 1]], np.float32), "NaN"),
    ],
)
def test_bad_inputs_are_named(tiny_teacher, frames, queries, match):
    with pytest.raises(ValueError, match=match):
        tiny_teacher.predict(frames, queries)


def test_student_export_sidecar_picks_the_architecture(ckpt_dir, tmp_path):
    path = _save_tiny(tmp_path / "student.pth", offline=False)
    sidecar = {
        "format": "pseudotrack-student/1",
        "model": {"variant": "online", "config": asdict(tiny_config())},
    }
    Path(str(path) + ".json").write_text(json.dumps(sidecar))
    teacher = create_teacher("cotracker3_online", checkpoint=path)  # no model_config: the sidecar decides
    teacher.setup("cpu")
    assert teacher.model.cfg == tiny_config()
    assert teacher.predict(sliding_clip(6, 40, 60), random_queries(6, 40, 60, n=2)).tracks.shape == (6, 2, 2)


def test_model_config_as_dict_with_unknown_key_is_refused(ckpt_dir):
    teacher = create_teacher("cotracker3_online", checkpoint=ckpt_dir / "x.pth", model_config={"widht": 3})
    with pytest.raises(ConfigError, match="widht"):
        teacher.setup("cpu")


def test_predictor_from_model_in_memory():
    torch.manual_seed(4)
    net = CoTracker3(tiny_config(offline=True)).eval()
    teacher = predictor_from_model(net)
    assert teacher.offline and teacher.name == "cotracker3_offline"
    assert teacher.predict(sliding_clip(5, 40, 60), random_queries(5, 40, 60, n=3)).tracks.shape == (5, 3, 2)


def test_grid_covers_the_frame_with_the_authors_margin():
    grid = grid_points(5, 384, 512)
    assert grid.shape == (25, 2)
    np.testing.assert_allclose(grid[0], [8, 8])
    np.testing.assert_allclose(grid[-1], [504, 376])


def test_config_round_trips_through_json():
    cfg = tiny_config(offline=True)
    from pseudotrack.teachers.cotracker3 import config_from_dict

    assert config_from_dict(json.loads(json.dumps(asdict(cfg)))) == cfg
    assert isinstance(cfg, CoTracker3Config)


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_close_to_cpu(ckpt_dir):
    path = _save_tiny(ckpt_dir / "gpu.pth", offline=True, seed=5)
    frames, queries = sliding_clip(12, 40, 60), random_queries(12, 40, 60, n=6)
    outs = []
    for device in ("cpu", "cuda"):
        teacher = create_teacher("cotracker3_offline", checkpoint=path, model_config=tiny_config())
        teacher.setup(device)
        outs.append(teacher.predict(frames, queries))
    assert np.abs(outs[0].tracks - outs[1].tracks).max() < 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant,case", CASES, ids=[f"{v}-{c.stem}" for v, c in CASES])
def test_parity_on_cuda_float32(variant, case, tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    meta = json.loads(case.with_suffix(".json").read_text())
    path = tmp_path / "w.pth"
    torch.save(weights_rule().make_state_dict(REFERENCE / f"cotracker3_{variant}", case), path)
    model = load_cotracker3(path, default_config(offline=variant == "offline"), device="cuda")
    arrays = np.load(case)
    video = torch.from_numpy(arrays["video"]).permute(0, 3, 1, 2)[None].float().cuda()
    queries = torch.from_numpy(arrays["queries"])[None].cuda()
    with torch.no_grad():
        out = model(video, queries, iters=meta["iters"])
    gap = np.abs(out.tracks.cpu().numpy() - arrays["expected/tracks"]).max()
    assert gap <= 0.05
