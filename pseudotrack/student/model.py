"""The student: the project's CoTracker3 (online or offline), with its visibility/confidence head frozen.

§3.3: on pseudo-labels only tracks are supervised; to keep the visibility and
confidence the model learnt on synthetic data, their separate linear layer is
frozen. Its official parameter names are `updateformer.vis_conf_head.*`; we
freeze by that name, so the rule holds for any file in the official layout.

The wrapped network keeps the official state-dict layout, so a student
exported here is a plain `{name: tensor}` file with exactly the official keys
(the authors' predictor and our `cotracker3_*` teachers load it unchanged).
What the layout cannot say (which variant, and the sizes of a non-published
config such as the tiny CPU one) goes in a JSON file beside it,
`<file>.json`, which the cotracker3 teacher reads when present.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..teachers.checkpoints import load_into
from ..teachers.cotracker3 import model as ct3
from ..teachers.cotracker3.teacher import predictor_from_model
from .loss import WindowPrediction

FROZEN_PREFIX = ct3.CoTracker3.VIS_CONF_HEAD + "."
EXPORT_FORMAT = ct3.STUDENT_FORMAT_PREFIX + "1"


def model_config(variant: str, size: str) -> ct3.CoTracker3Config:
    """The published architecture of a variant, or the tiny one for CPU tests."""
    if size == "tiny":
        return ct3.tiny_config(offline=variant == "offline")
    return ct3.default_config(offline=variant == "offline")


class Student(nn.Module):
    """CoTracker3 whose forward returns per-window, per-iteration tracks for the loss.

    `net` is the CoTracker3 module itself (official keys); the wrapper adds no parameters.
    """

    def __init__(self, net: nn.Module, variant: str):
        super().__init__()
        self.net = net
        self.variant = variant
        freeze_vis_conf_head(net)

    @property
    def resolution(self) -> tuple[int, int]:
        height, width = self.net.cfg.model_resolution
        return int(height), int(width)

    def frozen_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.net.named_parameters() if n.startswith(FROZEN_PREFIX)}

    def config_dict(self) -> dict:
        return {"variant": self.variant, "config": _plain(asdict(self.net.cfg))}

    def forward(self, video: torch.Tensor, queries: torch.Tensor, iters: int = 4) -> list[WindowPrediction]:
        """Training forward.

        video: float [B, T, 3, H, W] 0..255 at the model resolution; queries: float [B, N, 3] (t, x, y)
        returns one WindowPrediction per sliding window (one for the offline model), each with
        `iters` tensors [B, S, N, 2] in clip pixels
        """
        windows = ct3.train_forward(self.net, video, queries, iters=iters, online=self.variant == "online")
        return [WindowPrediction(start, list(tracks)) for start, tracks in windows]

    @torch.no_grad()
    def predict(self, frames: np.ndarray, queries: np.ndarray, iters: int = 4) -> tuple[np.ndarray, np.ndarray]:
        """Evaluation call in the shape `student.evaluate` expects; the evaluator adds the support points.

        frames: uint8 [T, H, W, 3]; queries: float [M, 3] (t, x, y) pixels of `frames`
        returns tracks float32 [T, M, 2] in the same pixels and visible bool [T, M]
        """
        teacher = predictor_from_model(
            self.net, offline=self.variant == "offline", iters=iters, support_grid=0, support_sift=0, support_uniform=0
        )
        out = teacher.predict(frames, queries)
        return out.tracks, out.visibility


def freeze_vis_conf_head(net: nn.Module) -> list[str]:
    """Freeze the separate linear visibility/confidence layer (§3.3); returns the frozen names."""
    names = []
    for name, param in net.named_parameters():
        if name.startswith(FROZEN_PREFIX):
            param.requires_grad_(False)
            names.append(name)
    if not names:
        raise RuntimeError(
            f"the student has no parameters under {FROZEN_PREFIX!r}: CoTracker3 must be built with its "
            "separate linear visibility/confidence layer (linear_layer_for_vis_conf)"
        )
    return names


def build_student(variant: str, size: str = "full", checkpoint: str | Path | None = None) -> Student:
    """A student from an official CoTracker3 file, one of our exports, or random weights (tests only).

    An export's sidecar decides the architecture (so `size` is ignored for it);
    an official file uses the published one. Online and offline files differ in
    the length of their time embedding, so a file of one variant cannot start a
    student of the other.
    """
    meta = read_export_meta(checkpoint) if checkpoint is not None else None
    if meta is not None:
        saved = meta["model"]["variant"]
        if saved != variant:
            raise ConfigError(
                f"{checkpoint} is an {saved} student: train an {saved} student from it "
                f"(variant={saved}) or start the {variant} one from an {variant} file"
            )
        cfg = ct3.config_from_dict(meta["model"]["config"])
    else:
        cfg = model_config(variant, size)
    net = ct3.CoTracker3(cfg)
    if checkpoint is not None:
        load_into(net, checkpoint, model_name=f"CoTracker3 {variant} ({size if meta is None else 'student'})")
    return Student(net, variant)


def export_student(student: Student, path: str | Path, extra: dict | None = None) -> Path:
    """Write the official-layout state dict and its sidecar; both appear whole (write, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in student.net.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    meta = {"format": EXPORT_FORMAT, "model": student.config_dict(), **(extra or {})}
    sidecar = sidecar_path(path)
    tmp_meta = sidecar.with_name(f".{sidecar.name}.tmp")
    tmp_meta.write_text(json.dumps(_plain(meta), indent=2, sort_keys=True))
    tmp_meta.replace(sidecar)
    return path


def sidecar_path(path: str | Path) -> Path:
    return Path(str(path) + ".json")


def read_export_meta(path: str | Path) -> dict | None:
    """The sidecar of one of our exports; None for an official file (no sidecar)."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    meta = json.loads(sidecar.read_text())
    if not str(meta.get("format", "")).startswith(ct3.STUDENT_FORMAT_PREFIX):
        return None
    return meta


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
