"""Overlap audit: which scored positions of an evaluated split repeat text the models saw in training.

A test document that also sits in the datastore / training text is retrieved verbatim by kNN-LM (and memorised by a
decoder), so its positions score a perplexity of a few and flatter every retrieval row. This module finds

* the split's documents found whole in the training text (exact token match of a document, EOS excluded), and
* the scored positions inside a long n-gram span (``n`` tokens, default 32) that also occurs in the training text:
  position ``i`` (predicting token ``i + 1``) is flagged when tokens ``i`` and ``i + 1`` both lie inside one such
  n-gram, i.e. when a matched n-gram starts at some ``s`` with ``i − n + 2 ≤ s ≤ i``.

N-grams are compared by a 64-bit polynomial hash (wrapping uint64 arithmetic, vectorised over ``n`` shifted views),
so the training side costs 8 bytes per token: a few million tokens fit in tens of MB.

Given the tokenizer's per-id text (:func:`normalised_pieces`), the audit also flags near-duplicates that exact token
n-grams miss: text reformatted with other whitespace, case or punctuation tokenizes differently. Both sides are read
as words (runs of letters and digits, lower-cased) and a span of :func:`words_for` ``n`` words (¾ of ``n``: about
as much text as ``n`` GPT-2 tokens of English) found in the training text flags the tokens it covers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightning_memdec.io.token_corpus import Corpus

__all__ = [
    "NGRAM",
    "WARN_SHARE",
    "OverlapAudit",
    "audit_overlap",
    "document_offsets",
    "split_document_offsets",
    "ngram_hashes",
    "normalised_pieces",
    "words_for",
]

NGRAM = 32  #: tokens of a span that counts as repeated text
WARN_SHARE = 0.01  #: share of scored positions inside repeated spans above which evaluation warns
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the polynomial hash
_WORD = re.compile(r"[^\W_]+")  # letters and digits; case is folded by normalised_pieces


@dataclass(frozen=True)
class OverlapAudit:
    """The audit of one split: ``inside`` [positions] bool marks positions inside repeated n-gram spans."""

    inside: np.ndarray
    documents: int
    documents_verbatim: int
    ngram: int
    ngram_words: int | None = None  # also normalised word spans of this length (None: exact token spans only)

    @property
    def share(self) -> float:
        return float(self.inside.mean()) if self.inside.size else 0.0

    def summary(self, warn_share: float = WARN_SHARE) -> dict:
        """The report's fields: counts, the share of positions inside repeated spans, and whether it is too high."""
        return {
            "ngram": self.ngram,
            "ngram_words": self.ngram_words,
            "documents": self.documents,
            "documents_verbatim": self.documents_verbatim,
            "positions": int(self.inside.size),
            "positions_inside": int(self.inside.sum()),
            "share_inside": self.share,
            "warn_share": warn_share,
            "warning": self.share > warn_share,
        }


