"""Reading finished datastores (keys [N, d] fp16, values [N] int32) and kNN targets (CSR), without Lightning.

Kept apart from :mod:`lightning_memdec.stages.datastore` (which builds them with Lightning) so that inference-time
users such as kNN-LM import only numpy and FAISS, and training (which reads targets) needs no FAISS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lightning_memdec.io.artifact_dirs import ArtifactError, read_meta
from lightning_memdec.io.npy_rows import open_checked
from lightning_memdec.io.tokenizer_identity import check_same_tokenizer

KEYS = "keys.npy"
VALUES = "values.npy"
OFFSETS, IDS, PROBS = "offsets.npy", "ids.npy", "probs.npy"
INDEX = "index.faiss"  # in an index directory, beside its meta.json


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
        """What makes two datastores the same entries: corpus content, model (path and weights), key layer, and the
        precision of the forward pass (bf16 keys are other keys: a resume across a rebuild in another precision
        mixed them)."""
        identity = {k: self.meta[k] for k in ("corpus_sha256", "model", "layer", "window", "stride", "num_entries")}
        for optional in ("model_sha256", "precision"):  # datastores of 0.1 and imported ones lack some
            if optional in self.meta:
                identity[optional] = self.meta[optional]
        return identity

    def same_entries(self, other: Datastore) -> bool:
        """Whether ``other`` holds these very entries (the same text keyed by the same weights at the same layer,
        window and stride), whatever path named the model: its keys are then these keys, each its own nearest."""
        mine, theirs = self.identity(), other.identity()
        return identities_match(mine, theirs) and identities_match(theirs, mine)


def identities_match(recorded: dict, identity: dict) -> bool:
    """Whether a datastore ``identity`` has every field a ``recorded`` one holds (one of 0.1 lacks some) equal; the
    model compared by its weights' hash where both have one, not by the path that named it."""
    by_hash = "model_sha256" in recorded and "model_sha256" in identity
    return all(recorded[k] == identity.get(k) for k in recorded if not (by_hash and k == "model"))


def check_compatible(queries: Datastore, store: Datastore) -> None:
    """Queries and store must share tokenizer and key space; the message names both sides."""
    check_same_tokenizer(queries.tokenizer, f"query datastore {queries.dir}", store.tokenizer, f"datastore {store.dir}")
    both_hashed = "model_sha256" in queries.meta and "model_sha256" in store.meta  # 0.1 datastores have no hash
    # the weights' hash names the model whatever path gave it (relative, absolute, a copy); 0.1's: the path only
    for field in ("dim", "layer") + (("model_sha256",) if both_hashed else ("model",)):
        if queries.meta[field] != store.meta[field]:
            raise ArtifactError(
                f"query datastore {queries.dir} has {field}={queries.meta[field]!r} but datastore {store.dir} has "
                f"{field}={store.meta[field]!r}; build both with the same base LM and key layer."
            )


def check_index_matches(index_dir: str | Path, index_meta: dict, store: Datastore) -> None:
    """An index (its meta.json; reading it needs no FAISS) must have been built over exactly this datastore."""
    if not identities_match(index_meta["datastore_identity"], store.identity()):
        raise ArtifactError(
            f"index {index_dir} was built over datastore {index_meta['datastore']}, not over {store.dir} "
            f"(their corpus/model weights/layer/size differ); rebuild the index or pass the matching datastore."
        )


def check_finite_keys(keys: np.ndarray, first_row: int, source: str) -> None:
    """Keys must be finite: a NaN/inf key would surface only at search time, as an unrelated row-id error.

    ``keys`` are consecutive rows starting at ``first_row`` ([..., d]; leading axes flattened in order).
    """
    bad = ~np.isfinite(keys.reshape(-1, keys.shape[-1])).all(axis=1)
    if bad.any():
        raise ArtifactError(
            f"{source}: {int(bad.sum())} keys are NaN or inf, the first at position {first_row + int(bad.argmax())}; "
            "the model's activations at the key layer overflow fp16 (|x| > 65504) or are NaN. Check the model's "
            "weights, or key another --layer."
        )


class Targets:
    """A finished targets directory (CSR: offsets [N+1] int64, ids int32, probs fp16)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.meta = read_meta(self.dir, kind="targets")
        n, nnz = self.meta["num_positions"], self.meta["nnz"]
        self.offsets = open_checked(self.dir, OFFSETS, (n + 1,), "int64")
        self.ids = open_checked(self.dir, IDS, (nnz,), "int32")
        self.probs = open_checked(self.dir, PROBS, (nnz,), "float16")

    def __len__(self) -> int:
        return self.meta["num_positions"]

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return np.asarray(self.ids[lo:hi]), np.asarray(self.probs[lo:hi])


def check_targets_match_corpus(targets: Targets, corpus) -> None:
    """Targets must be for exactly this corpus: same token content, tokenizer and position count."""
    if targets.meta["tokenizer"]["fingerprint"] != corpus.tokenizer["fingerprint"]:
        check_same_tokenizer(
            targets.meta["tokenizer"], f"targets {targets.dir}", corpus.tokenizer, f"corpus {corpus.dir}"
        )
    if targets.meta["corpus_sha256"] != corpus.meta["content_sha256"] or len(targets) != corpus.num_positions:
        raise ArtifactError(
            f"targets {targets.dir} were built for a corpus of {len(targets) + 1} tokens "
            f"(content {targets.meta['corpus_sha256']}), but corpus {corpus.dir} has {corpus.num_tokens} tokens "
            f"(content {corpus.meta['content_sha256']}); build targets for this corpus."
        )
