"""A batch of new images' features as `score` sees them, from the feature store where it holds
them for the run's backbone key, else from the run's encoders (and then added to the store when
a writer is given). Used by `predict`, which streams images through."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from iipad_cli.schema.features import FEATURE_FIELDS
from iipad_cli.stages._scoring import RunModels, check_finite_features, encode_for_scoring
from iipad_cli.stages.encoding import backbone_key, feature_shapes
from iipad_cli.store import BackboneKey, FeatureStore, Location, StoreWriter


def store_key(models: RunModels) -> BackboneKey:
    """The store key of the features predict computes: the run's backbone and weights, in the
    precision the encoders run in here (the run's own unless --precision with --force)."""
    return backbone_key(models.backbone.spec, models.features_attrs["weights_sha256"], models.backbone.precision)


def batch_features(
    models: RunModels,
    images: Sequence[torch.Tensor],
    contents: Sequence[str],
    stored: dict[str, Location],
    store: FeatureStore,
    writer: StoreWriter | None,
    labels: Sequence[str],
) -> dict[str, torch.Tensor]:
    """The batch's features as `score` sees them (fp16 values as float32 on the device): read from
    the store for the contents it holds, encoded (and added to the store) for the others."""
    shapes = feature_shapes(models.backbone.spec)
    arrays = {name: np.empty((len(images), *shapes.of(name)), dtype=np.float16) for name in FEATURE_FIELDS}
    encode = [i for i, content in enumerate(contents) if content not in stored]
    if encode:
        fresh = encode_for_scoring(models, [images[i] for i in encode])
        check_finite_features(fresh, [labels[i] for i in encode], "predict")
        for name, values in fresh.items():
            arrays[name][encode] = values.half().cpu().numpy()
        if writer is not None:
            writer.add([contents[i] for i in encode], {name: arrays[name][encode] for name in FEATURE_FIELDS})
    found = [i for i, content in enumerate(contents) if content in stored]
    if found:
        locations = [stored[contents[i]] for i in found]
        for name in FEATURE_FIELDS:
            arrays[name][found] = store.read(locations, name)
    return {name: torch.from_numpy(values).float().to(models.device) for name, values in arrays.items()}
