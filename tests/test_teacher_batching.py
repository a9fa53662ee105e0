"""Batched teacher calls: several clips per forward give each clip its one-at-a-time labels.

Every neural teacher is built small, with weights drawn by the reference rule
(../shared/reference/weights_rule.py) from its own parameter names and shapes,
saved to a file and loaded through the normal checkpoint loader. A forward
hook records the batch size of each model call, so the tests also check that
clips really shared a forward (and that clips which must not share one did not).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from reference import BOOTSTAPIR_TINY, CT2_TINY, TAPIR_TINY, weights_rule

from pseudotrack.teachers.base import create_teacher, predict_batch, predict_clips
from pseudotrack.teachers.cotracker2 import CoTracker2
from pseudotrack.teachers.cotracker3 import CoTracker3, tiny_config
from pseudotrack.teachers.tapir import Tapir

# name -> (network to draw weights for, create_teacher options)
MODELS = {
    "cotracker3_online": (lambda: CoTracker3(tiny_config(False)), {"model_config": tiny_config()}),
    "cotracker3_offline": (lambda: CoTracker3(tiny_config(True)), {"model_config": tiny_config()}),
    "cotracker2": (lambda: CoTracker2(CT2_TINY), {"config": CT2_TINY}),
    "tapir": (lambda: Tapir(TAPIR_TINY), {"config": TAPIR_TINY}),
    "bootstapir": (lambda: Tapir(BOOTSTAPIR_TINY), {"config": BOOTSTAPIR_TINY}),
}
# float32 rounding: a batched kernel may sum in another order; at coordinates of tens of pixels one
# ulp is ~4e-6 px, and TAPIR's soft-argmax over the cost volume adds a few more
TOL_PX = 1e-4


def rule_weights(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The reference rule applied to this network's own parameter names and shapes; buffers as built."""
    draw = weights_rule().draw
    buffers = {name for name, _ in net.named_buffers()}
    return {
        name: value.clone() if name in buffers else draw(name, list(value.shape))
        for name, value in net.state_dict().items()
    }


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these tiny models gain nothing from two, and on a busy machine the spinning
    second thread makes them many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("batching")
    built = {}
    for name, (make, options) in MODELS.items():
        path = folder / f"{name}.pth"
        torch.save(rule_weights(make()), path)
        teacher = create_teacher(name, checkpoint=path, **options)
        teacher.setup("cpu")
        built[name] = teacher
    return built


