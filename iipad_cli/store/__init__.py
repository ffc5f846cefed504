"""The content-addressed feature store shared by every run (docs/store.md).

Each image goes through the frozen encoders once per backbone key: its features are stored under
(backbone key, sha256 of the image file's bytes) in fp16 HDF5 segments, indexed by an SQLite
database in WAL mode. `extract` looks every needed image up, encodes only the missing ones and
writes a run's `features.h5` as virtual datasets pointing into the segments.

The package does file and database I/O only (no torch): callers hand it fp16 arrays.
"""

from iipad_cli.store.keys import (
    FEATURE_SCHEMA_VERSION,
    PREPROCESSING_VERSION,
    STORE_SCHEMA_VERSION,
    BackboneKey,
    content_sha256,
)
from iipad_cli.store.location import CACHE_ENV, resolve_cache_dir
from iipad_cli.store.store import FeatureStore, Location, StoreInfo, VerifyReport
from iipad_cli.store.writer import StoreWriter

__all__ = [
    "CACHE_ENV",
    "FEATURE_SCHEMA_VERSION",
    "PREPROCESSING_VERSION",
    "STORE_SCHEMA_VERSION",
    "BackboneKey",
    "FeatureStore",
    "Location",
    "StoreInfo",
    "StoreWriter",
    "VerifyReport",
    "content_sha256",
    "resolve_cache_dir",
]
