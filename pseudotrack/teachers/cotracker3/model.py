"""CoTracker3 (Karaev et al., 2024), online and offline: the network and official-file loading.

One network serves both variants (§3.3). They differ only in the length of
the learnt time embedding (16 frames online, 60 offline) and in how a clip is
run:

* offline: the whole clip in one pass, the time embedding stretched to the
  clip's length (`CoTracker3.forward_offline`);
* online: windows of S = 16 frames moving by S/2; a window starts from the
  previous window's answer on the frames they share. What is carried from one
  window to the next lives in an explicit `OnlineState` value that
  `online_step` takes and returns (`init_online` makes the first one), never
  in attributes of the module. `forward_windowed` runs a whole clip that way,
  encoding each frame once.

Module names give exactly the published state-dict keys (`scaled_online.pth`,
`baseline_online.pth`, `scaled_offline.pth`, `baseline_offline.pth`), so the
files load unmodified and a student saved from this module is an official-layout
file. The separate linear visibility/confidence layer that training freezes
(§3.3) is `CoTracker3.VIS_CONF_HEAD` = "updateformer.vis_conf_head".

Per refinement step, each track's token is its visibility and confidence
logits, 4D correlations between a patch around the query and a patch around
the current estimate at every pyramid level (through `corr_mlp`), and a
Fourier embedding of the displacement to the previous and next frames. Memory
is bounded by building those tokens for a limited number of (frame, track)
pairs at a time and by running transformer blocks on a limited number of
tokens at a time (`Chunks`); both only split rows that do not interact, so
the result does not depend on the chunk sizes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointError, ConfigError
from ..blocks import (
    FeatureEncoder,
    Mlp,
    UpdateTransformer,
    bilinear_sample,
    feature_pyramid,
    interpolate_time_embedding,
    patch_offsets,
    posenc,
    sample_video,
    sincos_1d,
)
from ..checkpoints import load_into
from ..device_constants import device_constant

ONLINE_FILES = ("scaled_online.pth", "baseline_online.pth")
OFFLINE_FILES = ("scaled_offline.pth", "baseline_offline.pth")
STUDENT_FORMAT_PREFIX = "pseudotrack-student/"


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class CoTracker3Config:
    """Sizes of a CoTracker3; the defaults are the published model.

    offline:            which variant the config describes; it picks the time-embedding
                        length (`window_len`) and how teachers run the network
    online_window:      frames per sliding window of the online variant (step = half of it)
    offline_window:     frames the offline time embedding was trained on (stretched to any clip)
    corr_radius:        patches are (2r+1) x (2r+1); correlations are patch x patch
    corr_dim:           width of one pyramid level's correlation embedding (corr_mlp output)
    posenc_degrees:     Fourier frequencies 2^0..2^(d-1) of the displacements
    model_resolution:   (height, width) clips are resized to; displacements are
                        normalised by it even when a clip of another size is run
    """

    offline: bool = False
    online_window: int = 16
    offline_window: int = 60
    stride: int = 4
    latent_dim: int = 128
    corr_radius: int = 3
    corr_levels: int = 4
    corr_hidden: int = 384
    corr_dim: int = 256
    hidden_size: int = 384
    num_heads: int = 8
    time_depth: int = 3
    space_depth: int = 3
    mlp_ratio: float = 4.0
    num_virtual_tracks: int = 64
    posenc_degrees: int = 10
    model_resolution: tuple[int, int] = (384, 512)

    @property
    def window_len(self) -> int:
        return self.offline_window if self.offline else self.online_window

    @property
    def patch(self) -> int:
        return 2 * self.corr_radius + 1

    @property
    def input_dim(self) -> int:
        """Token width (1110): visibility, confidence, correlations of every level, displacement embedding."""
        return 2 + self.corr_levels * self.corr_dim + 4 * (1 + 2 * self.posenc_degrees)

    def validate(self) -> None:
        problems = []
        if self.online_window < 2 or self.offline_window < 1:
            problems.append(f"windows ({self.online_window}, {self.offline_window}) must be at least (2, 1)")
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.latent_dim % 4:
            problems.append(f"latent_dim={self.latent_dim} must be a multiple of 4")
        if self.input_dim % 2:
            problems.append(f"input_dim={self.input_dim} must be even (sin-cos time embedding)")
        if self.space_depth and self.time_depth % self.space_depth:
            problems.append(f"time_depth={self.time_depth} must be a multiple of space_depth={self.space_depth}")
        if self.corr_levels < 1 or self.corr_radius < 0:
            problems.append(f"corr_levels={self.corr_levels} and corr_radius={self.corr_radius} must be >= 1, >= 0")
        h, w = self.model_resolution
        if h % self.stride or w % self.stride:
            problems.append(f"model_resolution={self.model_resolution} must be divisible by stride {self.stride}")
        if problems:
            raise ConfigError("invalid CoTracker3Config: " + "; ".join(problems))


def default_config(offline: bool = False) -> CoTracker3Config:
    """The published architecture (CoTrackerThreeOnline/Offline with linear_layer_for_vis_conf=True)."""
    return CoTracker3Config(offline=offline)


TINY = CoTracker3Config(
    online_window=8,
    offline_window=24,
    latent_dim=32,
    corr_radius=2,
    corr_levels=3,
    corr_hidden=64,
    corr_dim=32,
    hidden_size=64,
    num_heads=4,
    time_depth=2,
    space_depth=1,
    num_virtual_tracks=8,
    posenc_degrees=4,
    model_resolution=(64, 96),
)


def tiny_config(offline: bool = False) -> CoTracker3Config:
    """A few-hundred-thousand-parameter CoTracker3 at 64x96 for CPU tests; same code paths as the real one."""
    return replace(TINY, offline=offline)


def with_variant(cfg: CoTracker3Config, offline: bool) -> CoTracker3Config:
    """The same sizes run as the other variant (its own time-embedding length)."""
    return replace(cfg, offline=offline)


def config_from_dict(values: dict) -> CoTracker3Config:
    """A config from JSON (lists back to tuples); unknown keys are refused by name."""
    known = {f.name for f in fields(CoTracker3Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown CoTracker3Config keys {unknown}; known keys: {sorted(known)}")
    return CoTracker3Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclass(frozen=True)
class Chunks:
    """How much work goes through memory at once; results do not depend on it.

    frames:     frames per encoder call
    corr_pairs: (frame, track) pairs per correlation-and-embedding call
    tokens:     tokens per transformer block call
    None means all at once.
    """

    frames: int | None = None
    corr_pairs: int | None = None
    tokens: int | None = None


# ---------------------------------------------------------------- outputs and online state


@dataclass
class WindowIterates:
    """Every refinement step of one window, for the training loss.

    start:       first clip frame the window covers; it covers `tracks[k].shape[1]` frames
    tracks:      K tensors [B, S, N, 2] (x, y) pixels of the input video, first to last step
    visibility:  K tensors [B, S, N] probabilities
    confidence:  K tensors [B, S, N] probabilities
    """

    start: int
    tracks: list[torch.Tensor]
    visibility: list[torch.Tensor]
    confidence: list[torch.Tensor]


@dataclass
class RefineSteps:
    """What `refine` returns: per step, tracks [B, S, N, 2] input pixels and LOGITS [B, S, N]."""

    tracks: list[torch.Tensor]
    vis_logits: list[torch.Tensor]
    conf_logits: list[torch.Tensor]


@dataclass
class TrackerOutput:
    """tracks [B, T, N, 2] pixels; visibility, confidence [B, T, N] probabilities; windows in clip order."""

    tracks: torch.Tensor
    visibility: torch.Tensor
    confidence: torch.Tensor
    windows: list[WindowIterates]


@dataclass
class OnlineState:
    """What one online window hands the next; `online_step` returns a new one and never edits it.

    queries:  [B, N, 3] (t, x, y) pixels of the input video, fixed for the whole stream
    start:    first frame of the next window
    support:  per pyramid level, [B, N, P*P, C] patch features around each query,
              zero until the query's frame has been seen
    tracks:   [B, F, N, 2] pixels for the F frames seen so far
    vis_logits, conf_logits: [B, F, N]
    """

    queries: torch.Tensor
    start: int = 0
    support: list[torch.Tensor] | None = None
    tracks: torch.Tensor | None = None
    vis_logits: torch.Tensor | None = None
    conf_logits: torch.Tensor | None = None

    @property
    def frames_seen(self) -> int:
        return 0 if self.tracks is None else self.tracks.shape[1]

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tracks [B, F, N, 2], visibility and confidence probabilities [B, F, N] for the frames seen."""
        if self.tracks is None or self.vis_logits is None or self.conf_logits is None:
            raise ValueError("the online state has seen no frames yet: call online_step with a chunk first")
        return self.tracks, torch.sigmoid(self.vis_logits), torch.sigmoid(self.conf_logits)


