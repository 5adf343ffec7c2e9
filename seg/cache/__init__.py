"""The feature cache, the contract every stage reads: its on-disk format (`format`), the reader
(`reader`, with the raw fast path in `raw_rows`), and the human summary and verification."""

from seg.cache.describe import describe
from seg.cache.reader import CacheSplit, FeatureCache
from seg.cache.verify import verify

__all__ = ["CacheSplit", "FeatureCache", "describe", "verify"]
