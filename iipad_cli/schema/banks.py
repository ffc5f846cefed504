"""`RUN/banks.safetensors`: the category-aware banks of eqs. 13–14.

Tensors (all L2-normalised along the last axis, float32):
  query      (N, M, d)    Q-Former tokens Z of each bank image, per token
  prompt     (N, 2, D)    [e^n, e^a] of each bank image (generator + text encoder, eval mode)
  mem<layer> (N, P, W)    original-path patch tokens at each memory layer (e.g. mem6, mem18)
Metadata (strings, JSON where structured): `paths` and `classes` of the bank images (classes are
for reporting only, the model never reads them), `memory_layers`, and provenance (backbone id,
weight hashes, preset, features/generator sha256).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import Tensor

from iipad_cli.artifacts import atomic_path
from iipad_cli.errors import IipadError
from iipad_cli.schema._safetensors import canonical_safetensors
from iipad_cli.schema.check import Found, Spec, check_arrays

REQUIRED_METADATA = ("paths", "classes", "memory_layers", "backbone_id", "features_sha256", "generator_sha256")


@dataclass
class Banks:
    """The banks as tensors; `mem` stacks the memory layers: (Lm, N, P, W) in `memory_layers` order."""

    query: Tensor
    prompt: Tensor
    mem: Tensor
    memory_layers: tuple[int, ...]
    paths: list[str]
    classes: list[str]
    metadata: dict[str, str]

    def __len__(self) -> int:
        return int(self.query.shape[0])

    def to(self, device: torch.device | str) -> "Banks":
        return Banks(
            query=self.query.to(device),
            prompt=self.prompt.to(device),
            mem=self.mem.to(device),
            memory_layers=self.memory_layers,
            paths=self.paths,
            classes=self.classes,
            metadata=self.metadata,
        )

    def without(self, row: int) -> "Banks":
        """The banks minus one image (leave-one-out calibration scores each shot against the others)."""
        keep = [index for index in range(len(self)) if index != row]
        return Banks(
            query=self.query[keep],
            prompt=self.prompt[keep],
            mem=self.mem[:, keep],
            memory_layers=self.memory_layers,
            paths=[self.paths[index] for index in keep],
            classes=[self.classes[index] for index in keep],
            metadata=self.metadata,
        )


def mem_key(layer: int) -> str:
    return f"mem{layer}"


def save_banks(path: Path, banks: Banks, provenance: dict[str, str]) -> None:
    """Write atomically; `provenance` (string values) joins the paths/classes/layers metadata."""
    tensors = {"query": banks.query.float().contiguous().cpu(), "prompt": banks.prompt.float().contiguous().cpu()}
    for index, layer in enumerate(banks.memory_layers):
        tensors[mem_key(layer)] = banks.mem[index].float().contiguous().cpu()
    metadata = {
        **provenance,
        "paths": json.dumps(banks.paths),
        "classes": json.dumps(banks.classes),
        "memory_layers": json.dumps(list(banks.memory_layers)),
    }
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(canonical_safetensors(tensors, metadata))


def read_banks_metadata(path: Path) -> dict[str, str]:
    """The metadata alone (cheap: the header only), for compatibility checks."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise IipadError(f"{path}: not a readable safetensors file ({error})") from None
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise IipadError(f"{path}: not an iipad banks file (metadata lacks {', '.join(missing)})")
    return dict(metadata)


def load_banks(path: Path) -> Banks:
    metadata = read_banks_metadata(path)
    tensors = load_file(str(path))
    layers = tuple(int(layer) for layer in json.loads(metadata["memory_layers"]))
    expected = {
        "query": Spec("float32", ("N", "M", "d")),
        "prompt": Spec("float32", ("N", 2, "D")),
        **{mem_key(layer): Spec("float32", ("N", "P", "W")) for layer in layers},
    }
    found = {name: Found(str(tensor.dtype), tuple(tensor.shape)) for name, tensor in tensors.items()}
    count = check_arrays(path, found, expected, "banks file")["N"]
    paths = list(json.loads(metadata["paths"]))
    if len(paths) != count:
        raise IipadError(f"{path}: banks tensors and paths disagree on the number of bank images")
    return Banks(
        query=tensors["query"],
        prompt=tensors["prompt"],
        mem=torch.stack([tensors[mem_key(layer)] for layer in layers]),
        memory_layers=layers,
        paths=paths,
        classes=list(json.loads(metadata["classes"])),
        metadata=metadata,
    )
