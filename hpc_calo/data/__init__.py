"""The Zarr pair store that training reads: layout, reader and the sharded loader."""

from hpc_calo.data.store import FORMAT, FORMAT_VERSION, PairStore, ShardedLoader, open_store

__all__ = ["FORMAT", "FORMAT_VERSION", "PairStore", "ShardedLoader", "open_store"]