def clip(t: int, h: int, w: int, seed: int) -> np.ndarray:
    """Smooth blobs sliding right, so SIFT finds points and resizing keeps the texture."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8)
    base = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.stack([np.roll(base, shift=i, axis=1) for i in range(t)])


def queries(t: int, h: int, w: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 100)
    frames = rng.integers(0, t, n)
    return np.stack([frames, rng.uniform(0, w - 1, n), rng.uniform(0, h - 1, n)], axis=1).astype(np.float32)


def forward_batch_sizes(teacher, clips) -> tuple[list, list[int]]:
    seen: list[int] = []
    hook = teacher.model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    try:
        outs = teacher.predict_batch(clips)
    finally:
        hook.remove()
    return outs, seen


def assert_same_labels(got, want) -> None:
    assert got.tracks.shape == want.tracks.shape
    gap = float(np.abs(got.tracks - want.tracks).max(initial=0.0))
    assert gap <= TOL_PX, f"tracks differ by {gap} px"
    np.testing.assert_array_equal(got.visibility, want.visibility)
    np.testing.assert_allclose(got.confidence.astype(np.float32), want.confidence.astype(np.float32), atol=1e-3)


def mixed_clips() -> list[tuple[np.ndarray, np.ndarray]]:
    """Three 10-frame clips of different sizes (8 queries each) and a 7-frame clip between them."""
    return [
        (clip(10, 48, 64, 0), queries(10, 48, 64, 8, 0)),
        (clip(10, 60, 80, 1), queries(10, 60, 80, 8, 1)),
        (clip(7, 48, 64, 2), queries(7, 48, 64, 8, 2)),
        (clip(10, 48, 64, 3), queries(10, 48, 64, 8, 3)),
    ]


@pytest.mark.parametrize("name", list(MODELS))
def test_batched_forward_equals_one_clip_at_a_time(teachers, name):
    teacher = teachers[name]
    clips = mixed_clips()
    alone = [teacher.predict(f, q) for f, q in clips]
    outs, sizes = forward_batch_sizes(teacher, clips)
    # the three 10-frame clips share a forward; the 7-frame clip cannot join them
    assert sorted(sizes) == [1, 3], sizes
    assert len(outs) == len(clips)
    for got, want in zip(outs, alone, strict=True):
        assert_same_labels(got, want)
        assert got.is_finite()
    assert np.abs(outs[0].tracks - outs[3].tracks).max() > 0.01  # different clips, different labels


@pytest.mark.parametrize("name", ["tapir", "bootstapir"])
def test_tapir_pads_uneven_query_counts_exactly(teachers, name):
    """TAPIR's tracks are independent, so clips with 3, 8 and 0 queries share one forward (dummies dropped)."""
    teacher = teachers[name]
    clips = [
        (clip(9, 48, 64, 4), queries(9, 48, 64, 3, 4)),
        (clip(9, 48, 64, 5), queries(9, 48, 64, 8, 5)),
        (clip(9, 48, 64, 6), np.zeros((0, 3), np.float32)),
    ]
    alone = [teacher.predict(f, q) for f, q in clips]
    outs, sizes = forward_batch_sizes(teacher, clips)
    assert sizes == [2]  # the clip without queries needs no forward
    assert [o.tracks.shape for o in outs] == [(9, 3, 2), (9, 8, 2), (9, 0, 2)]
    for got, want in zip(outs, alone, strict=True):
        assert_same_labels(got, want)


@pytest.mark.parametrize("name", ["cotracker3_online", "cotracker3_offline", "cotracker2"])
def test_cotracker_never_pads_uneven_track_counts(teachers, name):
    """CoTracker's tracks attend to each other, so clips of different query counts get separate forwards."""
    teacher = teachers[name]
    clips = [
        (clip(9, 48, 64, 7), queries(9, 48, 64, 5, 7)),
        (clip(9, 48, 64, 8), queries(9, 48, 64, 6, 8)),
        (clip(9, 48, 64, 9), queries(9, 48, 64, 5, 9)),
    ]
    alone = [teacher.predict(f, q) for f, q in clips]
    outs, sizes = forward_batch_sizes(teacher, clips)
    assert sorted(sizes) == [1, 2]
    for got, want in zip(outs, alone, strict=True):
        assert_same_labels(got, want)


def test_online_clips_with_fewer_sift_support_points_run_apart(teachers):
    """A flat clip yields fewer SIFT support points; it must not share a forward (its track count differs)."""
    teacher = teachers["cotracker3_online"]
    flat = np.full((10, 48, 64, 3), 128, np.uint8)
    flat[:, 10:30, 10:30] = 60  # one square: a few corners only
    clips = [
        (clip(10, 48, 64, 10), queries(10, 48, 64, 4, 10)),
        (flat, queries(10, 48, 64, 4, 11)),
        (clip(10, 48, 64, 12), queries(10, 48, 64, 4, 12)),
    ]
    assert len(teacher.support_points(flat)) < len(teacher.support_points(clips[0][0]))
    alone = [teacher.predict(f, q) for f, q in clips]
    outs, sizes = forward_batch_sizes(teacher, clips)
    assert sorted(sizes) == [1, 2]
    for got, want in zip(outs, alone, strict=True):
        assert_same_labels(got, want)


@pytest.mark.parametrize("name", ["cotracker3_offline", "tapir"])
def test_predict_clips_groups_compatible_clips_up_to_max(teachers, name):
    """The labelling entry point: clips of equal length are grouped across the list, `max_clips` per forward."""
    teacher = teachers[name]
    clips = [(clip(t, 48, 64, 20 + i), queries(t, 48, 64, 6, 20 + i)) for i, t in enumerate([8, 6, 8, 8, 6, 8, 8])]
    alone = [teacher.predict(f, q) for f, q in clips]
    seen: list[int] = []
    hook = teacher.model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    try:
        outs = predict_clips(teacher, clips, max_clips=3)
    finally:
        hook.remove()
    assert seen == [3, 2, 2]  # five 8-frame clips as 3 + 2, then the two 6-frame clips
    for got, want in zip(outs, alone, strict=True):
        assert_same_labels(got, want)


