"""Building blocks shared by the CoTracker family (CoTracker2, CoTracker3 online and offline).

Module and parameter names here are part of the official checkpoint layout
(`fnet.layer1.0.conv1.weight`, `updateformer.time_blocks.0.attn.to_q.weight`,
...), so renaming an attribute breaks loading of the published files: keep
them as they are. Everything else is free to change.

Numerics follow the authors' release where it matters for parity with the
reference cases (sampling conventions, embedding layouts, GELU flavours,
LayerNorm epsilons); the comments say where a choice looks arbitrary but is
load-bearing.

Contents, top to bottom: bilinear sampling helpers, sin-cos / Fourier
embeddings and time-embedding interpolation, the CNN feature encoder and the
correlation pyramid over its maps, and the transformer pieces (MLP, attention,
self/cross-attention blocks, and the update transformer with proxy "virtual"
tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .device_constants import device_constant

# ---------------------------------------------------------------- bilinear sampling


def bilinear_sample(values: torch.Tensor, coords: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """`grid_sample` taking pixel coordinates, corners aligned (pixel i is at coordinate i).

    values [B, C, H, W] with coords [B, Ho, Wo, 2] as (x, y)       -> [B, C, Ho, Wo]
    values [B, C, T, H, W] with coords [B, D, Ho, Wo, 3] as (t, x, y) -> [B, C, D, Ho, Wo]

    Sampling always runs in float32: under bf16 autocast a coordinate near 500
    would otherwise be rounded by up to 2 pixels.
    """
    sizes = values.shape[2:]
    if len(sizes) not in (2, 3):
        raise ValueError(f"bilinear_sample needs values of 4 or 5 dims, got shape {tuple(values.shape)}")
    if coords.shape[-1] != len(sizes):
        raise ValueError(f"coords {tuple(coords.shape)} must end in {len(sizes)} components for values of {sizes}")
    if len(sizes) == 3:
        coords = coords.index_select(-1, device_constant((1, 2, 0), coords.device))  # (t, x, y) -> (x, y, t)
    scale = device_constant(tuple(2.0 / max(s - 1, 1) for s in reversed(sizes)), coords.device)
    grid = coords.float() * scale - 1.0
    return F.grid_sample(values.float(), grid, align_corners=True, padding_mode=padding_mode)


def sample_points(values: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Features at points of one map each: values [B, C, H, W], coords [B, R, 2] (x, y) -> [B, R, C]."""
    out = bilinear_sample(values, coords.unsqueeze(2))  # B C R 1
    return out[..., 0].transpose(1, 2)


def sample_video(values: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Features at space-time points.

    values [B, T, C, H, W], coords [B, R1, R2, 3] (t, x, y) -> [B, R1, R2, C]
    """
    out = bilinear_sample(values.permute(0, 2, 1, 3, 4), coords.unsqueeze(3))  # B C R1 R2 1
    return out[..., 0].permute(0, 2, 3, 1)


def patch_offsets(radius: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[P, P, 2] (dx, dy) offsets of a square patch, P = 2 * radius + 1.

    The FIRST patch axis moves along x and the second along y. That is the
    order in which the published CoTracker3 flattens its 4D correlations, so
    `corr_mlp` weights only make sense with it.
    """
    steps = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    dx, dy = torch.meshgrid(steps, steps, indexing="ij")
    return torch.stack([dx, dy], dim=-1)


def sample_patches(fmap: torch.Tensor, centers: torch.Tensor, radius: int) -> torch.Tensor:
    """Square patches of features around points.

    fmap [M, C, H, W], centers [M, R, 2] (x, y) -> [M, R, P*P, C], P = 2 * radius + 1.

    Out-of-frame samples repeat the border (the original's padding), and the
    patch is flattened in `patch_offsets` order.
    """
    offsets = patch_offsets(radius, centers.device).reshape(1, 1, -1, 2)
    points = centers.float().unsqueeze(2) + offsets  # M R P*P 2
    out = bilinear_sample(fmap, points)  # M C R P*P
    return out.permute(0, 2, 3, 1)


# ---------------------------------------------------------------- embeddings


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [1, M, dim]: sines in the first half, cosines in the second.

    Frequencies are 1 / 10000^(2i/dim), computed in float64 and rounded once at
    the end, which is how the published `time_emb` buffers were made.
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = pos.reshape(-1).to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)[None].float()


