"""What a tokenizer is, as artefacts record it: a fingerprint of its vocabulary, and the one compatibility check."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from lightning_memdec.io.artifact_dirs import ArtifactError


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the token-string → id map: equal iff two tokenizers agree on every id."""
    vocab = tokenizer.get_vocab()
    payload = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def tokenizer_info(tokenizer, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "vocab_size": len(tokenizer),
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
    }


def describe_tokenizer(info: dict[str, Any]) -> str:
    return f"{info['name']} (vocab {info['vocab_size']}, fp {info['fingerprint'][:8]}…)"


def check_same_tokenizer(a: dict, a_what: str, b: dict, b_what: str) -> None:
    if a["fingerprint"] != b["fingerprint"]:
        raise ArtifactError(
            f"{a_what} was built with tokenizer {describe_tokenizer(a)}, but {b_what} uses "
            f"{describe_tokenizer(b)}; rebuild one of them with the same tokenizer."
        )
