"""The embedded corpora are exactly the files their manifest names (assets/corpora/SHA256SUMS)."""

from __future__ import annotations

import hashlib
import lzma
from pathlib import Path

import pytest

from lightning_memdec.io.embedded import ASSETS, EMBEDDED_DOMAINS, SPLITS

CORPORA = ASSETS / "corpora"
MANIFEST = CORPORA / "SHA256SUMS"
#: The project's shared data folder next to the checkout (or next to its worktree folder), when present.
SHARED = next((p / "shared" / "data" for p in Path(__file__).resolve().parents[2:4] if (p / "shared").is_dir()), Path())


def manifest() -> dict[str, str]:
    """``sha256sum`` format: the hash of each file's uncompressed text, by its path without ``.xz``."""
    rows = [line.split("  ", 1) for line in MANIFEST.read_text().splitlines() if line.strip()]
    return {name: digest for digest, name in rows}


def uncompressed(name: str) -> bytes:
    path = CORPORA / name
    return path.read_bytes() if path.is_file() else lzma.decompress((CORPORA / f"{name}.xz").read_bytes())


def test_manifest_lists_every_embedded_file():
    shipped = {str(p.relative_to(CORPORA)).removesuffix(".xz") for p in CORPORA.rglob("*") if p.is_file()}
    assert set(manifest()) == shipped - {"SHA256SUMS"}
    assert {f"{d}/{s}.txt" for d in EMBEDDED_DOMAINS for s in SPLITS} <= set(manifest())


@pytest.mark.parametrize("name", sorted(manifest()))
def test_embedded_file_hash_equals_manifest(name):
    assert hashlib.sha256(uncompressed(name)).hexdigest() == manifest()[name]


@pytest.mark.skipif(not (SHARED / "biomed").is_dir(), reason="the shared data folder is not next to this checkout")
@pytest.mark.parametrize("name", sorted(manifest()))
def test_manifest_equals_the_shared_deduplicated_files(name):
    """The shipped text is the shared, de-duplicated corpus (SOURCES.md), not an older copy."""
    assert hashlib.sha256((SHARED / name).read_bytes()).hexdigest() == manifest()[name]


@pytest.mark.parametrize("domain", ["biomed", "law"])
def test_no_document_is_shared_between_splits(domain):
    """De-duplicated: train, valid and test have no document in common (SOURCES.md, dedupe_splits.py)."""
    docs = {s: {d.strip("\n") for d in uncompressed(f"{domain}/{s}.txt").decode().split("\n\n")} for s in SPLITS}
    assert not docs["train"] & docs["valid"] and not docs["train"] & docs["test"] and not docs["valid"] & docs["test"]