def window_starts(num_frames: int, window: int) -> list[int]:
    """First frames of the online windows over a clip: every window//2 frames while frames remain unseen.

    `range(0, T - step, step)` is the authors' schedule; a clip of at most one
    step gets a single (padded) window instead of none.
    """
    step = window // 2
    return list(range(0, num_frames - step, step)) or [0]


def _pad_frames(video: torch.Tensor, length: int) -> torch.Tensor:
    """Repeat the last frame of [B, T, ...] until it has `length` frames."""
    missing = length - video.shape[1]
    if missing <= 0:
        return video
    return torch.cat([video, video[:, -1:].expand(-1, missing, *video.shape[2:])], dim=1)


# ---------------------------------------------------------------- the network


class CoTracker3(nn.Module):
    """CoTracker3's network; see the module docstring for the two ways of running it."""

    VIS_CONF_HEAD = "updateformer.vis_conf_head"

    def __init__(self, cfg: CoTracker3Config | None = None):
        super().__init__()
        cfg = cfg or CoTracker3Config()
        cfg.validate()
        self.cfg = cfg
        self.fnet = FeatureEncoder(cfg.latent_dim, cfg.stride)
        self.updateformer = UpdateTransformer(
            input_dim=cfg.input_dim,
            hidden_size=cfg.hidden_size,
            flow_dim=2,
            num_heads=cfg.num_heads,
            time_depth=cfg.time_depth,
            space_depth=cfg.space_depth,
            mlp_ratio=cfg.mlp_ratio,
            num_virtual_tracks=cfg.num_virtual_tracks,
            vis_conf_dim=2,
        )
        self.corr_mlp = Mlp(cfg.patch**4, cfg.corr_hidden, cfg.corr_dim)
        positions = torch.arange(cfg.window_len, dtype=torch.float32)
        self.register_buffer("time_emb", sincos_1d(cfg.input_dim, positions))
        self._init_weights()

    def _init_weights(self) -> None:
        """Random init for tests and from-scratch students; near-zero heads keep the first updates small."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        for head in (self.updateformer.flow_head, self.updateformer.vis_conf_head):
            nn.init.trunc_normal_(head.weight, std=0.001)

    # -------------------------------------------------------- named steps

    def encode(self, video: torch.Tensor, frame_chunk: int | None = None) -> torch.Tensor:
        """Unit-length feature vectors per pixel of the stride-`stride` map.

        video [B, T, 3, H, W] float 0..255 -> [B, T, C, H / stride, W / stride] float32
        """
        b, t, _, h, w = video.shape
        s = self.cfg.stride
        if h % s or w % s:
            raise ValueError(f"video frames {h}x{w} must be divisible by the stride {s}: resize them first")
        flat = video.reshape(b * t, 3, h, w)
        step = frame_chunk or b * t
        feats = torch.cat([self.fnet(2 * (flat[i : i + step] / 255.0) - 1) for i in range(0, b * t, step)])
        feats = feats.float()
        feats = feats / feats.square().sum(dim=1, keepdim=True).clamp_min(1e-12).sqrt()
        return feats.reshape(b, t, *feats.shape[1:])

    def pyramid(self, fmaps: torch.Tensor) -> list[torch.Tensor]:
        """[B, T, C, h, w] -> `corr_levels` maps [B, T, C, h / 2^i, w / 2^i] (2x2 average pooling)."""
        return feature_pyramid(fmaps, self.cfg.corr_levels)

    def query_support(
        self, pyramid: list[torch.Tensor], frames: torch.Tensor, coords: torch.Tensor
    ) -> list[torch.Tensor]:
        """Patches of features around each query, one per level.

        pyramid levels [B, S, C, h, w]; frames [B, N] indices into S (clamped);
        coords [B, N, 2] level-0 feature pixels -> per level [B, N, P*P, C]
        """
        offsets = _patch_offsets3(self.cfg.corr_radius, coords.device)  # P*P 3
        support = []
        for i, level in enumerate(pyramid):
            centers = torch.cat([frames[..., None].to(coords.dtype), coords / 2**i], dim=-1)  # B N 3
            points = centers.float()[:, :, None] + offsets  # B N P*P 3
            support.append(sample_video(level, points))
        return support

    def _tokens(
        self,
        pyramid: list[torch.Tensor],
        coords: torch.Tensor,
        support: list[torch.Tensor],
        vis: torch.Tensor,
        conf: torch.Tensor,
        time_emb: torch.Tensor,
    ) -> torch.Tensor:
        """Embedded transformer tokens for a group of tracks.

        pyramid levels [B, S, C, h, w]; coords [B, S, n, 2] level-0 feature pixels;
        support levels [B, n, P*P, C]; vis, conf [B, S, n] logits; time_emb [1, S, D]
        -> [B, n, S, hidden]
        """
        cfg = self.cfg
        b, s, n, _ = coords.shape
        pp = cfg.patch**2
        offsets = patch_offsets(cfg.corr_radius, coords.device).reshape(1, 1, pp, 2)
        corrs = []
        for i, level in enumerate(pyramid):
            c = level.shape[2]
            points = (coords.reshape(b * s, n, 1, 2) / 2**i).float() + offsets  # (B S) n P*P 2
            around = bilinear_sample(level.reshape(b * s, c, *level.shape[-2:]), points)  # (B S) C n P*P
            # Rows of one track, all frames, against that track's support patch: one copy of the samples
            # and one large matmul per track. (A broadcast matmul per frame would copy the samples and,
            # S times over, the support patches, into B*S*n tiny products.)
            around = around.reshape(b, s, c, n, pp).permute(0, 3, 1, 4, 2).reshape(b, n, s * pp, c)
            volume = around @ support[i].transpose(-1, -2)  # B n (S P*P) P*P
            corrs.append(self.corr_mlp(volume.reshape(b, n, s, pp * pp)))  # B n S corr_dim
        step = device_constant(
            (cfg.model_resolution[1] / cfg.stride, cfg.model_resolution[0] / cfg.stride), coords.device
        )
        to_next = F.pad(coords[:, :-1] - coords[:, 1:], (0, 0, 0, 0, 0, 1)) / step
        to_prev = F.pad(coords[:, 1:] - coords[:, :-1], (0, 0, 0, 0, 1, 0)) / step
        motion = posenc(torch.cat([to_next, to_prev], dim=-1), 0, cfg.posenc_degrees)
        small = torch.cat([vis[..., None], conf[..., None], motion], dim=-1).permute(0, 2, 1, 3)  # B n S 2+M
        x = torch.cat([small[..., :2], *corrs, small[..., 2:]], dim=-1) + time_emb  # B n S D
        return self.updateformer.embed(x)

    def refine(
        self,
        pyramid: list[torch.Tensor],
        coords: torch.Tensor,
        support: list[torch.Tensor],
        vis: torch.Tensor,
        conf: torch.Tensor,
        iters: int,
        chunks: Chunks = Chunks(),
    ) -> RefineSteps:
        """`iters` updates of tracks, visibility and confidence over one window (or a whole offline clip).

        pyramid levels [B, S, C, h, w]; coords [B, S, N, 2] level-0 feature pixels;
        support levels [B, N, P*P, C]; vis, conf [B, S, N] logits
        -> per step: tracks [B, S, N, 2] input pixels, visibility and confidence logits [B, S, N]
        """
        b, s, n, _ = coords.shape
        time_emb = interpolate_time_embedding(self.time_emb, s)
        per_call = n if chunks.corr_pairs is None else max(1, chunks.corr_pairs // max(1, b * s))
        out = RefineSteps([], [], [])
        for _ in range(iters):
            coords = coords.detach()  # gradients flow through one update at a time, as the authors train
            tokens = torch.cat(
                [
                    self._tokens(
                        pyramid,
                        coords[:, :, j : j + per_call],
                        [level[:, j : j + per_call] for level in support],
                        vis[:, :, j : j + per_call],
                        conf[:, :, j : j + per_call],
                        time_emb,
                    )
                    for j in range(0, n, per_call)
                ],
                dim=1,
            )
            delta = self.updateformer.heads(self.updateformer.mix(tokens, max_tokens=chunks.tokens))
            delta = delta.permute(0, 2, 1, 3).float()  # B S N 4
            coords = coords + delta[..., :2]
            vis = vis + delta[..., 2]
            conf = conf + delta[..., 3]
            out.tracks.append(coords * float(self.cfg.stride))
            out.vis_logits.append(vis)
            out.conf_logits.append(conf)
        return out

    # -------------------------------------------------------- offline

    def forward_offline(
        self, video: torch.Tensor, queries: torch.Tensor, iters: int = 4, chunks: Chunks = Chunks()
    ) -> TrackerOutput:
        """The whole clip at once.

        video [B, T, 3, H, W] float 0..255; queries [B, N, 3] (t, x, y) pixels of the video
        -> TrackerOutput over T frames, one window starting at 0
        """
        b, t = video.shape[:2]
        n = queries.shape[1]
        pyramid = self.pyramid(self.encode(video, chunks.frames))
        frames = queries[..., 0].long()
        query_xy = queries[..., 1:3] / self.cfg.stride
        support = self.query_support(pyramid, frames, query_xy)
        coords = query_xy[:, None].expand(b, t, n, 2).float()
        zeros = torch.zeros((b, t, n), device=video.device)
        it = self.refine(pyramid, coords, support, zeros, zeros, iters, chunks)
        window = WindowIterates(
            0,
            it.tracks,
            [torch.sigmoid(v) for v in it.vis_logits],
            [torch.sigmoid(c) for c in it.conf_logits],
        )
        return TrackerOutput(it.tracks[-1], window.visibility[-1], window.confidence[-1], [window])

    # -------------------------------------------------------- online

    def init_online(self, queries: torch.Tensor) -> OnlineState:
        """The state before the first window; queries [B, N, 3] (t, x, y) pixels of the stream."""
        if queries.ndim != 3 or queries.shape[-1] != 3:
            raise ValueError(f"queries must be [B, N, 3] (t, x, y), got shape {tuple(queries.shape)}")
        return OnlineState(queries=queries)

    def online_step(
        self, state: OnlineState, chunk: torch.Tensor, iters: int = 4, chunks: Chunks = Chunks()
    ) -> tuple[OnlineState, WindowIterates]:
        """Track through the next window: frames [state.start, state.start + len(chunk)) of the stream.

        chunk [B, S', 3, H, W] float 0..255 with S' <= window_len (a short chunk,
        normally the stream's last, is padded by repeating its last frame)
        -> the next state and this window's refinement steps
        """
        s = self.cfg.window_len
        tc = chunk.shape[1]
        if not 1 <= tc <= s:
            raise ValueError(f"an online chunk holds 1..{s} frames (the window), got {tc}")
        pyramid = self.pyramid(self.encode(_pad_frames(chunk, s), chunks.frames))
        return self._window(state, pyramid, tc, iters, chunks)

    def forward_windowed(
        self, video: torch.Tensor, queries: torch.Tensor, iters: int = 4, chunks: Chunks = Chunks()
    ) -> TrackerOutput:
        """The online model over a whole clip, window after window, each frame encoded once.

        video [B, T, 3, H, W] float 0..255; queries [B, N, 3] -> TrackerOutput over T frames
        """
        s = self.cfg.window_len
        t = video.shape[1]
        starts = window_starts(t, s)
        pyramid = self.pyramid(self.encode(_pad_frames(video, starts[-1] + s), chunks.frames))
        state = self.init_online(queries)
        windows = []
        for ind in starts:
            state, window = self._window(
                state, [lvl[:, ind : ind + s] for lvl in pyramid], min(s, t - ind), iters, chunks
            )
            windows.append(window)
        tracks, vis, conf = state.outputs()
        return TrackerOutput(tracks, vis, conf, windows)

    def _window(
        self, state: OnlineState, pyramid: list[torch.Tensor], tc: int, iters: int, chunks: Chunks
    ) -> tuple[OnlineState, WindowIterates]:
        """One online window given its feature pyramid; the first `tc` of its frames are real.

        pyramid levels [B, S, C, h, w] -> the next state and this window's refinement steps
        """
        cfg = self.cfg
        s = cfg.window_len
        step = s // 2
        overlap = s - step
        ind = state.start
        seen = state.frames_seen
        if ind > seen:
            raise ValueError(f"online window at frame {ind} but only {seen} frames were seen: feed chunks in order")
        queries = state.queries
        b, n = queries.shape[:2]
        device = queries.device
        frames = queries[..., 0].long()
        query_xy = queries[..., 1:3] / cfg.stride

        # patches around queries whose frame this window shows for the first time
        fresh = ((frames >= seen) & (frames < ind + s))[..., None, None]
        sampled = self.query_support(pyramid, (frames - ind).clamp(0, s - 1), query_xy)
        old = state.support or [torch.zeros_like(level) for level in sampled]
        support = [prev + now * fresh for prev, now in zip(old, sampled, strict=True)]

        coords = query_xy[:, None].expand(b, s, n, 2).float()
        vis = torch.zeros((b, s, n), device=device)
        conf = torch.zeros((b, s, n), device=device)
        if ind > 0:
            # tracks that started before the shared frames continue from the previous answer
            carry = (frames < ind + overlap)[:, None]  # B 1 N
            assert state.tracks is not None and state.vis_logits is not None and state.conf_logits is not None
            coords = torch.where(
                carry[..., None], _pad_frames(state.tracks[:, ind : ind + overlap], s) / cfg.stride, coords
            )
            vis = torch.where(carry, _pad_frames(state.vis_logits[:, ind : ind + overlap], s), vis)
            conf = torch.where(carry, _pad_frames(state.conf_logits[:, ind : ind + overlap], s), conf)
        started = (frames < ind + s)[..., None, None]
        it = self.refine(pyramid, coords, [level * started for level in support], vis, conf, iters, chunks)

        def splice(old_value: torch.Tensor | None, new_value: torch.Tensor) -> torch.Tensor:
            new_value = new_value[:, :tc]
            if old_value is None:
                return new_value
            return torch.cat([old_value[:, :ind], new_value, old_value[:, ind + tc :]], dim=1)

        next_state = OnlineState(
            queries=queries,
            start=ind + step,
            support=support,
            tracks=splice(state.tracks, it.tracks[-1]),
            vis_logits=splice(state.vis_logits, it.vis_logits[-1]),
            conf_logits=splice(state.conf_logits, it.conf_logits[-1]),
        )
        window = WindowIterates(
            ind,
            [c[:, :tc] for c in it.tracks],
            [torch.sigmoid(v[:, :tc]) for v in it.vis_logits],
            [torch.sigmoid(c[:, :tc]) for c in it.conf_logits],
        )
        return next_state, window

    def forward(
        self, video: torch.Tensor, queries: torch.Tensor, iters: int = 4, chunks: Chunks = Chunks()
    ) -> TrackerOutput:
        """Offline or sliding-window run, as `cfg.offline` says.

        video [B, T, 3, H, W] float 0..255; queries [B, N, 3] (t, x, y) -> TrackerOutput over T frames
        """
        if self.cfg.offline:
            return self.forward_offline(video, queries, iters, chunks)
        return self.forward_windowed(video, queries, iters, chunks)


def _patch_offsets3(radius: int, device: torch.device) -> torch.Tensor:
    """[P*P, 3] (0, dx, dy): `patch_offsets` with a zero time step, for sampling at (t, x, y)."""
    xy = patch_offsets(radius, device).reshape(-1, 2)
    return torch.cat([torch.zeros_like(xy[:, :1]), xy], dim=1)


def train_forward(
    net: CoTracker3, video: torch.Tensor, queries: torch.Tensor, iters: int = 4, online: bool = True
) -> list[tuple[int, list[torch.Tensor]]]:
    """Per-window, per-step track estimates for the training loss (run with gradients enabled).

    video [B, T, 3, H, W] float 0..255 at the model resolution; queries [B, N, 3] (t, x, y)
    -> [(first frame of the window, K tensors [B, S, N, 2] pixels)], S the frames the window covers.
    Use `net.forward_windowed` / `net.forward_offline` directly for visibility and confidence too.
    """
    out = net.forward_windowed(video, queries, iters) if online else net.forward_offline(video, queries, iters)
    return [(w.start, w.tracks) for w in out.windows]


# ---------------------------------------------------------------- loading


def checkpoint_filter(
    state: dict[str, torch.Tensor], cfg: CoTracker3Config, path: str | Path
) -> dict[str, torch.Tensor]:
    """The official files' keys are this module's own; only a file of the other variant is refused here,
    with the teacher name to use instead (its time embedding has the other length)."""
    emb = state.get("time_emb")
    if emb is not None and emb.ndim == 3 and emb.shape[2] == cfg.input_dim and emb.shape[1] != cfg.window_len:
        variant = "offline" if cfg.offline else "online"
        other = "online" if cfg.offline else "offline"
        raise CheckpointError(
            f"checkpoint {path} has a time embedding of {emb.shape[1]} frames but the {variant} "
            f"CoTracker3 uses {cfg.window_len}: it looks like a {other} file; use teacher "
            f"cotracker3_{other} (or a config with {variant}_window={emb.shape[1]})"
        )
    return state


def model_label(cfg: CoTracker3Config) -> str:
    return f"CoTracker3 {'offline' if cfg.offline else 'online'}"


def load_cotracker3(
    path: str | Path, config: CoTracker3Config | None = None, device: str | torch.device = "cpu"
) -> CoTracker3:
    """Build a CoTracker3 for `config` (the published online one by default) and load `path` strictly."""
    cfg = config or default_config()
    model = CoTracker3(cfg)
    load_into(model, path, filter_fn=lambda state: checkpoint_filter(state, cfg, path), model_name=model_label(cfg))
    return model.to(device).eval()


def student_config(path: str | Path) -> CoTracker3Config | None:
    """The config a pseudotrack student export records beside its weights (`<file>.json`); None otherwise."""
    sidecar = Path(str(path) + ".json")
    if not sidecar.is_file():
        return None
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"student sidecar {sidecar} cannot be read ({exc}): export the student again") from exc
    if not str(meta.get("format", "")).startswith(STUDENT_FORMAT_PREFIX):
        return None
    try:
        return config_from_dict(meta["model"]["config"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"student sidecar {sidecar} has no model config: export the student again") from exc
