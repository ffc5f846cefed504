"""Device selection shared by every stage (`--device auto` = cuda > mps > cpu)."""

from __future__ import annotations

import torch

from iipad_cli.errors import IipadError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise IipadError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise IipadError(f"device {name!r} requested but CUDA is not available")
    return device
