"""What the teacher tests share: where the authors' reference cases live, the rule that turns a case's
seed into weights, the tiny model configs, and small synthetic clips and queries.

The reference folder is `../shared/reference` beside the repository, or PSEUDOTRACK_SHARED's.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import numpy as np

from pseudotrack.teachers.cotracker2 import CoTracker2Config
from pseudotrack.teachers.tapir import TapirConfig

SHARED = Path(os.environ.get("PSEUDOTRACK_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
REFERENCE = SHARED / "reference"

# Configs small enough for CPU tests; their weights are random or drawn by the reference rule.
CT2_TINY = CoTracker2Config(
    window_len=8,
    latent_dim=16,
    hidden_size=32,
    num_heads=2,
    time_depth=2,
    space_depth=1,
    num_virtual_tracks=4,
    corr_levels=4,
    corr_radius=1,
    flow_embed_dim=8,
    model_resolution=(32, 48),
)
TAPIR_TINY = TapirConfig(
    initial_resolution=(64, 64),
    channels=(8, 16, 16, 16),
    blocks_per_group=(1, 1, 1, 1),
    mixer_hidden=16,
    mixer_blocks=2,
    extra_conv_layers=1,
    extra_conv_multiplier=2,
)
BOOTSTAPIR_TINY = replace(TAPIR_TINY, pyramid_level=1, extra_convs=True)


@functools.cache
def weights_rule() -> ModuleType:
    """The shared folder's `weights_rule.py`, loaded by path: it is data that comes with the cases."""
    spec = importlib.util.spec_from_file_location("weights_rule", REFERENCE / "weights_rule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sliding_clip(t: int = 10, h: int = 40, w: int = 60, seed: int = 0) -> np.ndarray:
    """uint8 [T, H, W, 3]: a random texture sliding right one pixel per frame, so frames differ."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return np.stack([np.roll(base, shift=i, axis=1) for i in range(t)])


def random_queries(t: int, h: int, w: int, n: int = 5, seed: int = 1) -> np.ndarray:
    """float32 [N, 3] queries (frame, x, y) anywhere in a T x H x W clip."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, t, n)
    return np.stack([frames, rng.uniform(0, w - 1, n), rng.uniform(0, h - 1, n)], axis=1).astype(np.float32)
