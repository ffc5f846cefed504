"""`RUN/generator.safetensors`: the trained prompt generator's weights + its provenance.

Metadata (all strings, JSON-encoded where structured): `generator_config`, `preset` (the effective
Preset after overrides), `training` (options), `features_sha256`, `backbone_id`, `random_weights`,
`final_losses`, `manual_prompts`, plus `iipad_version` / `schema_version`. Nothing time-dependent
is stored, so the same seed gives a byte-identical file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from iipad_cli.artifacts import atomic_path, provenance
from iipad_cli.errors import IipadError
from iipad_cli.schema.check import Found, Spec, check_arrays
from iipad_cli.models.prompt_generator import GeneratorConfig, PromptGenerator
from iipad_cli.schema._safetensors import canonical_safetensors

# Metadata values stored as JSON; the others (hashes, ids, versions) are plain strings.
JSON_FIELDS = ("generator_config", "preset", "training", "final_losses", "manual_prompts", "random_weights")


def save_generator(path: Path, generator: PromptGenerator, metadata: dict[str, Any]) -> None:
    """Write the weights and metadata atomically; `generator_config` is added from the module."""
    fields = {"generator_config": generator.config.to_json(), **metadata}
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in generator.state_dict().items()}
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(canonical_safetensors(tensors, provenance(**fields)))


def read_generator_metadata(path: Path) -> dict[str, str]:
    """The raw string metadata, without loading weights (for compatibility checks)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (OSError, SafetensorError) as error:
        raise IipadError(f"{path}: not a readable safetensors file ({error})") from None


def load_generator(path: Path, device: str = "cpu") -> tuple[PromptGenerator, dict[str, Any]]:
    """The generator (eval mode) and its metadata with JSON values decoded.

    Refuses a file without a generator config or whose tensors do not match it exactly.
    """
    path = Path(path)
    raw = read_generator_metadata(path)
    if "generator_config" not in raw:
        raise IipadError(f"{path}: no generator_config in metadata; not written by `iipad train`")
    metadata: dict[str, Any] = dict(raw)
    for key in JSON_FIELDS:
        if key in raw:
            try:
                metadata[key] = json.loads(raw[key])
            except ValueError:
                raise IipadError(f"{path}: metadata field {key} is not valid JSON") from None
    try:
        config = GeneratorConfig(**metadata["generator_config"])
    except TypeError as error:
        raise IipadError(f"{path}: invalid generator_config ({error})") from None
    generator = PromptGenerator(config)
    with safe_open(str(path), framework="pt") as handle:
        state = {name: handle.get_tensor(name) for name in handle.keys()}
    expected = {name: Spec(str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in generator.state_dict().items()}
    found = {name: Found(str(t.dtype), tuple(t.shape)) for name, t in state.items()}
    check_arrays(path, found, expected, "generator for its generator_config")
    generator.load_state_dict(state)
    return generator.to(device).eval(), metadata
