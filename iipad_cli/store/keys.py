"""The two halves of a store key: what encoded the image (`BackboneKey`) and which bytes it was.

The content key is the sha256 of the image file's bytes, so a file renamed or copied elsewhere is
found again, and a file whose bytes changed under the same name is a new image.
The backbone key is a hash of everything that changes the encoders' output for the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iipad_cli.artifacts import sha256_file, sha256_json

# Layout of the index database and the segment files; a store with another value is refused.
STORE_SCHEMA_VERSION = 1
# What one stored row holds (the four fp16 fields, their layer order and token conventions).
FEATURE_SCHEMA_VERSION = 1
# The image preprocessing of `data.images.preprocess_image` (EXIF transpose, RGB, squash bicubic,
# CLIP mean/std); bump it when that changes, so old features are not served for new inputs.
PREPROCESSING_VERSION = 1


@dataclass(frozen=True)
class BackboneKey:
    """Everything that determines the features of one image apart from its bytes."""

    backbone_id: str
    spec_sha256: str  # hash of the backbone spec (layers, widths, grid): same id, other layers = other key
    weights_sha256: tuple[str, ...]  # sorted; ("random",) for seeded random weights
    image_size: int  # input resolution of the encoders
    precision: str  # numeric precision of the forward pass, e.g. "fp32"
    preprocessing_version: int = PREPROCESSING_VERSION
    feature_schema_version: int = FEATURE_SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "backbone_id": self.backbone_id,
            "spec_sha256": self.spec_sha256,
            "weights_sha256": list(self.weights_sha256),
            "image_size": self.image_size,
            "precision": self.precision,
            "preprocessing_version": self.preprocessing_version,
            "feature_schema_version": self.feature_schema_version,
        }

    @property
    def digest(self) -> str:
        return sha256_json(self.to_json())

    @classmethod
    def for_backbone(
        cls, backbone_id: str, spec_json: dict[str, Any], weights_sha256: list[str] | tuple[str, ...], image_size: int, precision: str
    ) -> BackboneKey:
        return cls(
            backbone_id=backbone_id,
            spec_sha256=sha256_json(spec_json),
            weights_sha256=tuple(sorted(weights_sha256)),
            image_size=image_size,
            precision=precision,
        )


def content_sha256(path: Path) -> str:
    """The content key of an image file."""
    return sha256_file(path)
