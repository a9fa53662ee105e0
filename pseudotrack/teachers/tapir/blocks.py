"""Building blocks of TAPIR and BootsTAPIR (Doersch et al., 2023, 2024), shared by both.

Attribute names are chosen so that the state-dict keys are exactly those of the
published PyTorch checkpoints (`resnet_torch.block_groups.0.blocks.0.bn_0.weight`,
`torch_pips_mixer.blocks.3.mlp1_up_1.bias`, ...). The numerics follow the
authors' PyTorch port operation by operation (padding amounts, the order of
sums, where a tensor is normalised), because the parity cases in
`shared/reference/{tapir,bootstapir}` compare with it to a few 1e-5.

Coordinates inside TAPIR are "raster" coordinates: pixel i covers [i, i + 1),
so its centre is at i + 0.5, and rescaling between resolutions is a plain
multiplication.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..device_constants import device_constant

# ---------------------------------------------------------------- coordinates and sampling


def rescale(coords: torch.Tensor, src: Sequence[int], dst: Sequence[int]) -> torch.Tensor:
    """Coordinates on a grid of size `src` -> the same places on a grid of size `dst`, per last axis.

    Multiply first, then divide, as the original does, so rounding matches.
    """
    dst_t = device_constant(tuple(int(s) for s in dst), coords.device)
    src_t = device_constant(tuple(int(s) for s in src), coords.device)
    return coords * dst_t / src_t


def sample_at_queries(grid: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Trilinear features at query points; the frame index is exact when it is a whole number.

    grid [B, T, h, w, C]; coords [B, N, 3] (t, y, x) in grid units  ->  [B, N, C].
    Edges are clamped (border padding).
    """
    pos = coords.float().clone()
    pos[..., 0] += 0.5  # frame t is the centre of the t-th time cell
    sizes = device_constant(tuple(int(s) for s in grid.shape[1:4]), pos.device)
    pos = torch.flip(2 * (pos / sizes) - 1, dims=(-1,))
    out = F.grid_sample(
        grid.permute(0, 4, 1, 2, 3),
        pos[:, :, None, None, :],
        mode="bilinear",
        align_corners=False,
        padding_mode="border",
    )  # B C N 1 1
    return out.squeeze(4).squeeze(3).permute(0, 2, 1)