def sincos_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """[1, dim, height, width] map: the first half of the channels encodes x, the second half y."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding width must be a multiple of 4, got {dim}")
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
    )
    emb = torch.cat([sincos_1d(dim // 2, xs), sincos_1d(dim // 2, ys)], dim=2)  # 1 (H W) dim
    return emb.reshape(1, height, width, dim).permute(0, 3, 1, 2)


def fourier_2d(xy: torch.Tensor, dim: int, cat_coords: bool = True) -> torch.Tensor:
    """[..., 2] -> [..., 2 * dim (+ 2)]: interleaved sin/cos of x, then of y, at frequencies k * 1000 / dim.

    CoTracker2's embedding of displacements; `cat_coords` puts the raw (x, y) in front.
    """
    freqs = torch.arange(0, dim, 2, device=xy.device, dtype=torch.float32) * (1000.0 / dim)

    def one(v: torch.Tensor) -> torch.Tensor:
        angles = v * freqs
        return torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).flatten(-2)

    parts = [one(xy[..., 0:1]), one(xy[..., 1:2])]
    return torch.cat([xy, *parts] if cat_coords else parts, dim=-1)


def posenc(x: torch.Tensor, min_deg: int, max_deg: int) -> torch.Tensor:
    """[..., D] -> [..., D + 2 * D * (max_deg - min_deg)]: x, then sin(2^k x), then cos(2^k x).

    Within each half the layout is frequency-major ((k0, d0), (k0, d1), ...),
    and the cosines are computed as sin(v + pi/2): CoTracker3's embedding of
    per-frame displacements, whose input layer was trained on exactly this order.
    """
    if min_deg == max_deg:
        return x
    scales = device_constant(tuple(2.0**i for i in range(min_deg, max_deg)), x.device, x.dtype)
    scaled = (x[..., None, :] * scales[:, None]).flatten(-2)
    return torch.cat([x, torch.sin(torch.cat([scaled, scaled + 0.5 * math.pi], dim=-1))], dim=-1)


def interpolate_time_embedding(emb: torch.Tensor, length: int) -> torch.Tensor:
    """Stretch a learnt-length time embedding [1, S, D] to [1, length, D] (linear, corners not aligned).

    The offline model was trained with S = 60 and is run on clips of any
    length (§3.3); the embedding is returned unchanged when the length matches.
    """
    if emb.shape[1] == length:
        return emb
    stretched = F.interpolate(emb.float().transpose(1, 2), size=length, mode="linear")
    return stretched.transpose(1, 2).to(emb.dtype)


# ---------------------------------------------------------------- feature encoder


def feature_pyramid(fmaps: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """[B, S, C, H, W] -> `levels` maps [B, S, C, H / 2^i, W / 2^i], each 2x2 average-pooled from the previous.

    Both CoTrackers correlate against this pyramid; odd sizes floor, as avg_pool2d does.
    """
    b, s, c = fmaps.shape[:3]
    pyramid = [fmaps]
    for _ in range(levels - 1):
        pooled = F.avg_pool2d(pyramid[-1].reshape(b * s, c, *pyramid[-1].shape[-2:]), 2, stride=2)
        pyramid.append(pooled.reshape(b, s, c, *pooled.shape[-2:]))
    return pyramid


class ResidualBlock(nn.Module):
    """Two 3x3 convs with instance norm; a strided 1x1 conv carries the shortcut when downsampling."""

    def __init__(self, in_dim: int, out_dim: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, out_dim, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1)
        self.norm1 = nn.InstanceNorm2d(out_dim)
        self.norm2 = nn.InstanceNorm2d(out_dim)
        # only the strided blocks have a shortcut conv in the published layout (key `downsample.0`)
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_dim, out_dim, 1, stride=stride), nn.InstanceNorm2d(out_dim))
            if stride != 1
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [M, in_dim, H, W] -> [M, out_dim, H / stride, W / stride]
        # ReLUs in place on fresh tensors: at 384x512 these maps are the largest in the model, and a
        # new buffer per ReLU costs more than the ReLU (autograd is fine: norms keep their inputs)
        y = F.relu(self.norm1(self.conv1(x)), inplace=True)
        y = F.relu(self.norm2(self.conv2(y)), inplace=True)
        if self.downsample is not None:
            x = self.downsample(x)
        return F.relu(x + y, inplace=True)


class FeatureEncoder(nn.Module):
    """Per-frame CNN: four residual stages at strides 2..16, resized to `stride` and fused.

    Instance norm (no affine parameters) keeps frames independent, which is
    what lets a long clip be encoded a few frames at a time without changing
    the result.
    """

    def __init__(self, latent_dim: int = 128, stride: int = 4):
        super().__init__()
        if latent_dim % 4:
            raise ValueError(f"FeatureEncoder latent_dim must be a multiple of 4, got {latent_dim}")
        self.stride = stride
        half = latent_dim // 2
        dims = (half, latent_dim // 4 * 3, latent_dim, latent_dim)
        self.conv1 = nn.Conv2d(3, half, 7, stride=2, padding=3)
        self.norm1 = nn.InstanceNorm2d(half)
        self.layer1 = self._stage(half, dims[0], 1)
        self.layer2 = self._stage(dims[0], dims[1], 2)
        self.layer3 = self._stage(dims[1], dims[2], 2)
        self.layer4 = self._stage(dims[2], dims[3], 2)
        self.conv2 = nn.Conv2d(sum(dims), latent_dim * 2, 3, padding=1)
        self.norm2 = nn.InstanceNorm2d(latent_dim * 2)
        self.conv3 = nn.Conv2d(latent_dim * 2, latent_dim, 1)

    @staticmethod
    def _stage(in_dim: int, out_dim: int, stride: int) -> nn.Sequential:
        return nn.Sequential(ResidualBlock(in_dim, out_dim, stride), ResidualBlock(out_dim, out_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [M, 3, H, W] in [-1, 1]  ->  [M, latent_dim, H // stride, W // stride]
        size = (x.shape[2] // self.stride, x.shape[3] // self.stride)
        x = F.relu(self.norm1(self.conv1(x)), inplace=True)
        stages = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            stages.append(F.interpolate(x, size, mode="bilinear", align_corners=True))
        return self.conv3(F.relu(self.norm2(self.conv2(torch.cat(stages, dim=1))), inplace=True))


# ---------------------------------------------------------------- transformer pieces


class Mlp(nn.Module):
    """Two linear layers around a GELU: tanh-approximate inside transformer blocks, exact elsewhere."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int | None = None, approximate: str = "none"):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim or in_dim)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_dim] -> [..., out_dim]
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Attention(nn.Module):
    """Multi-head attention with biased projections and an optional mask or additive bias.

    A boolean mask ("may attend") becomes a bias of -float max where not
    allowed rather than -inf, as in the original, so a row whose keys are all
    masked gets uniform weights instead of NaN. The bias is made in the dtype
    the scores are computed in: a float32 -max rounded to bf16 would be -inf.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} must be divisible by num_heads={num_heads}")
        self.heads = num_heads
        self.dim_head = dim // num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x: [B, N1, D], context: [B, N2, Dc]; bias: bool (may attend) or float, broadcastable to
        # [B, heads, N1, N2]  ->  [B, N1, D]
        context = x if context is None else context
        b, n1, _ = x.shape
        n2 = context.shape[1]
        q = self.to_q(x).reshape(b, n1, self.heads, self.dim_head).transpose(1, 2)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        k = k.reshape(b, n2, self.heads, self.dim_head).transpose(1, 2)
        v = v.reshape(b, n2, self.heads, self.dim_head).transpose(1, 2)
        if bias is not None:
            bias = mask_bias(bias, q.dtype) if bias.dtype == torch.bool else bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.to_out(out.transpose(1, 2).reshape(b, n1, self.heads * self.dim_head))


def mask_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool "may attend" -> additive bias: 0 where allowed, -float max elsewhere."""
    return (~allowed).to(dtype) * -torch.finfo(dtype).max


