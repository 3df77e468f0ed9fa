"""The token ids of a split to score: a corpus directory, a text file or ``embedded:<domain>/<split>``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lightning_memdec.hf.loading import tokenizer_name
from lightning_memdec.io.embedded import resolve_text
from lightning_memdec.io.text_sources import read_documents
from lightning_memdec.io.token_corpus import Corpus, encode_documents
from lightning_memdec.io.tokenizer_identity import check_same_tokenizer, describe_tokenizer, tokenizer_info


def text_tokens(spec: str | Path, tokenizer, max_tokens: int | None = None, batch_documents: int = 256) -> np.ndarray:
    """Token ids of a corpus directory, a text file or ``embedded:<domain>/<split>``, as ``memdec tokenize`` makes them.

    Text is tokenized on the fly: documents (blank-line separated) each followed by EOS, capped at ``max_tokens``.
    A corpus directory must have been tokenized with ``tokenizer``.
    """
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2 (one scored position), got {max_tokens}.")
    source = text_source(spec, tokenizer)
    if isinstance(source, Corpus):
        tokens = np.asarray(source.tokens[:max_tokens], dtype=np.int64)
    else:
        docs = read_documents(source)
        if tokenizer.eos_token_id is None:
            info = tokenizer_info(tokenizer, tokenizer_name(tokenizer))
            raise ValueError(f"tokenizer {describe_tokenizer(info)} has no EOS token to separate documents.")
        pieces = encode_documents(docs, tokenizer, max_tokens, batch_documents)
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    if len(tokens) < 2:
        raise ValueError(f"{spec} holds no text to score (fewer than 2 tokens); give a non-empty text or corpus.")
    return tokens


def text_source(spec: str | Path, tokenizer=None) -> Corpus | Path:
    """The corpus directory or text file ``spec`` names, refused when it is neither (or a corpus of another tokenizer
    than ``tokenizer``, when given): one check, run on every split before any model loads and again when it is read.
    """
    path = Path(str(spec))
    if not path.is_dir():
        return resolve_text(spec)
    corpus = Corpus(path)
    if tokenizer is not None:
        info = tokenizer_info(tokenizer, tokenizer_name(tokenizer))
        check_same_tokenizer(corpus.tokenizer, f"corpus {path}", info, "the base LM")
    return corpus
