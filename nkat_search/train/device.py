"""The one place a device name becomes a device: ``torch_device`` (a ``torch.device``),
``device_name`` (its string), ``gpu_names`` (every visible GPU)."""

from __future__ import annotations

import torch

from nkat_search.train.errors import DeviceError


def torch_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` means the first CUDA device when there is one, else the CPU; anything else must
    name a device that is there (``DeviceError`` when not)."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(name, "not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(name, "no CUDA GPU is visible; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(name, f"only {torch.cuda.device_count()} GPU(s) visible")
    return device


def device_name(name: str | torch.device = "auto") -> str:
    """``torch_device(name)`` as a string: ``cpu``, ``cuda``, ``cuda:N``."""
    return str(torch_device(name))


def gpu_names() -> list[str]:
    """``cuda:0`` ... one per visible GPU; empty without one."""
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
