"""The student's track loss on pseudo-labels (CoTracker3 §3.3, eq. 2).

Only tracks are supervised. The paper found it more stable not to supervise
confidence and visibility on pseudo-labels, so those outputs get no loss here
(their linear head is frozen instead, see `student/model.py`).

The loss follows the authors' recipe:

* a Huber penalty (δ = 6 px) on every iterative update k = 1..K, weighted by
  γ^(K−k) with γ = 0.8, so late refinements matter most but early ones still
  get a gradient; the weighted sum is divided by K, as the authors do, which
  keeps the loss scale independent of the number of iterations;
* visible and occluded label points are averaged separately and the occluded
  term is scaled down (the authors' factor 1/5: their code weighs visible
  points by 0.05 and occluded ones by 0.01), because a teacher's guess behind
  an occluder is less reliable than a visible match;
* occluded points get no loss at all when the label's teacher cannot track
  through occlusion (TAPIR, `lk`: `tracks_occluded` is False in the sample);
* the online model is trained on sliding windows: the loss is computed per
  window and averaged over windows, and (through `supervised`) only on frames
  at or after each point's query frame, since an online tracker cannot look
  back. The offline model is one window covering the clip.

Deviation noted for reviewers: the authors' code uses L1 (not Huber) for the
occluded term; we follow the paper's equation, Huber for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

HUBER_DELTA = 6.0
GAMMA = 0.8
OCCLUDED_WEIGHT = 0.2


@dataclass
class WindowPrediction:
    """Per-iteration track estimates of one sliding window.

    start:  first frame of the window in the clip
    tracks: K tensors float [B, S, N, 2], one per iterative update (first to last),
            pixels of the training clip; S may be shorter for the last window
    """

    start: int
    tracks: Sequence[torch.Tensor]


def huber(error: torch.Tensor, delta: float = HUBER_DELTA) -> torch.Tensor:
    """Elementwise Huber penalty of a residual: quadratic within ±delta, linear beyond.

    error: any shape; returns the same shape.
    """
    abs_err = error.abs()
    quadratic = 0.5 * error**2
    linear = delta * (abs_err - 0.5 * delta)
    return torch.where(abs_err <= delta, quadratic, linear)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(Weighted) mean of `values` where `mask` holds; 0 (with a gradient path) when the mask is empty.

    values: float [...]; mask: bool or float, broadcastable to values; weights: float, broadcastable,
    positive (per-track quality weights): the sum of weight * value over the mask divided by the sum
    of the weights there, so only their ratios matter.
    An empty mask happens legitimately (no occluded labels in a batch, or a
    TAPIR-only batch), so it must not produce NaN.
    """
    mask = mask.to(values.dtype).expand_as(values)
    if weights is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    mask = mask * weights.to(values.dtype).expand_as(values)
    return (values * mask).sum() / mask.sum().clamp(min=1e-6)


def track_loss(
    windows: Sequence[WindowPrediction],
    target_tracks: torch.Tensor,
    target_visible: torch.Tensor,
    supervised: torch.Tensor,
    occluded_supervised: torch.Tensor,
    delta: float = HUBER_DELTA,
    gamma: float = GAMMA,
    occluded_weight: float = OCCLUDED_WEIGHT,
    track_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar track loss averaged over windows (see the module docstring for the recipe).

    target_tracks:       float [B, T, N, 2] label tracks, pixels of the clip
    target_visible:      bool  [B, T, N]    label visibility
    supervised:          bool  [B, T, N]    where a label may be used at all: real (not padded)
                                            tracks, and for the online model frames >= query frame
    occluded_supervised: bool  [B]          the sample's teacher tracks through occlusion
    track_weights:       float [B, N] | None per-track weights (label quality, `--quality-weighting`):
                                            each mean becomes a weighted mean; None weighs tracks equally
    """
    if not windows:
        raise ValueError("track_loss needs at least one window of predictions")
    visible_mask = supervised & target_visible
    occluded_mask = supervised & ~target_visible & occluded_supervised.view(-1, 1, 1)
    weights = None if track_weights is None else track_weights.float().unsqueeze(1)  # [B, 1, N]
    total = target_tracks.new_zeros(())
    for window in windows:
        if not window.tracks:
            raise ValueError(f"window starting at frame {window.start} has no iterative predictions")
        length = window.tracks[0].shape[1]
        frames = slice(window.start, window.start + length)
        target = target_tracks[:, frames].float()
        vis = visible_mask[:, frames]
        occ = occluded_mask[:, frames]
        num_iters = len(window.tracks)
        window_loss = target.new_zeros(())
        for k, pred in enumerate(window.tracks, start=1):
            error = huber(pred.float() - target, delta).mean(dim=-1)  # [B, S, N]
            term = masked_mean(error, vis, weights) + occluded_weight * masked_mean(error, occ, weights)
            window_loss = window_loss + gamma ** (num_iters - k) * term
        total = total + window_loss / num_iters
    return total / len(windows)


def online_supervision_mask(query_frames: torch.Tensor, num_frames: int, valid: torch.Tensor) -> torch.Tensor:
    """Frames an online student may be supervised on: at or after each point's query frame.

    query_frames: float or int [B, N]; valid: bool [B, N] (False for padded tracks)
    returns bool [B, T, N]
    """
    t = torch.arange(num_frames, device=query_frames.device).view(1, -1, 1)
    return (t >= query_frames.round().long().unsqueeze(1)) & valid.unsqueeze(1)


def offline_supervision_mask(valid: torch.Tensor, num_frames: int) -> torch.Tensor:
    """An offline student tracks both ways, so every frame of a real track is supervised.

    valid: bool [B, N]; returns bool [B, T, N]
    """
    return valid.unsqueeze(1).expand(-1, num_frames, -1)
