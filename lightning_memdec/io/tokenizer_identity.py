"""What a tokenizer is, as artefacts record it: a fingerprint of its vocabulary, and the compatibility checks.

Two identities. The vocabulary's (:func:`tokenizer_fingerprint`) says whether two sides' ids mean the same tokens:
what pairs a decoder with a base, a datastore with a corpus. The encoding's (:func:`encoding_fingerprint`) says
whether two tokenizers turn a text into the same ids: what a stage that tokenizes text must reuse its output by (a
tokenizer with another normaliser or BOS rule has the same vocabulary and gives other ids).

Two checks, each defined once and used by every stage and model that pairs artefacts: the same ids
(:func:`check_same_tokenizer`) and an LM head wide enough for them (:func:`check_head_covers_vocab`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from lightning_memdec.io.artifact_dirs import ArtifactError

PATH_SETTINGS = ("name_or_path", "vocab_file", "merges_file", "tokenizer_file", "is_local", "local_files_only")


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the token-string → id map: equal iff two tokenizers agree on every id."""
    vocab = tokenizer.get_vocab()
    payload = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def encoding_fingerprint(tokenizer) -> str:
    """A short hash of what turns text into ids: a fast tokenizer's whole pipeline as ``tokenizers`` serialises it
    (normaliser, pre-tokeniser, model with its merges, post-processor, added tokens), without the padding and
    truncation a call may leave set; for a tokenizer without that backend, its vocabulary, class and settings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # not the Python class: GPT2Tokenizer and TokenizersBackend over one file encode alike
        pipeline = json.loads(backend.to_str())
        pipeline.pop("padding", None), pipeline.pop("truncation", None)
    else:
        scalars = (str, int, float, bool, type(None))
        settings = {k: v for k, v in tokenizer.init_kwargs.items() if isinstance(v, scalars) and k not in PATH_SETTINGS}
        pipeline = {"class": type(tokenizer).__name__, "vocabulary": tokenizer_fingerprint(tokenizer), **settings}
    payload = json.dumps(pipeline, sort_keys=True, ensure_ascii=False)
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
