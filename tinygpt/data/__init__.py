"""User data in, training data out: document readers (text, JSONL, Parquet, `datasets` on disk)
and packed token shards. See sources.py and shards.py."""

from tinygpt.data.shards import TokenDataset, prepare_shards, token_dtype
from tinygpt.data.sources import DataError, ReadStats, expand_paths, iter_documents, iter_records, require_field

__all__ = [
    "DataError",
    "ReadStats",
    "TokenDataset",
    "expand_paths",
    "iter_documents",
    "iter_records",
    "prepare_shards",
    "require_field",
    "token_dtype",
]