def document_offsets(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """Start of each document and the end ``[docs + 1]``: every document ends with EOS (as tokenized), the last
    one possibly cut short by a token cap."""
    tokens = np.asarray(tokens)
    ends = np.flatnonzero(tokens == eos_id) + 1
    if not ends.size or ends[-1] != len(tokens):
        ends = np.append(ends, len(tokens))
    return np.concatenate([[0], ends]).astype(np.int64)


def split_document_offsets(spec, tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """Document offsets of an evaluated split's ``tokens``: a corpus directory's own ``doc_offsets`` (cut at the
    token cap), else the documents as tokenized from text, each ending in EOS."""
    path = Path(str(spec))
    if not path.is_dir():
        return document_offsets(tokens, eos_id)
    offsets = np.asarray(Corpus(path).doc_offsets, dtype=np.int64)
    inner = offsets[(offsets > 0) & (offsets < len(tokens))]
    return np.concatenate([[0], inner, [len(tokens)]]).astype(np.int64)


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """Hash of every n-gram ``tokens[s : s + n]`` ``[len − n + 1]`` uint64 (empty when the text is shorter)."""
    if n < 2:
        raise ValueError(f"the overlap n-gram length must be at least 2 tokens (a context and a gold token), got {n}.")
    tokens = np.asarray(tokens).astype(np.uint64)
    count = len(tokens) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    out = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):  # wraps modulo 2**64, as intended
            out *= _BASE
            out += tokens[j : j + count] + np.uint64(1)
    return out


def normalised_pieces(tokenizer) -> np.ndarray:
    """Each id's text, lower-cased (``[vocab]`` object array): what the word audit reads a token stream as."""
    ids = [[i] for i in range(len(tokenizer))]
    return np.asarray([piece.lower() for piece in tokenizer.batch_decode(ids)], dtype=object)


def words_for(n: int) -> int:
    """Words of a normalised span that counts as repeated text, for ``n``-token exact spans."""
    return max(2, round(0.75 * n))


def audit_overlap(
    tokens: np.ndarray,
    offsets: np.ndarray,
    training: list[np.ndarray],
    eos_id: int,
    n: int = NGRAM,
    pieces: np.ndarray | None = None,
) -> OverlapAudit:
    """Audit a split (``tokens`` with document ``offsets``) against training token streams (documents ending in EOS);
    with ``pieces`` (:func:`normalised_pieces`) near-duplicates are flagged too."""
    train_hashes = np.unique(np.concatenate([ngram_hashes(t, n) for t in training] or [np.zeros(0, np.uint64)]))
    starts = np.flatnonzero(np.isin(ngram_hashes(tokens, n), train_hashes, assume_unique=False))
    spans = [(starts, starts + n - 1)]
    words = None
    if pieces is not None:
        words = words_for(n)
        spans.append(repeated_word_spans(tokens, training, pieces, words))
    num_positions = len(tokens) - 1
    marks = np.zeros(num_positions + 1, dtype=np.int64)
    for first, last in spans:  # token spans [first, last]: positions first .. last − 1 predict inside them
        np.add.at(marks, np.minimum(first, num_positions), 1)
        np.add.at(marks, np.minimum(last, num_positions), -1)
    inside = np.cumsum(marks)[:num_positions] > 0
    verbatim = _verbatim_documents(tokens, offsets, training, eos_id)
    return OverlapAudit(inside, len(offsets) - 1, verbatim, n, words)


def repeated_word_spans(
    tokens: np.ndarray, training: list[np.ndarray], pieces: np.ndarray, m: int
) -> tuple[np.ndarray, np.ndarray]:
    """Token spans ``(first, last)`` of the split's ``m``-word runs that also occur in the training text."""
    vocabulary: dict[str, int] = {}
    train_hashes = [ngram_hashes(_word_ids(t, pieces, vocabulary)[0], m) for t in training]
    known = np.unique(np.concatenate(train_hashes or [np.zeros(0, np.uint64)]))
    ids, first_token, last_token = _word_ids(tokens, pieces, vocabulary)
    found = np.flatnonzero(np.isin(ngram_hashes(ids, m), known)) if len(ids) >= m else np.zeros(0, np.int64)
    return first_token[found], last_token[found + m - 1]


def _word_ids(tokens: np.ndarray, pieces: np.ndarray, vocabulary: dict[str, int]):
    """The words of a token stream as ids [words], with the token each starts in and the token each ends in."""
    tokens = np.asarray(tokens, dtype=np.int64)
    texts = pieces[tokens]
    ends = np.cumsum([len(t) for t in texts], dtype=np.int64)  # [tokens] char end of each token
    spans = [(match.start(), match.end(), match.group()) for match in _WORD.finditer("".join(texts))]
    if not spans:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    begin, end, words = zip(*spans)
    ids = np.fromiter((vocabulary.setdefault(w, len(vocabulary)) for w in words), np.uint64, len(words))
    first = np.searchsorted(ends, np.asarray(begin), side="right")  # the token holding the word's first char
    last = np.searchsorted(ends, np.asarray(end) - 1, side="right")
    return ids, first, last


def _verbatim_documents(tokens: np.ndarray, offsets: np.ndarray, training: list[np.ndarray], eos_id: int) -> int:
    """How many of the split's documents (EOS excluded) equal a whole training document."""

    def keys(stream: np.ndarray, bounds: np.ndarray) -> set[bytes]:
        stream = np.asarray(stream, dtype=np.int64)
        docs = (stream[a:b] for a, b in zip(bounds[:-1], bounds[1:]))
        return {(d[:-1] if len(d) and d[-1] == eos_id else d).tobytes() for d in docs}

    seen: set[bytes] = set().union(*(keys(t, document_offsets(t, eos_id)) for t in training)) if training else set()
    stream = np.asarray(tokens, dtype=np.int64)
    found = 0
    for a, b in zip(offsets[:-1], offsets[1:]):
        doc = stream[a:b]
        found += (doc[:-1] if len(doc) and doc[-1] == eos_id else doc).tobytes() in seen
    return found
