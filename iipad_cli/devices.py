"""Device and numeric-precision selection shared by every stage.

`--device auto` = cuda > mps > cpu. `--precision auto` = bf16 where the device multiplies bf16
matrices natively (a CUDA device of compute capability >= 8.0, or a CPU with AMX-BF16 or
AVX-512 BF16 units), fp32 elsewhere; see docs/performance.md for what runs in which precision.
"""

from __future__ import annotations

from pathlib import Path

import torch

from iipad_cli.errors import IipadError

PRECISIONS = ("auto", "fp32", "bf16")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
# /proc/cpuinfo flags that mean native bf16 dot products (AMX tiles; AVX-512 VDPBF16PS).
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")


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


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The CPU feature flags of the first processor in /proc/cpuinfo; empty where there is none (macOS, Windows)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def bf16_units(device: torch.device, flags: frozenset[str] | None = None) -> str | None:
    """What gives `device` native bf16 matmul ("CUDA capability 9.0", "CPU flags amx_bf16 ..."), or None."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"CUDA capability {major}.{minor}" if major >= 8 else None
    if device.type == "cpu":
        found = [flag for flag in CPU_BF16_FLAGS if flag in (cpu_flags() if flags is None else flags)]
        return f"CPU flags {' '.join(found)}" if found else None
    return None


def resolve_precision(name: str, device: torch.device, flags: frozenset[str] | None = None) -> str:
    """"fp32" or "bf16" for `--precision NAME` on `device` (auto: bf16 exactly where `bf16_units` finds units).

    An explicit bf16 is honoured on any device (same numerics everywhere, emulated and slow
    without the units); the stages say so when they run it that way.
    """
    if name not in PRECISIONS:
        raise IipadError(f"unknown precision {name!r}; use {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if bf16_units(device, flags) is not None else "fp32"
    return name


def describe_precision(precision: str, device: torch.device) -> str:
    """One phrase for the log: "bf16 matmuls (CPU flags avx512_bf16)", or a warning when bf16 is emulated."""
    if precision == "fp32":
        return "fp32"
    units = bf16_units(device)
    if units is None:
        return "bf16 matmuls WITHOUT native bf16 units on this device (emulated: slower than fp32)"
    return f"bf16 matmuls ({units})"
