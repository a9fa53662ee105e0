"""CoTracker2 (Karaev et al., 2023) as a frozen teacher, loading the official files unmodified.

The module tree is named so that `state_dict()` gives exactly the keys of the
published `cotracker2v1.pth` (window 16) and `cotracker2.pth` (window 8),
misspelling `updateformer.virual_tracks` included, so no key mapping is needed.
The model is written as named steps (encode frames, build track features,
correlate, update one window, slide the windows) instead of one long forward;
numerics follow the authors' release operation by operation, which is what
the parity cases in `shared/reference/cotracker2` check.

The building blocks shared with CoTracker3 (feature encoder, update
transformer, sampling, embeddings) come from `blocks`; what stays here is
CoTracker2's own: explicit (unfused) attention, the flow head sizing, its
correlation of track features with every pixel, and the window schedule.

Two behaviours of the original are kept on purpose because the parity cases
depend on them:
  * the cross-attention mask is applied to the query side whenever the number
    of tracks equals the number of virtual tracks (64), and to the key side
    otherwise;
  * a clip shorter than half a window plus one frame gets no window at all
    (all-zero tracks); the predictor pads such clips to a full window.

Memory is bounded by correlating at most `point_chunk` tracks with the feature
pyramid at a time and by encoding at most `frame_chunk` frames at a time. Both
only split work whose rows are independent, so chunking does not change the
result (tracks still attend to each other through the virtual tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from .base import TeacherOutput, TeacherSpec, register_teacher
from .blocks import (
    Attention,
    FeatureEncoder,
    UpdateTransformer,
    feature_pyramid,
    fourier_2d,
    mask_bias,
    sample_patches,
    sample_points,
    sample_video,
    sincos_1d,
    sincos_2d,
)
from .checkpoints import load_into
from .device_constants import device_constant
from .neural import NeuralTeacher, Prepared, pin_query_frames, resize_frames, to_device
from .support_points import grid_points

# Official file name -> sliding-window length the file was trained with.
WINDOW_BY_FILE = {"cotracker2v1.pth": 16, "cotracker2.pth": 8}


@dataclass(frozen=True)
class CoTracker2Config:
    """Sizes of a CoTracker2; the defaults are the published model (`cotracker2v1.pth`).

    input_dim (derived) is the width of one token before the update transformer:
    flow embedding (2 + 2 * flow_embed_dim), correlations
    (corr_levels * (2 * corr_radius + 1)^2), track feature (latent_dim) and the
    (track mask, visibility) pair; 456 for the published model.
    """

    window_len: int = 16
    stride: int = 4
    latent_dim: int = 128
    hidden_size: int = 384
    num_heads: int = 8
    time_depth: int = 6
    space_depth: int = 6
    num_virtual_tracks: int = 64
    mlp_ratio: float = 4.0
    corr_levels: int = 4
    corr_radius: int = 3
    flow_embed_dim: int = 64
    model_resolution: tuple[int, int] = (384, 512)

    @property
    def input_dim(self) -> int:
        corr = self.corr_levels * (2 * self.corr_radius + 1) ** 2
        return 2 + 2 * self.flow_embed_dim + corr + self.latent_dim + 2

    def validate(self) -> None:
        problems = []
        if self.window_len < 2:
            problems.append(f"window_len={self.window_len} must be at least 2")
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.input_dim % 4:
            problems.append(f"input_dim={self.input_dim} must be a multiple of 4 (sin-cos embeddings)")
        if self.flow_embed_dim % 2:
            problems.append(f"flow_embed_dim={self.flow_embed_dim} must be even")
        if self.latent_dim % 4:
            problems.append(f"latent_dim={self.latent_dim} must be a multiple of 4")
        if self.space_depth and self.time_depth % self.space_depth:
            problems.append(f"time_depth={self.time_depth} must divide by space_depth={self.space_depth}")
        h, w = self.model_resolution
        if h < 2 * self.stride or w < 2 * self.stride:
            problems.append(f"model_resolution={self.model_resolution} is too small for stride {self.stride}")
        if problems:
            raise ConfigError("invalid CoTracker2Config: " + "; ".join(problems))


# ---------------------------------------------------------------- CoTracker2's attention


class ExplicitAttention(Attention):
    """`blocks.Attention` with the product written out, as CoTracker2 computes it.

    softmax(q k^T * scale + bias) v instead of the fused kernel, which rounds
    differently. A boolean "may attend" mask becomes the original's
    "(not allowed) * -float max" bias (not -inf, so a row whose keys are all
    masked gets uniform weights instead of NaN), made in the dtype of the
    block's input as the original makes it (float32 under autocast).
    Same parameters and keys as `Attention`.
    """

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x: [B, N1, D], context: [B, N2, D]; bias: bool (may attend) or float, broadcastable to
        # [B, heads, N1, N2]  ->  [B, N1, D]
        context = x if context is None else context
        q = self._split_heads(self.to_q(x))
        k, v = (self._split_heads(kv) for kv in self.to_kv(context).chunk(2, dim=-1))
        sim = (q @ k.transpose(-2, -1)) * self.dim_head**-0.5
        if bias is not None:
            sim = sim + (mask_bias(bias, x.dtype) if bias.dtype == torch.bool else bias)
        out = sim.softmax(dim=-1) @ v
        return self.to_out(out.transpose(1, 2).flatten(2))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # [B, N, heads * dim_head] -> [B, heads, N, dim_head]
        return x.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)


class UpdateFormer(UpdateTransformer):
    """`blocks.UpdateTransformer` sized from a CoTracker2Config, with explicit attention everywhere.

    The flow head predicts (dx, dy) and a track-feature update (latent_dim); there
    is no visibility head in the transformer. `blocks.CrossAttnBlock` already
    applies a mask of N == num_virtual_tracks entries to the query side (see the
    module docstring); only the attention kernel differs, so each block's
    attention is swapped for `ExplicitAttention` (same keys).
    """

    def __init__(self, cfg: CoTracker2Config):
        super().__init__(
            input_dim=cfg.input_dim,
            hidden_size=cfg.hidden_size,
            flow_dim=cfg.latent_dim + 2,
            num_heads=cfg.num_heads,
            time_depth=cfg.time_depth,
            space_depth=cfg.space_depth,
            mlp_ratio=cfg.mlp_ratio,
            num_virtual_tracks=cfg.num_virtual_tracks,
        )
        for block in (*self.time_blocks, *self.space_virtual_blocks):
            block.attn = ExplicitAttention(cfg.hidden_size, cfg.num_heads)
        for block in (*self.space_point2virtual_blocks, *self.space_virtual2point_blocks):
            block.cross_attn = ExplicitAttention(cfg.hidden_size, cfg.num_heads)


# ---------------------------------------------------------------- correlation


def local_correlations(
    track_feat: torch.Tensor, pyramid: list[torch.Tensor], coords: torch.Tensor, radius: int, point_chunk: int
) -> torch.Tensor:
    """Correlation of each track feature with every pixel, sampled on a (2r+1)^2 grid around the track.

    track_feat [B, S, N, C], pyramid maps [B, S, C, h, w], coords [B, S, N, 2] in level-0
    feature pixels  ->  [B * N, S, levels * (2r+1)^2], levels outermost, then the x
    offset, then the y offset (the published layout, `blocks.patch_offsets` order).
    The full correlation volume is the largest tensor in the model, so it is built
    for `point_chunk` tracks at a time.
    """
    b, s, n, c = track_feat.shape
    norm = device_constant(float(np.sqrt(np.float32(c))), coords.device, torch.float32)
    chunks = []
    for start in range(0, n, point_chunk):
        feat = track_feat[:, :, start : start + point_chunk]
        m = feat.shape[2]
        centre = coords[:, :, start : start + point_chunk].reshape(b * s * m, 1, 2)
        per_level = []
        for level, fmap in enumerate(pyramid):
            h, w = fmap.shape[-2:]
            corr = torch.matmul(feat, fmap.reshape(b, s, c, h * w)) / norm  # B S m (h w)
            sampled = sample_patches(corr.reshape(b * s * m, 1, h, w), centre / 2**level, radius)
            per_level.append(sampled.reshape(b, s, m, -1))
        chunks.append(torch.cat(per_level, dim=-1))
    out = torch.cat(chunks, dim=2)  # B S N L
    return out.permute(0, 2, 1, 3).reshape(b * n, s, -1).float()


# ---------------------------------------------------------------- the model


def window_starts(num_frames: int, window_len: int) -> list[int]:
    """First frame of each sliding window (step window_len // 2), as the original schedules them.

    ceil((T - S) / step) + 1 windows; none at all when T <= S // 2 (see module docstring).
    """
    step = window_len // 2
    count = (num_frames - window_len + step - 1) // step + 1
    return list(range(0, step * count, step))


class CoTracker2(nn.Module):
    """CoTracker2 with the official state-dict layout; `forward` runs the whole clip, window by window."""

    def __init__(self, cfg: CoTracker2Config | None = None):
        super().__init__()
        cfg = cfg or CoTracker2Config()
        cfg.validate()
        self.cfg = cfg
        self.fnet = FeatureEncoder(cfg.latent_dim, cfg.stride)
        self.updateformer = UpdateFormer(cfg)
        t = torch.arange(cfg.window_len, dtype=torch.float32)
        self.register_buffer("time_emb", sincos_1d(cfg.input_dim, t))
        h, w = cfg.model_resolution
        self.register_buffer("pos_emb", sincos_2d(cfg.input_dim, h // cfg.stride, w // cfg.stride))
        self.norm = nn.GroupNorm(1, cfg.latent_dim)
        self.track_feat_updater = nn.Sequential(nn.Linear(cfg.latent_dim, cfg.latent_dim), nn.GELU())
        self.vis_predictor = nn.Sequential(nn.Linear(cfg.latent_dim, 1))

    def encode(self, video: torch.Tensor, frame_chunk: int) -> torch.Tensor:
        # video: [B, T, 3, H, W] in [-1, 1]  ->  [B, T, C, H // stride, W // stride]
        b, t = video.shape[:2]
        flat = video.reshape(b * t, *video.shape[2:])
        fmaps = torch.cat([self.fnet(flat[i : i + frame_chunk]) for i in range(0, b * t, frame_chunk)])
        return fmaps.reshape(b, t, *fmaps.shape[1:])

    def forward_window(
        self,
        fmaps: torch.Tensor,
        coords: torch.Tensor,
        track_feat: torch.Tensor,
        vis: torch.Tensor,
        track_mask: torch.Tensor,
        attention_mask: torch.Tensor,
        iters: int,
        point_chunk: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`iters` refinements of one window; returns coords in input pixels and visibility logits.

        fmaps [B, S, C, h, w]; coords [B, S, N, 2] feature pixels; track_feat [B, S, N, C];
        vis [B, S, N, 1] logits; track_mask [B, S, N, 1] bool; attention_mask [B, S, N] bool
        ->  coords [B, S, N, 2] input pixels, vis [B, S, N] logits
        """
        cfg = self.cfg
        b, s, n, _ = coords.shape
        c = cfg.latent_dim
        mask_vis = torch.cat([track_mask.to(vis.dtype), vis], dim=-1).permute(0, 2, 1, 3).reshape(b * n, s, 2)
        pyramid = feature_pyramid(fmaps, cfg.corr_levels)
        pos = sample_points(self.pos_emb.expand(b, -1, -1, -1), coords[:, 0]).reshape(b * n, 1, -1)
        space_mask = attention_mask.reshape(b * s, n)
        for _ in range(iters):
            corrs = local_correlations(track_feat, pyramid, coords, cfg.corr_radius, point_chunk)
            flows = (coords - coords[:, 0:1]).permute(0, 2, 1, 3).reshape(b * n, s, 2)
            feat = track_feat.permute(0, 2, 1, 3).reshape(b * n, s, c)
            tokens = torch.cat([fourier_2d(flows, cfg.flow_embed_dim), corrs, feat, mask_vis], dim=2)
            tokens = tokens + pos + self.time_emb
            delta = self.updateformer(tokens.view(b, n, s, -1), space_mask)  # B N S (2 + C)
            coords = coords + delta[..., :2].permute(0, 2, 1, 3)
            feat = feat.reshape(b * n * s, c)
            feat = self.track_feat_updater(self.norm(delta[..., 2:].reshape(b * n * s, c))) + feat
            track_feat = feat.reshape(b, n, s, c).permute(0, 2, 1, 3)
        return coords * cfg.stride, self.vis_predictor(track_feat).reshape(b, s, n)

    def forward(
        self,
        video: torch.Tensor,
        queries: torch.Tensor,
        iters: int = 4,
        point_chunk: int = 256,
        frame_chunk: int = 16,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Track `queries` through `video`.

        video [B, T, 3, H, W] float 0..255; queries [B, N, 3] (t, x, y) in video pixels
        ->  tracks [B, T, N, 2] (x, y) pixels, visibility [B, T, N] probabilities
        """
        cfg = self.cfg
        b, t = video.shape[:2]
        n = queries.shape[1]
        s, step = cfg.window_len, cfg.window_len // 2
        overlap = s - step
        device = video.device
        video = 2 * (video / 255.0) - 1.0
        query_frames = queries[:, :, 0].long()
        query_coords = queries[..., 1:] / cfg.stride

        pad = (s - t % s) % s  # whole windows of frames; the last frame is repeated
        if pad:
            video = torch.cat([video, video[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
        fmaps = self.encode(video, frame_chunk)
        frame_col = query_frames[:, None, :, None].to(query_coords.dtype)
        sample_at = torch.cat([frame_col, query_coords[:, None]], dim=-1)  # B 1 N 3
        track_feat = sample_video(fmaps, sample_at).repeat(1, s, 1, 1)  # B S N C

        tracks = torch.zeros((b, t, n, 2), device=device)
        vis_logits = torch.zeros((b, t, n), device=device)
        coords_init = query_coords.reshape(b, 1, n, 2).expand(b, s, n, 2).float()
        vis_init = torch.full((b, s, n, 1), 10.0, device=device)
        for start in window_starts(t, s):
            if start > 0:
                # tracks queried before the overlap start from the previous window's answer
                carried = (query_frames < start + overlap)[:, None, :, None]
                prev = tracks[:, start : start + overlap] / cfg.stride
                prev = torch.cat([prev, prev[:, -1:].expand(-1, step, -1, -1)], dim=1)
                prev_vis = vis_logits[:, start : start + overlap, :, None]
                prev_vis = torch.cat([prev_vis, prev_vis[:, -1:].expand(-1, step, -1, -1)], dim=1)
                coords_init = torch.where(carried.expand_as(coords_init), prev, coords_init)
                vis_init = torch.where(carried.expand_as(vis_init), prev_vis, vis_init)
            # tracks queried within or before this window take part in it
            active = (query_frames < start + s).reshape(b, 1, n).repeat(1, s, 1)  # B S N
            frames = torch.arange(start, start + s, device=device)
            track_mask = query_frames[:, None, :, None] <= frames[None, :, None, None]  # B S N 1
            if start > 0:
                track_mask[:, :overlap] = False
            coords, vis = self.forward_window(
                fmaps[:, start : start + s],
                coords_init,
                active.unsqueeze(-1) * track_feat,
                vis_init,
                track_mask,
                active,
                iters,
                point_chunk,
            )
            keep = min(t - start, s)
            tracks[:, start : start + s] = coords[:, :keep]
            vis_logits[:, start : start + s] = vis[:, :keep]
        return tracks, torch.sigmoid(vis_logits)


# ---------------------------------------------------------------- loading


def window_len_for(path: str | Path, default: int = 16) -> int:
    """Window length of an official file, by its name; `default` for other names."""
    return WINDOW_BY_FILE.get(Path(path).name, default)


def cotracker2_config(
    path: str | Path | None, window_len: int | None = None, config: CoTracker2Config | None = None
) -> CoTracker2Config:
    """The config for `path`: window `window_len` when given, else `config.window_len` when a config is
    given, else the official file name's (16 for unknown names)."""
    cfg = config or CoTracker2Config()
    if window_len is None and config is None and path is not None:
        window_len = window_len_for(path, cfg.window_len)
    return replace(cfg, window_len=window_len) if window_len is not None else cfg


def checkpoint_filter(
    state: dict[str, torch.Tensor], cfg: CoTracker2Config, path: str | Path
) -> dict[str, torch.Tensor]:
    """The official keys are this module's own (no mapping); a file trained with another window is
    refused with the value to pass."""
    emb = state.get("time_emb")
    other_window = emb is not None and emb.ndim == 3 and emb.shape[1] != cfg.window_len
    if other_window and emb.shape[2] == cfg.input_dim:
        raise CheckpointError(
            f"checkpoint {path} was trained with window {emb.shape[1]} (time_emb {tuple(emb.shape)}) "
            f"but the model was built for window {cfg.window_len}: pass window_len={emb.shape[1]}"
        )
    return state


def load_cotracker2(
    path: str | Path,
    window_len: int | None = None,
    config: CoTracker2Config | None = None,
    device: str | torch.device = "cpu",
) -> CoTracker2:
    """Build a CoTracker2 for `path` (see `cotracker2_config`) and load the file strictly (official keys)."""
    cfg = cotracker2_config(path, window_len, config)
    model = CoTracker2(cfg)
    load_into(model, path, filter_fn=lambda state: checkpoint_filter(state, cfg, path), model_name="cotracker2")
    return model.to(device).eval()


# ---------------------------------------------------------------- teacher


def support_grid(size: int, height: int, width: int) -> np.ndarray:
    """[size * size, 2] float32 (x, y) of the authors' support grid (`support_points.grid_points`).

    The authors' predictor adds these (queried at frame 0) so that each window
    sees tracks spread over the whole frame, whatever the user queried.
    """
    return grid_points(size, height, width).astype(np.float32)


@dataclass
class CoTracker2Teacher(NeuralTeacher):
    """CoTracker2 as a teacher, with the authors' predictor conventions.

    Frames are resized to the model resolution (bilinear, corners aligned), a
    6x6 support grid is tracked alongside the queries and dropped, visibility is
    the probability above `visibility_threshold`, and each query's own frame is
    set to the query point, visible. CoTracker2 has no confidence output, so
    confidence is all ones. Tracks attend to each other through the virtual
    tokens, and the original's mask quirk (module docstring) depends on the
    track count, so clips share a forward only with equal counts, never padded.
    """

    window_len: int | None = None
    iters: int = 6
    visibility_threshold: float = 0.9
    support_grid_size: int = 6
    point_chunk: int = 256
    config: CoTracker2Config | None = None
    name: str = "cotracker2"

    def checkpoint_hint(self) -> str:
        return "cotracker2v1.pth (window 16) or cotracker2.pth (window 8)"

    def resolved_config(self) -> CoTracker2Config:
        return cotracker2_config(self.checkpoint, self.window_len, self.config)

    def build_model(self) -> CoTracker2:
        return CoTracker2(self.resolved_config())

    def checkpoint_filter(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return checkpoint_filter(state, self.resolved_config(), self.checkpoint)

    def support_points(self, frames: np.ndarray) -> np.ndarray:
        mh, mw = self.model_resolution()
        grid = support_grid(self.support_grid_size, mh, mw)
        return np.concatenate([np.zeros((len(grid), 1), np.float32), grid], axis=1)

    def forward(self, group: list[Prepared]) -> list[tuple[np.ndarray, np.ndarray]]:
        """One forward over clips of equal length and query count -> per clip (tracks [T, N, 2], vis [T, N]).

        The correlation volume grows with the batch, so tracks are correlated
        `point_chunk / B` at a time (rows are independent there: same result).
        """
        assert self.model is not None
        cfg = self.model.cfg
        t = len(group[0].frames)
        with torch.inference_mode(), self.autocast():
            video = torch.cat(
                [resize_frames(p.frames, self.model_resolution(), self.device, self.frame_chunk) for p in group]
            )
            if t < cfg.window_len:  # a full window, so even very short clips get one
                video = torch.cat([video, video[:, -1:].expand(-1, cfg.window_len - t, -1, -1, -1)], dim=1)
            queries = to_device(np.stack([p.model_queries for p in group]), self.device)
            point_chunk = max(1, self.point_chunk // len(group))
            tracks, vis = self.model(video, queries, self.iters, point_chunk, self.frame_chunk)
            results = []
            for b, p in enumerate(group):
                clip_tracks = tracks[b, :t, : p.n].float().cpu().numpy() / p.to_model
                results.append((clip_tracks.astype(np.float32), vis[b, :t, : p.n].float().cpu().numpy()))
        return results

    def finish(self, p: Prepared, raw: tuple[np.ndarray, np.ndarray]) -> TeacherOutput:
        tracks, vis = raw
        visible = vis > self.visibility_threshold
        pin_query_frames(p, tracks, visible)
        return TeacherOutput(tracks, visible, np.ones(visible.shape, np.float16))


def _make_teacher(**options) -> CoTracker2Teacher:
    return CoTracker2Teacher(**options)


SPEC = register_teacher(
    TeacherSpec(
        name="cotracker2",
        factory=_make_teacher,
        needs_checkpoint=True,
        checkpoint_names=tuple(WINDOW_BY_FILE),
        description="CoTracker2 (sliding windows of 16 or 8 frames), official checkpoints; no confidence",
    )
)
