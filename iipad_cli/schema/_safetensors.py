"""safetensors files that are byte-identical for equal tensors and metadata."""

from __future__ import annotations

import json

from safetensors.torch import save
from torch import Tensor


def canonical_safetensors(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with the JSON header's keys sorted.

    The safetensors writer emits metadata in hash-map order, which changes from run to run; sorting
    the header makes equal weights + metadata give byte-identical files (same seed => same file).
    Data offsets are relative to the end of the header, so re-serialising it is safe.
    """
    raw = save(tensors, metadata=metadata)
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[8 + length :]
