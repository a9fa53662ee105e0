"""Small constant tensors on the model's device, made once per process instead of once per call.

`torch.tensor([...], device="cuda")` inside a forward is a copy from pageable
host memory, and such a copy makes the host wait until every kernel queued
before it has run. A teacher that built its scales and index lists that way
on every sampling call waited dozens of times per forward, so the GPU sat idle
each time while the next kernels were being launched (bench_teachers.py
--profile counts the waits). The values are exactly those the per-call
tensors had, so the outputs do not change.
"""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=512)
def _made(values: tuple | float | int, dtype: torch.dtype | None, device: str) -> torch.Tensor:
    # Outside inference mode: a constant first made while labelling may serve a training step later
    # in the same process, and an inference tensor cannot be saved for backward.
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype).to(device)


def device_constant(
    values: tuple | float | int, device: torch.device | str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`torch.tensor(values, dtype=dtype, device=device)`, shared by every call: never modify it in place."""
    return _made(values, dtype, str(device))
