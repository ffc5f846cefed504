"""What the torchrun ranks of `iipad extract` share besides the encoding itself: hashing the
images in shards, each rank's own store writer, the per-rank report for the manifest, and rank 0
indexing the segments that ranks on other nodes sealed (docs/scale.md). In a world of one these
reduce to the single-process extract.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from iipad_cli.config import BackboneSpec
from iipad_cli.data.layouts import Sample
from iipad_cli.distributed import Group, Launch, shard_range
from iipad_cli.pipeline.extract import content_keys
from iipad_cli.schema.features import SPLITS
from iipad_cli.stages.encoding import feature_shapes
from iipad_cli.store import BackboneKey, FeatureStore, StoreWriter
from iipad_cli.store.index import SegmentRecord

# A sealed segment and the content sha256s of its rows, as a rank on another node hands it over.
HandedOver = tuple[SegmentRecord, list[str]]


@dataclass(frozen=True)
class RankReport:
    """What one rank encoded (the manifest's `ranks` list)."""

    rank: int
    device: str
    images_encoded: int
    seconds: float
    cpu_seconds: float
    trunk_shared: bool | None
    segments_handed_over: int = 0  # sealed segments left for rank 0 to index (a rank on another node)

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "device": self.device,
            "images_encoded": self.images_encoded,
            "seconds": round(self.seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
            "trunk_shared": self.trunk_shared,
            "segments_indexed_by_rank_0": self.segments_handed_over,
        }


def sharded_content_keys(group: Group, splits: dict[str, list[Sample]], batch_size: int) -> dict[str, list[str]]:
    """Every image's content sha256, each rank hashing a contiguous shard (reading 10^6 files is
    itself a job worth sharing), gathered in order on every rank."""
    flat = [sample for split in SPLITS for sample in splits[split]]
    shard = shard_range(len(flat), batch_size, group.launch.rank, group.launch.world_size)
    mine = group.collectively(lambda: content_keys(flat[shard.start : shard.stop]))
    keys = [key for part in group.gather(mine) for key in part]
    contents: dict[str, list[str]] = {}
    for split in SPLITS:
        contents[split], keys = keys[: len(splits[split])], keys[len(splits[split]) :]
    return contents


def rank_writer(
    store: FeatureStore,
    key: BackboneKey,
    spec: BackboneSpec,
    launch: Launch,
    sealed: list[HandedOver],
    held: contextlib.ExitStack,
) -> StoreWriter:
    """This rank's own store writer. Ranks on rank 0's node index their sealed segments themselves
    (SQLite WAL: concurrent writers on one host); a rank on another node never opens the index (WAL
    needs every connection on one host) and appends its sealed segments to `sealed` for rank 0,
    keeping their locks (`held`) until rank 0 has indexed them and the run ends. Rank 0 registered
    the backbone key in the index before any rank encodes (`_decide`)."""

    def hand_to_rank_0(record: SegmentRecord, contents: list[str]) -> int:
        sealed.append((record, contents))
        return 0

    writer = StoreWriter(store, key, feature_shapes(spec).by_field(), commit=None if launch.node == 0 else hand_to_rank_0)
    held.callback(writer.release_handed_over)
    return writer


def index_handed_over(store: FeatureStore, handed_over: Sequence[Sequence[HandedOver]]) -> None:
    """Rank 0: index the segments that ranks on other nodes sealed (they never open the index)."""
    for segments in handed_over:
        for record, contents in segments:
            store.index.commit_segment(record, contents)