def test_default_batched_call_loops_over_predict():
    """A teacher without its own predict_batch (lk) is called once per clip, with the same results."""
    lk = create_teacher("lk")
    assert not hasattr(lk, "predict_batch")
    clips = [(clip(6, 48, 64, 30 + i), queries(6, 48, 64, 5, 30 + i)) for i in range(3)]
    outs = predict_batch(lk, clips)
    for (frames, q), out in zip(clips, outs, strict=True):
        want = lk.predict(frames, q)
        np.testing.assert_array_equal(out.tracks, want.tracks)
        np.testing.assert_array_equal(out.visibility, want.visibility)


def test_batched_bad_clip_is_named(teachers):
    teacher = teachers["cotracker3_offline"]
    good = (clip(6, 48, 64, 40), queries(6, 48, 64, 3, 40))
    bad_queries = queries(6, 48, 64, 3, 41)
    bad_queries[1, 0] = 9  # frame 9 of a 6-frame clip
    bad = (clip(6, 48, 64, 41), bad_queries)
    with pytest.raises(ValueError, match="whole numbers in \\[0, 5\\]"):
        teacher.predict_batch([good, bad])
    outs = predict_clips(teacher, [good, bad, good], max_clips=3)
    assert isinstance(outs[1], ValueError)
    assert_same_labels(outs[0], teacher.predict(*good))
    assert_same_labels(outs[2], outs[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["cotracker3_offline", "tapir"])
def test_cuda_batched_forward(teachers, name, tmp_path):
    """On a GPU: float32 batches match single clips; bf16 autocast batches run and stay finite."""
    make, options = MODELS[name]
    path = tmp_path / "w.pth"
    torch.save(rule_weights(make()), path)
    clips = mixed_clips()
    for amp, tol in ((False, 1e-3), (True, None)):
        teacher = create_teacher(name, checkpoint=path, amp=amp, **options)
        teacher.setup("cuda")
        outs = teacher.predict_batch(clips)
        assert all(o.is_finite() for o in outs)
        if tol is not None:
            for (frames, q), got in zip(clips, outs, strict=True):
                assert np.abs(got.tracks - teacher.predict(frames, q).tracks).max() <= tol


def test_to_device_on_the_cpu_is_a_plain_copy():
    """Off CUDA the helper neither pins nor changes values: frames and queries arrive as `.to(device)` gives them."""
    from pseudotrack.teachers.neural import to_device

    frames = np.random.default_rng(0).integers(0, 256, (3, 8, 10, 3), dtype=np.uint8)[:, ::2]  # not contiguous
    got = to_device(frames, torch.device("cpu"))
    assert got.dtype == torch.uint8 and not got.is_pinned() and np.array_equal(got.numpy(), frames)
    queries = torch.rand(5, 3)
    assert torch.equal(to_device(queries, "cpu"), queries)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["cotracker3_offline", "cotracker2", "tapir"])
def test_cuda_pinned_copies_give_the_same_labels(name, tmp_path, monkeypatch):
    """Pinned, non-blocking host -> GPU copies of frames and queries change no output: the copies are
    ordered on the stream before the kernels that read them."""
    from pseudotrack.teachers import neural

    make, options = MODELS[name]
    path = tmp_path / "w.pth"
    torch.save(rule_weights(make()), path)
    clips = mixed_clips()
    teacher = create_teacher(name, checkpoint=path, **options)
    teacher.setup("cuda")
    pinned = teacher.predict_batch(clips)
    monkeypatch.setattr(neural, "PIN_HOST_COPIES", False)
    plain = teacher.predict_batch(clips)
    for a, b in zip(pinned, plain, strict=True):
        assert np.array_equal(a.tracks, b.tracks) and np.array_equal(a.visibility, b.visibility)
        assert np.array_equal(a.confidence, b.confidence)
