"""Checking a stored artifact's arrays against its schema, both ways: missing and extra names,
dtypes and shapes.

A `banks.safetensors` with an extra tensor used to be accepted silently; a file that does not
hold exactly what the schema says was not written by iipad (or was edited since), and reading
it anyway risks wrong numbers. Shapes are patterns: an int must match exactly, a name (such as
"N") must take the same value everywhere it appears in one check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from iipad_cli.errors import IipadError

Dim = int | str


@dataclass(frozen=True)
class Spec:
    """What one stored array must be: its dtype name (numpy's, e.g. "float16", or torch's
    without the prefix) and its shape pattern."""

    dtype: str
    shape: tuple[Dim, ...]


@dataclass(frozen=True)
class Found:
    dtype: str
    shape: tuple[int, ...]


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:4])
    return shown + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def check_arrays(path: Path, found: Mapping[str, Found], expected: Mapping[str, Spec], what: str) -> dict[str, int]:
    """Raise a one-line IipadError naming `path` unless `found` matches `expected` exactly;
    returns the values the named dimensions took."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        parts = ([f"lacks {_listed(missing)}"] if missing else []) + ([f"has unexpected {_listed(extra)}"] if extra else [])
        raise IipadError(f"{path}: not a valid {what} ({'; '.join(parts)}); it was not written by this iipad version or was edited")
    dims: dict[str, int] = {}
    for name in sorted(expected):
        spec, array = expected[name], found[name]
        if array.dtype.removeprefix("torch.") != spec.dtype:
            raise IipadError(f"{path}: {name} is {array.dtype.removeprefix('torch.')}, a valid {what} stores {spec.dtype}")
        if len(array.shape) != len(spec.shape):
            raise IipadError(f"{path}: {name} has shape {array.shape}, a valid {what} has {len(spec.shape)} axes")
        for axis, (size, want) in enumerate(zip(array.shape, spec.shape)):
            if isinstance(want, str):
                want = dims.setdefault(want, size)
            if size != want:
                raise IipadError(
                    f"{path}: {name} has shape {tuple(array.shape)}; axis {axis} should be {want} in a valid {what}"
                )
    return dims
