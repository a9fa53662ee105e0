"""TAPIR and BootsTAPIR (Doersch et al., 2023, 2024): the network and official-file loading (unmodified files).

One model serves both: BootsTAPIR is TAPIR with a one-level coarser
correlation pyramid (`pyramid_level=1`) and five extra residual convs on the
low-resolution features (`extra_convs=True`). The module tree gives exactly the
keys of `tapir_checkpoint_panning.pt` and `bootstapir_checkpoint_v2.pt`.

The forward is split into the method's steps: encode frames (ResNet, feature
maps at strides 4 and 8), sample query features, an initial estimate from each
query's cost volume, then `num_pips_iter` refinements per refinement
resolution. Queries are independent of each other, so they run in chunks; this
bounds memory and does not change the result.

The teacher around it is in `teacher.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointError, ConfigError
from ..checkpoints import load_into
from .blocks import (
    CostVolumeHead,
    ExtraConvs,
    Mixer,
    ResNet,
    rescale,
    sample_at_queries,
    sample_neighbourhoods,
    soft_argmax,
    unit_norm,
)


@dataclass(frozen=True)
class TapirConfig:
    """Sizes of a TAPIR; the defaults are the published TAPIR (`tapir_checkpoint_panning.pt`).

    channels:          ResNet widths per block group; [1] is the stride-4 ("hires")
                       and [3] the stride-8 ("lowres") feature width
    pyramid_level:     extra 2x-pooled copies of the lowres map correlated in refinement
    corr_radius:       refinement correlates a (2r + 1)^2 patch around each estimate
    initial_resolution: (H, W) of the initial cost-volume estimate (the training size)
    """

    pyramid_level: int = 0
    extra_convs: bool = False
    num_pips_iter: int = 4
    initial_resolution: tuple[int, int] = (256, 256)
    channels: tuple[int, int, int, int] = (64, 128, 256, 256)
    blocks_per_group: tuple[int, int, int, int] = (2, 2, 2, 2)
    mixer_hidden: int = 512
    mixer_blocks: int = 12
    mixer_kernel: int = 3
    extra_conv_layers: int = 5
    extra_conv_multiplier: int = 4
    corr_radius: int = 3
    softmax_temperature: float = 20.0
    soft_argmax_radius: float = 5.0

    @property
    def hires_dim(self) -> int:
        return self.channels[1]

    @property
    def lowres_dim(self) -> int:
        return self.channels[3]

    @property
    def mixer_out_dim(self) -> int:
        """Position (2), occlusion and expected-distance updates (2), then the track's feature update."""
        return 4 + self.hires_dim + self.lowres_dim

    @property
    def mixer_in_dim(self) -> int:
        """Mixer input: 486 for TAPIR, 535 for BootsTAPIR (one more 7x7 correlation patch)."""
        return self.mixer_out_dim + (self.pyramid_level + 2) * (2 * self.corr_radius + 1) ** 2

    def validate(self) -> None:
        problems = []
        h, w = self.initial_resolution
        if h % 8 or w % 8 or h <= 0 or w <= 0:
            problems.append(f"initial_resolution={self.initial_resolution} must be positive multiples of 8")
        if self.num_pips_iter < 1:
            problems.append(f"num_pips_iter={self.num_pips_iter} must be at least 1")
        if self.pyramid_level < 0:
            problems.append(f"pyramid_level={self.pyramid_level} must be 0 or more")
        if self.mixer_kernel % 2 == 0:
            problems.append(f"mixer_kernel={self.mixer_kernel} must be odd")
        if problems:
            raise ConfigError("invalid TapirConfig: " + "; ".join(problems))


TAPIR_CONFIG = TapirConfig()
BOOTSTAPIR_CONFIG = TapirConfig(pyramid_level=1, extra_convs=True)

# keyed by "has extra convs": the official file of each variant, and the teacher that takes it
OFFICIAL_FILE = {False: "tapir_checkpoint_panning.pt", True: "bootstapir_checkpoint_v2.pt"}
OTHER_TEACHER = {
    False: "tapir (tapir_checkpoint_panning.pt)",
    True: "bootstapir (bootstapir_checkpoint_v2.pt)",
}


