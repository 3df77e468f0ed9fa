"""What a tokenizer is, as artefacts record it: a fingerprint of its vocabulary, and the compatibility checks.

Two checks, each defined once and used by every stage and model that pairs artefacts: the same ids
(:func:`check_same_tokenizer`) and an LM head wide enough for them (:func:`check_head_covers_vocab`).
"""

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


def check_same_tokenizer(
    a: dict, a_what: str, b: dict, b_what: str, fix: str = "rebuild one of them with the same tokenizer"
) -> None:
    """Refuse two sides whose ids mean different tokens (``a``/``b`` as :func:`tokenizer_info` gives them).

    The message names both sides, both tokenizers and ``fix``.
    """
    if a["fingerprint"] != b["fingerprint"]:
        raise ArtifactError(
            f"{a_what} uses tokenizer {describe_tokenizer(a)}, but {b_what} uses {describe_tokenizer(b)}; {fix}."
        )


def check_head_covers_vocab(rows: int, model_what: str, vocab: int, vocab_what: str, fix: str) -> None:
    """Refuse an LM head of fewer rows (output ids) than the tokenizer has tokens; a padded head (more) is fine."""
    if rows < vocab:
        raise ArtifactError(f"{model_what}'s LM head has {rows} rows but {vocab_what} has {vocab} tokens; {fix}.")