def sample_neighbourhoods(grid: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear features around tracked points, frame by frame, zero outside the frame.

    grid [B, T, h, w, C]; coords [B, N, T, S, 2] (y, x) in grid units  ->  [B, N, T, S, C].
    Both axes are normalised by the grid height, as the authors' port does; the
    grids TAPIR samples here are square at its default resolutions.
    """
    b, t, h, w, c = grid.shape
    n, s = coords.shape[1], coords.shape[3]
    frames = grid.permute(0, 1, 4, 2, 3).reshape(b * t, c, h, w)
    pos = coords.permute(0, 2, 1, 3, 4).reshape(b * t, n, s, 2)
    pos = torch.flip(2 * (pos / h) - 1, dims=(-1,)).float()
    out = F.grid_sample(frames, pos, mode="bilinear", align_corners=False, padding_mode="zeros")  # BT C N S
    return out.permute(0, 2, 3, 1).reshape(b, t, n, s, c).permute(0, 2, 1, 3, 4)


def soft_argmax(heatmap: torch.Tensor, radius: float) -> torch.Tensor:
    """Expected (x, y) of a heatmap, restricted to a disc around its peak (robust to far false matches).

    heatmap [B, N, T, h, w] (sums to one over h, w)  ->  [B, N, T, 2] (x, y) in grid raster units.
    """
    b, n, t, h, w = heatmap.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, device=heatmap.device), torch.arange(w, device=heatmap.device), indexing="ij"
    )
    cells = torch.stack([xs + 0.5, ys + 0.5], dim=-1)  # h w 2
    peak = cells.reshape(-1, 2)[torch.argmax(heatmap.reshape(b, n, t, -1), dim=-1)]  # B N T 2
    near = torch.sum(torch.square(cells[None, None, None] - peak[:, :, :, None, None]), dim=-1, keepdim=True)
    near = near < radius**2  # B N T h w 1
    weighted = torch.sum(cells[None, None, None] * near * heatmap[..., None], dim=(3, 4))
    total = torch.sum(near * heatmap[..., None], dim=(3, 4))
    return weighted / torch.maximum(total, device_constant(1e-12, heatmap.device))


def unit_norm(x: torch.Tensor) -> torch.Tensor:
    """Scale feature vectors (last axis) to length one, so dot products are cosine similarities."""
    sq = torch.sum(torch.square(x), dim=-1, keepdim=True)
    return x / torch.sqrt(torch.maximum(sq, device_constant(1e-12, x.device)))


# ---------------------------------------------------------------- ResNet backbone


class ResidualBlock(nn.Module):
    """Pre-activation residual block with instance norm (the JAX original's "SAME" padding emulated)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int, use_projection: bool):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"ResidualBlock stride must be 1 or 2, got {stride}")
        # JAX pads "SAME" asymmetrically for stride 2; extra zeros on the right/bottom reproduce it
        self.padding = (1, 1, 1, 1) if stride == 1 else (0, 2, 0, 2)
        if use_projection:
            self.proj_conv = nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False)
        else:
            self.proj_conv = None
        self.bn_0 = nn.InstanceNorm2d(channels_in, affine=True, track_running_stats=False)
        self.conv_0 = nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=0, bias=False)
        self.conv_1 = nn.Conv2d(channels_out, channels_out, 3, stride=1, padding=1, bias=False)
        self.bn_1 = nn.InstanceNorm2d(channels_out, affine=True, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [F, C_in, H, W] -> [F, C_out, H / stride, W / stride]."""
        shortcut = x
        x = torch.relu(self.bn_0(x))
        if self.proj_conv is not None:
            shortcut = self.proj_conv(x)  # the projection sees the normalised input
        x = self.conv_0(F.pad(x, self.padding))
        x = self.conv_1(torch.relu(self.bn_1(x)))
        return x + shortcut


class BlockGroup(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, num_blocks: int, stride: int, use_projection: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResidualBlock(
                channels_in if i == 0 else channels_out,
                channels_out,
                stride if i == 0 else 1,
                use_projection and i == 0,
            )
            for i in range(num_blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class ResNet(nn.Module):
    """Frame encoder; returns the stride-4 (`hires`) and stride-8 (`lowres`) feature maps TAPIR uses."""

    strides = (1, 2, 2, 1)

    def __init__(self, channels: Sequence[int], blocks_per_group: Sequence[int]):
        super().__init__()
        self.initial_conv = nn.Conv2d(3, channels[0], 7, stride=2, padding=0, bias=False)
        self.block_groups = nn.ModuleList(
            BlockGroup(channels[i - 1] if i else channels[0], channels[i], blocks_per_group[i], stride, True)
            for i, stride in enumerate(self.strides)
        )

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frames [F, 3, H, W] in [-1, 1] -> (hires [F, C1, H/4, W/4], lowres [F, C3, H/8, W/8])."""
        x = self.initial_conv(F.pad(frames, (2, 4, 2, 4)))
        outs = []
        for group in self.block_groups:
            x = group(x)
            outs.append(x)
        return outs[1], outs[3]


class ExtraConvBlock(nn.Module):
    """BootsTAPIR's extra residual conv on the lowres features; the residual adds to the *normed* input."""

    def __init__(self, channels: int, multiplier: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(channels)
        self.conv = nn.Conv2d(channels, channels * multiplier, 3, padding=1)
        self.conv_1 = nn.Conv2d(channels * multiplier, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [F, h, w, C] -> [F, h, w, C]."""
        x = self.layer_norm(x).permute(0, 3, 1, 2)
        x = x + self.conv_1(F.gelu(self.conv(x), approximate="tanh"))
        return x.permute(0, 2, 3, 1)


class ExtraConvs(nn.Module):
    def __init__(self, channels: int, num_layers: int, multiplier: int):
        super().__init__()
        self.blocks = nn.ModuleList(ExtraConvBlock(channels, multiplier) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


# ---------------------------------------------------------------- cost-volume head (initial estimate)


class CostVolumeHead(nn.ModuleDict):
    """Small convnet over each query's cost volume: position heatmap, occlusion and expected-distance logits.

    A ModuleDict so the keys are `hid1`..`hid4`, `occ_out`, as in the official files.
    """

    def __init__(self) -> None:
        super().__init__(
            {
                "hid1": nn.Conv2d(1, 16, 3, 1, 1),
                "hid2": nn.Conv2d(16, 1, 3, 1, 1),
                "hid3": nn.Conv2d(16, 32, 3, 2, 0),
                "hid4": nn.Linear(32, 16),
                "occ_out": nn.Linear(16, 2),
            }
        )

    def run(self, cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cost [M, 1, h, w] -> (position logits [M, 1, h, w], (occlusion, expected_dist) logits [M, 2])."""
        hidden = torch.relu(self["hid1"](cost))
        pos = self["hid2"](hidden)
        occ = torch.relu(self["hid3"](F.pad(hidden, (0, 2, 0, 2))))
        occ = torch.relu(self["hid4"](torch.mean(occ, dim=(-1, -2))))
        return pos, self["occ_out"](occ)


# ---------------------------------------------------------------- refinement mixer


class ChannelMixer(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.mlp2_up = nn.Linear(channels, channels * 4)
        self.mlp2_down = nn.Linear(channels * 4, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp2_down(F.gelu(self.mlp2_up(x), approximate="tanh"))


class MixerBlock(nn.Module):
    """Temporal depthwise convs (each channel widened 4x, then summed back) followed by a channel MLP."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        pad = kernel // 2
        self.layer_norm = nn.LayerNorm(channels, bias=False)
        self.mlp1_up = nn.Conv1d(channels, channels * 4, kernel, padding=pad, groups=channels)
        self.mlp1_up_1 = nn.Conv1d(channels * 4, channels * 4, kernel, padding=pad, groups=channels * 4)
        self.layer_norm_1 = nn.LayerNorm(channels, bias=False)
        self.conv_channels_mixer = ChannelMixer(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, T, C] -> [M, T, C]."""
        y = self.layer_norm(x).permute(0, 2, 1)
        y = self.mlp1_up_1(F.gelu(self.mlp1_up(y), approximate="tanh")).permute(0, 2, 1)
        x = x + (y[..., 0::4] + y[..., 1::4] + y[..., 2::4] + y[..., 3::4])
        return x + self.conv_channels_mixer(self.layer_norm_1(x))


class Mixer(nn.Module):
    """The refinement network: per-track sequences of correlations and features in, updates out."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, num_blocks: int, kernel: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, hidden)
        self.blocks = nn.ModuleList(MixerBlock(hidden, kernel) for _ in range(num_blocks))
        self.layer_norm = nn.LayerNorm(hidden, bias=False)
        self.linear_1 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, T, in_dim] -> [M, T, out_dim]."""
        x = self.linear(x)
        for block in self.blocks:
            x = block(x)
        return self.linear_1(self.layer_norm(x))
