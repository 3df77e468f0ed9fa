"""Reading finished datastores (keys [N, d] fp16, values [N] int32), without the Lightning stack.

Kept apart from :mod:`lightning_memdec.datastore` (which builds them with Lightning) so that inference-time
users such as kNN-LM import only numpy and FAISS.
"""

from __future__ import annotations

from pathlib import Path

from lightning_memdec.artifacts import ArtifactError, check_same_tokenizer, open_checked, read_meta

KEYS = "keys.npy"
VALUES = "values.npy"


class Datastore:
    """A finished datastore directory: ``keys.npy`` [N, d] fp16, ``values.npy`` [N] int32, ``meta.json``."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.meta = read_meta(self.dir, kind="datastore")
        n, d = self.meta["num_entries"], self.meta["dim"]
        self.keys = open_checked(self.dir, KEYS, (n, d), "float16")
        self.values = open_checked(self.dir, VALUES, (n,), "int32")

    @property
    def tokenizer(self) -> dict:
        return self.meta["tokenizer"]

    @property
    def dim(self) -> int:
        return self.meta["dim"]

    def __len__(self) -> int:
        return self.meta["num_entries"]

    def identity(self) -> dict:
        """What makes two datastores the same entries: corpus content, model and key layer."""
        return {k: self.meta[k] for k in ("corpus_sha256", "model", "layer", "window", "stride", "num_entries")}


def check_compatible(queries: Datastore, store: Datastore) -> None:
    """Queries and store must share tokenizer and key space; the message names both sides."""
    check_same_tokenizer(queries.tokenizer, f"query datastore {queries.dir}", store.tokenizer, f"datastore {store.dir}")
    for field in ("dim", "model", "layer"):
        if queries.meta[field] != store.meta[field]:
            raise ArtifactError(
                f"query datastore {queries.dir} has {field}={queries.meta[field]!r} but datastore {store.dir} has "
                f"{field}={store.meta[field]!r}; build both with the same base LM and key layer."
            )
