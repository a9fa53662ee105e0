"""Safe loading of official checkpoint files, with errors a person can act on.

Users bring the authors' published files unmodified. We load them with
`weights_only=True` (no pickled code runs), unwrap the containers the authors
used ("model", "state_dict"), and compare the keys with the model's before
anything is copied, so a file of the wrong model or a truncated download is
refused with its path and the offending keys rather than half-loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..errors import CheckpointError

_CONTAINER_KEYS = ("model", "state_dict", "model_state_dict")
_MAX_LISTED = 8


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file to a flat name -> tensor dict on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (download the official file and pass its path)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): download it again")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} {_load_problem(exc)}") from exc
    for key in _CONTAINER_KEYS:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} holds no state dict of tensors")
    return dict(obj)


def _load_problem(exc: Exception) -> str:
    """What torch.load's error says, in one line: its own messages run to a dozen lines of advice."""
    text = str(exc).strip()
    if text.startswith("Weights only load failed"):
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
        detail = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(boilerplate)]
        return (
            f"is refused by torch's weights-only loader ({'; '.join(detail)[:160] or type(exc).__name__}): "
            "not a plain PyTorch weights file, or damaged; download it again"
        )
    first = (text.splitlines() or [""])[0][:160]
    return (
        f"cannot be read safely ({type(exc).__name__}: {first}); "
        "it may be truncated or not a PyTorch weights file: download it again"
    )


def _listing(keys: set[str]) -> str:
    shown = sorted(keys)[:_MAX_LISTED]
    more = len(keys) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def load_into(
    model: torch.nn.Module,
    path: str | Path,
    filter_fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    model_name: str = "",
) -> dict[str, torch.Tensor]:
    """Load `path` into `model` strictly; `filter_fn` maps the official layout to the module's.

    Returns the (filtered) state dict that was loaded.
    """
    state = fit_state_dict(model, path, filter_fn, model_name)
    model.load_state_dict(state, strict=True)
    return state


def fit_state_dict(
    model: torch.nn.Module,
    path: str | Path,
    filter_fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    model_name: str = "",
) -> dict[str, torch.Tensor]:
    """The (filtered) state dict of `path`, refused unless its keys and shapes are exactly `model`'s.

    Only names and shapes of `model` are read, so it may live on the meta device.
    """
    state = read_state_dict(path)
    if filter_fn is not None:
        state = filter_fn(state)
    expected = model.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    label = f" for {model_name}" if model_name else ""
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        overlap = len(set(state) & set(expected)) / max(1, len(expected))
        hint = (
            "it looks like a checkpoint of another model"
            if overlap < 0.5
            else "the file may be from another release of this model"
        )
        raise CheckpointError(f"checkpoint {path} does not fit{label}: {'; '.join(parts)} ({hint})")
    bad = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise CheckpointError(f"checkpoint {path} does not fit{label}: shape mismatch: {'; '.join(bad[:_MAX_LISTED])}")
    return state