class AttnBlock(nn.Module):
    """Pre-norm self-attention block; the norms have no affine parameters (none in the published files)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate="tanh")

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, N, D] -> [B, N, D]
        x = x + self.attn(self.norm1(x), bias=bias)
        return x + self.mlp(self.norm2(x))


class CrossAttnBlock(nn.Module):
    """Pre-norm cross-attention block; the context gets its own (affine) LayerNorm."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm_context = nn.LayerNorm(context_dim or dim)
        self.cross_attn = Attention(dim, num_heads, context_dim=context_dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate="tanh")

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N1, D], context [B, N2, D], mask [B, M] bool over the real tracks (or None) -> [B, N1, D].

        The original decides which side a mask applies to by its length: the
        query side when M equals N1, the key side otherwise. CoTracker2's parity
        depends on that quirk (it bites when there are as many tracks as
        virtual tokens), so it is kept.
        """
        bias = None
        if mask is not None:
            heads = self.cross_attn.heads
            if mask.shape[1] == x.shape[1]:
                allowed = mask[:, None, :, None].expand(-1, heads, -1, context.shape[1])
            else:
                allowed = mask[:, None, None].expand(-1, heads, x.shape[1], -1)
            bias = allowed
        x = x + self.cross_attn(self.norm1(x), context=self.norm_context(context), bias=bias)
        return x + self.mlp(self.norm2(x))


def by_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, max_tokens: int | None) -> torch.Tensor:
    """Apply a row-independent `fn` to x [M, L, ...] a few rows at a time, at most `max_tokens` rows x L.

    None (or a budget above M x L) runs all rows at once; at least one row always goes through.
    """
    if max_tokens is None or x.shape[0] * x.shape[1] <= max_tokens:
        return fn(x)
    rows = max(1, max_tokens // max(1, x.shape[1]))
    return torch.cat([fn(x[i : i + rows]) for i in range(0, x.shape[0], rows)])


class UpdateTransformer(nn.Module):
    """Alternating attention over time (per track) and over tracks (per frame, through proxy tokens).

    Tracks never attend to each other directly: `num_virtual_tracks` learnt
    proxy tokens gather from the real tracks, attend among themselves, and the
    real tracks read back from them, so the cost grows linearly with the number
    of tracks. A space step follows every `time_depth // space_depth`-th time
    block.

    Output per token: `flow_dim` values from `flow_head`, then, when
    `vis_conf_dim` > 0, the values of the separate linear `vis_conf_head`
    (CoTracker3's visibility and confidence logits; training freezes it).

    The published attribute `virual_tracks` is misspelt; the spelling is part of
    the checkpoint keys.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_size: int = 384,
        flow_dim: int = 2,
        num_heads: int = 8,
        time_depth: int = 6,
        space_depth: int = 6,
        mlp_ratio: float = 4.0,
        num_virtual_tracks: int = 64,
        vis_conf_dim: int = 0,
    ):
        super().__init__()
        if space_depth and (time_depth < space_depth or time_depth % space_depth):
            raise ValueError(f"time_depth={time_depth} must be a multiple of space_depth={space_depth}")
        d = hidden_size
        self.num_virtual = num_virtual_tracks
        self.space_every = time_depth // space_depth if space_depth else 0
        self.input_transform = nn.Linear(input_dim, d)
        self.flow_head = nn.Linear(d, flow_dim)
        self.vis_conf_head = nn.Linear(d, vis_conf_dim) if vis_conf_dim else None
        self.virual_tracks = nn.Parameter(torch.randn(1, num_virtual_tracks, 1, d))
        self.time_blocks = nn.ModuleList(AttnBlock(d, num_heads, mlp_ratio) for _ in range(time_depth))
        self.space_virtual_blocks = nn.ModuleList(AttnBlock(d, num_heads, mlp_ratio) for _ in range(space_depth))
        self.space_point2virtual_blocks = nn.ModuleList(
            CrossAttnBlock(d, num_heads, mlp_ratio) for _ in range(space_depth)
        )
        self.space_virtual2point_blocks = nn.ModuleList(
            CrossAttnBlock(d, num_heads, mlp_ratio) for _ in range(space_depth)
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """[..., input_dim] -> [..., hidden]; a separate step so callers can embed a few tracks at a time."""
        return self.input_transform(x)

    def mix(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None, max_tokens: int | None = None
    ) -> torch.Tensor:
        """The attention stack on embedded tokens.

        tokens [B, N, T, hidden] (real tracks only); mask [B * T, N] bool or None
        -> [B, N, T, hidden] for the real tracks.
        `max_tokens` bounds how many tokens go through a block at once, in whole
        rows (a track's frames for time attention, a frame's tracks for space
        attention); rows are independent there, so it changes memory, not results.
        """
        b, n, t, d = tokens.shape
        virtual = self.virual_tracks.expand(b, -1, t, -1)
        x = torch.cat([tokens, virtual], dim=1)  # B (N + V) T D (float32 under autocast, as cat promotes)
        total = x.shape[1]
        space = 0
        for i, block in enumerate(self.time_blocks):
            x = by_rows(block, x.reshape(b * total, t, d), max_tokens).reshape(b, total, t, d)
            if self.space_every and i % self.space_every == 0:
                rows = x.permute(0, 2, 1, 3).reshape(b * t, total, d)
                step = self._space_step(space, mask)
                # a mask is per row: with one, rows go through whole rather than split apart from it
                rows = by_rows(step, rows, max_tokens) if mask is None else step(rows)
                x = rows.reshape(b, t, total, d).permute(0, 2, 1, 3)
                space += 1
        return x[:, :n]

    def _space_step(self, j: int, mask: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
        def step(rows: torch.Tensor) -> torch.Tensor:
            # rows: [M, N + V, D], real tracks first
            points, virtual = rows[:, : -self.num_virtual], rows[:, -self.num_virtual :]
            virtual = self.space_virtual2point_blocks[j](virtual, points, mask=mask)
            virtual = self.space_virtual_blocks[j](virtual)
            points = self.space_point2virtual_blocks[j](points, virtual, mask=mask)
            return torch.cat([points, virtual], dim=1)

        return step

    def heads(self, tokens: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [..., flow_dim + vis_conf_dim]."""
        out = self.flow_head(tokens)
        if self.vis_conf_head is not None:
            out = torch.cat([out, self.vis_conf_head(tokens)], dim=-1)
        return out

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, max_tokens: int | None = None) -> torch.Tensor:
        # x: [B, N, T, input_dim], mask: [B * T, N] bool or None -> [B, N, T, flow_dim + vis_conf_dim]
        return self.heads(self.mix(self.embed(x), mask, max_tokens))
