"""The student's track loss against values worked out by hand on tiny tensors."""

from __future__ import annotations

import pytest
import torch

from pseudotrack.student.loss import (
    WindowPrediction,
    huber,
    masked_mean,
    offline_supervision_mask,
    online_supervision_mask,
    track_loss,
)


def test_huber_is_quadratic_inside_delta_and_linear_outside() -> None:
    # 0.5*e^2 for |e| <= 6; 6*(|e| - 3) beyond
    values = huber(torch.tensor([0.0, 1.0, -3.0, 6.0, 10.0, -7.0]), delta=6.0)
    assert values.tolist() == pytest.approx([0.0, 0.5, 4.5, 18.0, 42.0, 24.0])


def test_masked_mean_of_empty_mask_is_zero_not_nan() -> None:
    values = torch.tensor([1.0, 2.0], requires_grad=True)
    out = masked_mean(values, torch.tensor([False, False]))
    assert out.item() == 0.0
    out.backward()  # still differentiable
    assert values.grad is not None and values.grad.abs().sum() == 0


def _one_window_case() -> tuple[list[WindowPrediction], torch.Tensor, torch.Tensor, torch.Tensor]:
    """B=1, T=2, N=2, K=2. Point 0 visible, point 1 occluded in both frames; labels at the origin.

    iteration 1: point 0 is off by (3, 0) in frame 0 and exact in frame 1; point 1 is off by (10, 0)
    iteration 2: exact everywhere
    """
    target = torch.zeros(1, 2, 2, 2)
    visible = torch.tensor([[[True, False], [True, False]]])
    first = torch.zeros(1, 2, 2, 2)
    first[0, 0, 0] = torch.tensor([3.0, 0.0])
    first[0, :, 1] = torch.tensor([10.0, 0.0])
    windows = [WindowPrediction(0, [first, torch.zeros(1, 2, 2, 2)])]
    return windows, target, visible, torch.ones(1, 2, 2, dtype=torch.bool)


def test_track_loss_by_hand_with_occluded_supervision() -> None:
    windows, target, visible, supervised = _one_window_case()
    loss = track_loss(windows, target, visible, supervised, torch.tensor([True]))
    # iteration 1: visible mean of per-point coord-mean Huber = (4.5/2 + 0)/2 = 1.125,
    #              occluded mean = 42/2 = 21 -> 1.125 + 0.2*21 = 5.325
    # weights gamma^(K-k): 0.8 for k=1, 1 for k=2 (zero error); divided by K=2
    assert loss.item() == pytest.approx(0.8 * 5.325 / 2)


def test_occluded_points_of_a_teacher_that_cannot_track_them_get_no_loss() -> None:
    windows, target, visible, supervised = _one_window_case()
    loss = track_loss(windows, target, visible, supervised, torch.tensor([False]))
    assert loss.item() == pytest.approx(0.8 * 1.125 / 2)


def test_occluded_weight_is_below_visible_weight() -> None:
    # the same 2 px error costs five times less on an occluded point than on a visible one
    target = torch.zeros(1, 1, 1, 2)
    pred = [torch.full((1, 1, 1, 2), 2.0)]
    sup = torch.ones(1, 1, 1, dtype=torch.bool)
    vis_loss = track_loss([WindowPrediction(0, pred)], target, sup, sup, torch.tensor([True]))
    occ_loss = track_loss([WindowPrediction(0, pred)], target, ~sup, sup, torch.tensor([True]))
    assert vis_loss.item() == pytest.approx(2.0)
    assert occ_loss.item() == pytest.approx(0.4)


def test_windows_are_averaged_and_only_cover_their_frames() -> None:
    # T=3, two windows of length 2 starting at 0 and 1, one iteration each, one visible point
    target = torch.zeros(1, 3, 1, 2)
    visible = torch.ones(1, 3, 1, dtype=torch.bool)
    w0 = torch.tensor([1.0, 1.0, 2.0, 2.0]).view(1, 2, 1, 2)  # Huber 0.5 then 2.0
    w1 = torch.tensor([4.0, 4.0, 8.0, 8.0]).view(1, 2, 1, 2)  # Huber 8.0 then 6*(8-3)=30
    windows = [WindowPrediction(0, [w0]), WindowPrediction(1, [w1])]
    loss = track_loss(windows, target, visible, visible.clone(), torch.tensor([True]))
    assert loss.item() == pytest.approx(((0.5 + 2.0) / 2 + (8.0 + 30.0) / 2) / 2)


def test_online_mask_drops_frames_before_the_query_and_padded_tracks() -> None:
    queries_t = torch.tensor([[0.0, 2.0, 1.0]])
    valid = torch.tensor([[True, True, False]])
    mask = online_supervision_mask(queries_t, 3, valid)
    expected = torch.tensor([[[True, False, False], [True, False, False], [True, True, False]]])
    assert torch.equal(mask, expected)
    assert torch.equal(offline_supervision_mask(valid, 3)[0, 0], valid[0])


def test_batch_mean_is_joint_over_samples_and_gradient_reaches_every_iteration() -> None:
    # two samples, one visible point each, errors 1 px and 3 px in x; K=2 with the same prediction
    target = torch.zeros(2, 1, 1, 2)
    pred = torch.tensor([[1.0, 0.0], [3.0, 0.0]]).view(2, 1, 1, 2).requires_grad_(True)
    second = pred.detach().clone().requires_grad_(True)
    sup = torch.ones(2, 1, 1, dtype=torch.bool)
    loss = track_loss([WindowPrediction(0, [pred, second])], target, sup, sup, torch.tensor([True, False]))
    per_iter = (0.25 + 2.25) / 2  # coord-mean Huber 0.5/2 and 4.5/2, averaged over both samples
    assert loss.item() == pytest.approx((0.8 * per_iter + per_iter) / 2)
    loss.backward()
    assert pred.grad is not None and second.grad is not None
    # d/dx of 0.5 x^2 = x, through the coord mean (1/2), sample mean (1/2), K (1/2) and gamma
    assert pred.grad[0, 0, 0, 0].item() == pytest.approx(0.8 * 1.0 / 8)
    assert second.grad[1, 0, 0, 0].item() == pytest.approx(3.0 / 8)


def test_empty_window_list_is_refused() -> None:
    with pytest.raises(ValueError):
        track_loss(
            [],
            torch.zeros(1, 1, 1, 2),
            torch.ones(1, 1, 1, dtype=torch.bool),
            torch.ones(1, 1, 1, dtype=torch.bool),
            torch.tensor([True]),
        )
