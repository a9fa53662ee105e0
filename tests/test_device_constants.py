"""Constants made once per device (teachers/device_constants.py): the same values as a fresh tensor, one object
per (values, dtype, device), and usable by a training step even when first made while labelling."""

from __future__ import annotations

import torch

from pseudotrack.teachers.device_constants import device_constant


def test_same_values_and_dtype_as_a_fresh_tensor():
    for values, dtype in [((1, 2, 0), None), ((0.5, 2.0 / 127), None), (1e-12, None), ((1.0, 2.0), torch.bfloat16)]:
        made = device_constant(values, "cpu", dtype)
        fresh = torch.tensor(values, dtype=dtype)
        assert made.dtype == fresh.dtype and torch.equal(made, fresh)


def test_made_once_per_key():
    assert device_constant((3.0, 4.0), "cpu") is device_constant((3.0, 4.0), torch.device("cpu"))
    assert device_constant((3.0, 4.0), "cpu") is not device_constant((3.0, 4.0), "cpu", torch.float64)


def test_first_made_in_inference_mode_then_used_for_backward():
    with torch.inference_mode():
        device_constant((7.0, 9.0), "cpu")
    x = torch.ones(2, requires_grad=True)
    (x * device_constant((7.0, 9.0), "cpu")).sum().backward()
    assert torch.equal(x.grad, torch.tensor([7.0, 9.0]))