def refinement_resolutions(video_hw: tuple[int, int], train_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Log-spaced (H, W) sizes from the training size up to the video size, multiples of 8.

    The authors' default: each refinement resolution is at most about twice the
    previous one; a video no larger than the training size is refined at the
    training size only.
    """
    if tuple(video_hw) == tuple(train_hw):
        return [tuple(train_hw)]
    ratio = np.array(video_hw, dtype=np.float64) / np.array(train_hw, dtype=np.float64)
    levels = int(np.ceil(np.max(np.log2(ratio))) + 1)
    if levels <= 1:
        return [tuple(train_hw)]
    (h, w), (th, tw) = video_hw, train_hw
    sizes = []
    for i in range(levels):
        frac = i / (levels - 1)
        side_h = int(round((th * (h / th) ** frac) // 8)) * 8
        side_w = int(round((tw * (w / tw) ** frac) // 8)) * 8
        sizes.append((side_h, side_w))
    return sizes


@dataclass
class FeatureGrids:
    """Unit-norm feature maps per resolution: index 0 for the initial estimate, then one per refinement level.

    hires [B, T, H/4, W/4, C1], lowres [B, T, H/8, W/8, C3]; sizes are the (H, W) the video was resized to.
    Equal resolutions share tensors.
    """

    hires: list[torch.Tensor]
    lowres: list[torch.Tensor]
    sizes: list[tuple[int, int]]


class Tapir(nn.Module):
    """TAPIR / BootsTAPIR, with the official attribute names (`resnet_torch`, `torch_pips_mixer`, ...)."""

    def __init__(self, cfg: TapirConfig = TAPIR_CONFIG):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.resnet_torch = ResNet(cfg.channels, cfg.blocks_per_group)
        self.torch_cost_volume_track_mods = CostVolumeHead()
        self.torch_pips_mixer = Mixer(
            cfg.mixer_in_dim, cfg.mixer_out_dim, cfg.mixer_hidden, cfg.mixer_blocks, cfg.mixer_kernel
        )
        if cfg.extra_convs:
            self.extra_convs = ExtraConvs(cfg.lowres_dim, cfg.extra_conv_layers, cfg.extra_conv_multiplier)
        else:
            self.extra_convs = None
        r = cfg.corr_radius
        dy, dx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
        self.register_buffer("patch_offsets", torch.stack([dy, dx], -1).reshape(-1, 2), persistent=False)

    # ------------------------------------------------------------ features

    def encode(self, video: torch.Tensor, frame_chunk: int = 10) -> FeatureGrids:
        """video [B, T, H, W, 3] in [-1, 1] -> feature maps at the initial and each refinement resolution."""
        b, t, h, w, _ = video.shape
        wanted = [tuple(self.cfg.initial_resolution)]
        wanted += refinement_resolutions((h, w), self.cfg.initial_resolution)
        grids = FeatureGrids([], [], [])
        for size in wanted:
            if size[0] % 8 or size[1] % 8:
                raise ValueError(f"TAPIR resolution {size} must be a multiple of 8 in both sides")
            if not grids.sizes or grids.sizes[-1] != size:
                hires, lowres = self._encode_at(video, size, frame_chunk)
            grids.hires.append(hires)
            grids.lowres.append(lowres)
            grids.sizes.append(size)
        return grids

    def _encode_at(
        self, video: torch.Tensor, size: tuple[int, int], frame_chunk: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, h, w, c = video.shape
        if (h, w) != size:  # all frames and channels at once, bilinear, as the original resizes
            planes = video.permute(0, 1, 4, 2, 3).reshape(b, t * c, h, w)
            planes = F.interpolate(planes, size=size, mode="bilinear", align_corners=False)
            video = planes.reshape(b, t, c, *size).permute(0, 1, 3, 4, 2)
        frames = video.reshape(b * t, *size, c).permute(0, 3, 1, 2)
        chunk = frame_chunk if frame_chunk > 0 else len(frames)
        hires, lowres = [], []
        for start in range(0, len(frames), chunk):
            hi, lo = self.resnet_torch(frames[start : start + chunk])
            hires.append(hi.permute(0, 2, 3, 1))
            lowres.append(lo.permute(0, 2, 3, 1))
        hi, lo = torch.cat(hires), torch.cat(lowres)
        if self.extra_convs is not None:
            lo = self.extra_convs(lo)
        hi, lo = unit_norm(hi.float()), unit_norm(lo.float())  # float32 maps, whatever autocast did
        return hi.reshape(b, t, *hi.shape[1:]), lo.reshape(b, t, *lo.shape[1:])

    def query_features(
        self, grids: FeatureGrids, queries: torch.Tensor, video_thw: tuple[int, int, int]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """queries [B, N, 3] (t, y, x) video pixels -> per resolution (hires [B, N, C1], lowres [B, N, C3]).

        Query features are sampled from the video itself, at each query's own frame.
        """
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, (hi, lo) in enumerate(zip(grids.hires, grids.lowres, strict=True)):
            if i and hi is grids.hires[i - 1]:
                out.append(out[-1])
                continue
            out.append(
                (
                    sample_at_queries(hi, rescale(queries, video_thw, hi.shape[1:4])),
                    sample_at_queries(lo, rescale(queries, video_thw, lo.shape[1:4])),
                )
            )
        return out

    # ------------------------------------------------------------ tracking

    def initial_estimate(
        self, query_feats: torch.Tensor, grid: torch.Tensor, queries: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Global matching: each query against every position of every frame.

        query_feats [B, N, C3]; grid [B, T, h, w, C3]; queries [B, N, 3] (t, y, x) at the initial resolution
        -> points [B, N, T, 2] (x, y) at the initial resolution, occlusion and expected_dist [B, N, T] logits.
        At each query's own frame the point is the query itself.
        """
        cfg = self.cfg
        cost = torch.einsum("bnc,bthwc->tbnhw", query_feats, grid)
        t, b, n, h, w = cost.shape
        pos, logits = self.torch_cost_volume_track_mods.run(cost.reshape(t * b * n, 1, h, w))
        pos = pos.reshape(t, b, n, h, w).permute(1, 2, 0, 3, 4)
        heat = F.softmax(pos.reshape(b, n, t, h * w) * cfg.softmax_temperature, dim=-1).view(b, n, t, h, w)
        full_hw = cfg.initial_resolution
        points = rescale(soft_argmax(heat, cfg.soft_argmax_radius), (w, h), full_hw[::-1])
        frame = torch.round(rescale(queries, (t, *full_hw), (t, h, w))[..., 0:1])
        is_query = (frame == torch.arange(t, device=queries.device)[None, None, :])[..., None]
        points = points * ~is_query + torch.flip(queries[:, :, None], dims=(-1,))[..., 0:2] * is_query
        logits = logits.float().reshape(t, b, n, 2).permute(1, 2, 0, 3)
        return points, logits[..., 0], logits[..., 1]

    def refine(
        self,
        points: torch.Tensor,
        occlusion: torch.Tensor,
        expected_dist: torch.Tensor,
        queries: list[torch.Tensor],
        pyramid: list[torch.Tensor],
        state: torch.Tensor | None,
        level_hw: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One PIPs-style update from local correlations around the current estimate.

        points [B, N, T, 2] (x, y) at the initial resolution; occlusion, expected_dist [B, N, T];
        queries: hires [B, N, C1] then lowres [B, N, C3] per pyramid map; pyramid: [B, T, h_i, w_i, C] maps;
        state None (first update of a level) or [B, N, T, C1 + C3], the track features of the last update.
        -> updated (points, occlusion, expected_dist, state).
        """
        cfg = self.cfg
        full_hw = cfg.initial_resolution
        corrs = []
        for i, (query, grid) in enumerate(zip(queries, pyramid, strict=True)):
            centre = torch.flip(rescale(points, full_hw[::-1], (grid.shape[3], grid.shape[2])), dims=(-1,))
            patch = sample_neighbourhoods(grid, centre.unsqueeze(3) + self.patch_offsets[None, None, None])
            if state is None:
                corrs.append(torch.einsum("bnfsc,bnc->bnfs", patch, query))
            else:
                own = state[..., : cfg.hires_dim] if i == 0 else state[..., cfg.hires_dim :]
                corrs.append(torch.einsum("bnfsc,bnfc->bnfs", patch, own))
        if state is None:
            both = torch.cat([queries[0], queries[1]], dim=-1)
            state = torch.tile(both.unsqueeze(2), (1, 1, points.shape[2], 1))
        # the position enters as zeros: the mixer sees only correlations relative to the estimate
        guesses = [torch.zeros_like(points), occlusion[..., None], expected_dist[..., None]]
        mixer_in = torch.cat([*guesses, state, torch.cat(corrs, -1)], dim=-1)
        b, n, t, _ = mixer_in.shape
        res = self.torch_pips_mixer(mixer_in.reshape(b * n, t, -1).float()).float().reshape(b, n, t, -1)
        step = rescale(res[..., :2], level_hw[::-1], full_hw[::-1])
        return step + points, res[..., 2] + occlusion, res[..., 3] + expected_dist, res[..., 4:] + state

    def track(
        self,
        grids: FeatureGrids,
        feats: list[tuple[torch.Tensor, torch.Tensor]],
        queries: torch.Tensor,
        video_hw: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tracks for one chunk of queries; the result averages the last update of each refinement level.

        feats: this chunk's query features per resolution; queries [B, N, 3] (t, y, x) video pixels
        -> tracks [B, N, T, 2] (x, y) video pixels, occlusion and expected_dist [B, N, T] logits.
        """
        cfg = self.cfg
        t = grids.lowres[0].shape[1]
        full_hw = cfg.initial_resolution
        at_full = rescale(queries, (t, *video_hw), (t, *full_hw))
        points, occ0, expd0 = self.initial_estimate(feats[0][1], grids.lowres[0], at_full)
        finals: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for level in range(1, len(grids.sizes)):
            hires_q, lowres_q = feats[level]
            pyramid = [grids.hires[level], grids.lowres[level]]
            for _ in range(cfg.pyramid_level):  # pools H and W of the [B, T, H, W, C] map
                pyramid.append(F.avg_pool3d(pyramid[-1], kernel_size=(2, 2, 1), stride=(2, 2, 1)))
            level_queries = [hires_q] + [lowres_q] * (1 + cfg.pyramid_level)
            occ, expd, state = occ0, expd0, None  # each level restarts from the initial logits
            for _ in range(cfg.num_pips_iter):
                points, occ, expd, state = self.refine(
                    points, occ, expd, level_queries, pyramid, state, grids.sizes[level]
                )
            finals.append((rescale(points, full_hw[::-1], video_hw[::-1]), occ, expd))
        tracks, occ, expd = (torch.mean(torch.stack(parts), dim=0) for parts in zip(*finals, strict=True))
        return tracks, occ, expd

    def forward(
        self, video: torch.Tensor, queries: torch.Tensor, query_chunk: int = 64, frame_chunk: int = 10
    ) -> dict[str, torch.Tensor]:
        """The authors' call: video [B, T, H, W, 3] in [-1, 1], queries [B, N, 3] (t, y, x) video pixels.

        -> tracks [B, N, T, 2] (x, y) video pixels; occlusion, expected_dist [B, N, T] logits
           (higher = more likely occluded / more likely far from the truth).
        """
        b, t, h, w, _ = video.shape
        queries = queries.float()
        grids = self.encode(video, frame_chunk)
        feats = self.query_features(grids, queries, (t, h, w))
        chunk = query_chunk if query_chunk > 0 else max(1, queries.shape[1])
        parts = []
        for s in range(0, queries.shape[1], chunk):
            chunk_feats = [(hi[:, s : s + chunk], lo[:, s : s + chunk]) for hi, lo in feats]
            parts.append(self.track(grids, chunk_feats, queries[:, s : s + chunk], (h, w)))
        tracks, occ, expd = (torch.cat(p, dim=1) for p in zip(*parts, strict=True))
        return {"tracks": tracks, "occlusion": occ, "expected_dist": expd}


# ---------------------------------------------------------------- loading


def _variant(cfg: TapirConfig) -> str:
    return "BootsTAPIR-like (extra_convs)" if cfg.extra_convs else "TAPIR-like (no extra_convs)"


def checkpoint_filter(
    state: dict[str, torch.Tensor], config: TapirConfig, path: str | Path, name: str = "tapir"
) -> dict[str, torch.Tensor]:
    """The official keys are this module's own (no mapping); a file of the other variant (TAPIR into
    BootsTAPIR or back) is refused with the teacher to use, before the generic key comparison."""
    mixer = state.get("torch_pips_mixer.linear.weight")
    if mixer is None or mixer.ndim != 2:
        return state  # not a TAPIR-family file: the key comparison lists what is missing
    extra = sorted(k for k in state if k.startswith("extra_convs."))
    if bool(extra) != config.extra_convs:
        found = f"has extra_convs.* keys ({extra[0]}, ...)" if extra else "has no extra_convs.* keys"
        other = OTHER_TEACHER[bool(extra)]
        raise CheckpointError(
            f"checkpoint {path} does not fit {name}: it {found}, so it is a file of the other model; "
            f"{name} is {_variant(config)}. Use teacher {other} for this file"
        )
    if mixer.shape[1] != config.mixer_in_dim:
        raise CheckpointError(
            f"checkpoint {path} does not fit {name}: torch_pips_mixer.linear.weight has "
            f"{mixer.shape[1]} inputs, the model expects {config.mixer_in_dim} "
            f"(pyramid_level={config.pyramid_level}); it is a file of another TAPIR variant"
        )
    return state


def load_tapir(
    path: str | Path,
    config: TapirConfig = TAPIR_CONFIG,
    device: str | torch.device = "cpu",
    name: str = "tapir",
) -> Tapir:
    """An eval-mode model with the weights of `path` (official files unmodified), on `device`."""
    path = Path(path)
    model = Tapir(config)
    load_into(model, path, filter_fn=lambda state: checkpoint_filter(state, config, path, name), model_name=name)
    return model.to(device).eval()
