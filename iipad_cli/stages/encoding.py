"""Images -> the frozen encoders' fp16 features, into a feature store writer, and the facts about
those features that `extract` and `predict` share (their shapes, their store key, their size).

`encode_into_store` is how `extract` encodes, on one process or on each torchrun rank's shard
(`predict` streams its images through `_scoring.encode_for_scoring` instead). It is built for
throughput: batched forward under inference_mode, DataLoader workers decoding the next images
while the model runs. A decoding error, a dead worker or a failed hand-over through shared memory
is a one-line error, never a hang or a traceback.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from rich.progress import Progress, TaskID
from torch.utils.data import DataLoader, get_worker_info
from torch.utils.data import Dataset as TorchDataset

from iipad_cli.config import BackboneSpec
from iipad_cli.data.images import preprocess_image
from iipad_cli.data.layouts import Sample
from iipad_cli.errors import IipadError
from iipad_cli.models.backbone import Backbone
from iipad_cli.schema.features import FEATURE_FIELDS
from iipad_cli.schema.features_writer import FeatureShapes
from iipad_cli.store import BackboneKey, StoreWriter
from iipad_cli.store.writer import row_bytes

# Longest wait for one batch from the decoding workers before giving up (a batch takes well under
# a second to decode; a worker whose hand-over failed would otherwise be waited for forever).
WORKER_TIMEOUT_S = 120


@dataclass(frozen=True)
class _Item:
    """One decoded image (or the one-line error that decoding it raised, carried to the main process)."""

    index: int
    image: torch.Tensor | None
    error: str | None


@dataclass(frozen=True)
class _Batch:
    indices: list[int]
    images: torch.Tensor | None
    error: str | None


class _ImageDataset(TorchDataset):
    """Decodes images in DataLoader workers.

    An IipadError inside a worker would reach the main process wrapped in a multi-line
    traceback, so it travels as data and is re-raised there as the original one-line message.
    """

    def __init__(self, samples: Sequence[Sample], image_size: int) -> None:
        self.samples = list(samples)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> _Item:
        try:
            image, _ = preprocess_image(self.samples[index].path, self.image_size)
        except IipadError as error:
            return _Item(index, None, str(error))
        return _Item(index, image, None)


def _collate(items: list[_Item]) -> _Batch:
    indices = [item.index for item in items]
    for item in items:
        if item.error is not None:
            return _Batch(indices, None, item.error)
    images = torch.stack([item.image for item in items if item.image is not None])
    if get_worker_info() is not None:
        # A worker hands the batch over through shared memory (/dev/shm). Left to the queue's
        # feeder thread, a failure there (full /dev/shm, `ulimit -f`) is only printed and the
        # batch never arrives: the main process waited forever. Allocated here, the failure
        # travels to the main process as a one-line error instead.
        try:
            images.share_memory_()
        except (OSError, RuntimeError) as error:
            reason = str(error).splitlines()[0]
            return _Batch(
                indices,
                None,
                f"a DataLoader worker could not pass decoded images through shared memory ({reason}); "
                "free /dev/shm, raise `ulimit -f`, or rerun with --workers 0",
            )
    return _Batch(indices, images, None)


def _batches(loader: DataLoader) -> Iterator[_Batch]:
    """The loader's batches; a worker that dies (OOM killer, signal) or stops delivering is one
    line within seconds (PyTorch checks its workers every 5 s), never a hang or a traceback."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except RuntimeError as error:
            reason = str(error).splitlines()[0]
            if "DataLoader" not in reason:
                raise
            raise IipadError(
                f"image decoding failed: {reason} (out of memory, or /dev/shm full?); "
                "rerun to resume, with --workers 0 to decode in the main process"
            ) from None
        yield batch


def backbone_key(spec: BackboneSpec, weights_sha256: Sequence[str], precision: str) -> BackboneKey:
    """The store key of this backbone's features (docs/store.md)."""
    return BackboneKey.for_backbone(spec.backbone_id, spec.to_json(), list(weights_sha256), spec.image_size, precision)


def feature_shapes(spec: BackboneSpec) -> FeatureShapes:
    """The per-image shape of each stored feature for this backbone (features.h5, store segments)."""
    patches = spec.num_patches
    return FeatureShapes(
        cls_token=(2, spec.embed_dim),
        qformer=(spec.qformer.num_query_tokens, spec.qformer.hidden),
        vv=(len(spec.vv_layers), patches, spec.embed_dim),
        mem=(len(spec.memory_layers), patches, spec.vision_width),
    )


def fp16_features(backbone: Backbone, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Preprocessed images (N, 3, S, S) -> each stored feature, rounded to the fp16 that the
    store and features.h5 hold, on the backbone's device. `extract` stores these and `predict`
    scores them, which is why a test image gets the same map through either."""
    with torch.inference_mode():
        encoded = backbone.encode_images(images.to(backbone.device))
        return {name: getattr(encoded, name).half() for name in FEATURE_FIELDS}


def bytes_per_image(shapes: FeatureShapes, resolution: int) -> int:
    """fp16 features + the test mask + room for the strings and the chunk index, per image."""
    return row_bytes(shapes.by_field()) + resolution * resolution + 1024


def _check_finite(features: dict[str, np.ndarray], samples: Sequence[Sample]) -> None:
    for name, values in features.items():
        finite = np.isfinite(values.reshape(values.shape[0], -1)).all(axis=1)
        if not finite.all():
            bad = samples[int(np.argmin(finite))]
            raise IipadError(f"{bad.path}: non-finite {name} features (NaN/Inf, or beyond the fp16 range)")


@dataclass
class Throughput:
    """Images done since the loop started, shown as images/s on the progress bar."""

    bar: Progress
    task: TaskID
    started: float
    images: int = 0

    @property
    def rate(self) -> float:
        return self.images / max(time.perf_counter() - self.started, 1e-9)

    def advance(self, images: int) -> None:
        self.images += images
        self.bar.update(self.task, advance=images, rate=f"{self.rate:.2f} images/s")


def encode_into_store(
    writer: StoreWriter,
    samples: Sequence[Sample],
    contents: Sequence[str],
    backbone: Backbone,
    batch_size: int,
    workers: int,
    on_batch: Callable[[int], None] = lambda images: None,
) -> None:
    """Encode `samples` (whose file sha256s are `contents`) and add their fp16 features to the store.

    The seam for a distributed extract: each torchrun rank calls this on its shard with a writer
    of its own, so ranks never share a segment file.
    """
    loader = DataLoader(
        _ImageDataset(samples, backbone.spec.image_size),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        timeout=WORKER_TIMEOUT_S if workers else 0,
    )
    for batch in _batches(loader):
        if batch.error is not None:
            raise IipadError(batch.error)
        assert batch.images is not None
        features = {name: values.cpu().numpy() for name, values in fp16_features(backbone, batch.images).items()}
        _check_finite(features, [samples[i] for i in batch.indices])
        writer.add([contents[i] for i in batch.indices], features)
        on_batch(len(batch.indices))
