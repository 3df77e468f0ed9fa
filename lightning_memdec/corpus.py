"""Token corpora (text → token memmap + document offsets) and the position windows every stage shares.

Positions: position ``i`` is the context ending at token ``i``; its next token is ``i + 1``. A corpus of
``T`` tokens has ``T - 1`` positions. Datastore entries, kNN targets and perplexity terms are all
indexed by position, so stages align by index with no lookup table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lightning_memdec.artifacts import (
    ArtifactError,
    base_meta,
    open_checked,
    publish,
    read_meta,
    sha256_file,
    start_work_dir,
    tokenizer_info,
)
from lightning_memdec.assets import load_tokenizer, read_documents, resolve_text

TOKENS = "tokens.npy"
DOC_OFFSETS = "doc_offsets.npy"


@dataclass(frozen=True)
class Windows:
    """Sliding windows over positions: window ``j`` covers positions ``[start[j], start[j] + length)``
    and scores (carries loss / perplexity for) its local positions ``[score_from[j], length)``.

    Every position is scored exactly once; a scored position outside the first window has at least
    ``length - stride + 1`` tokens of context. The last window is moved back to end at the corpus end so
    all windows are full length.
    """

    starts: np.ndarray
    score_from: np.ndarray
    length: int

    def __len__(self) -> int:
        return len(self.starts)

    def scored_positions(self, j: int) -> np.ndarray:
        return np.arange(self.starts[j] + self.score_from[j], self.starts[j] + self.length)


def position_windows(num_positions: int, length: int, stride: int) -> Windows:
    if length <= 0 or stride <= 0 or stride > length:
        raise ValueError(f"need 0 < stride <= window, got window={length}, stride={stride}.")
    if num_positions < length:
        raise ArtifactError(
            f"the corpus has {num_positions} positions (tokens - 1), fewer than one window of {length}; "
            f"use a smaller window or more text."
        )
    starts = np.arange(0, num_positions - length + 1, stride, dtype=np.int64)
    if starts[-1] + length < num_positions:
        starts = np.append(starts, num_positions - length)
    ends = starts + length
    prev_ends = np.concatenate([[0], ends[:-1]])
    score_from = (prev_ends - starts).clip(min=0)
    return Windows(starts=starts, score_from=score_from, length=length)


class Corpus:
    """A tokenized corpus directory: ``tokens.npy`` memmap, ``doc_offsets.npy`` and ``meta.json``."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.meta = read_meta(self.dir, kind="corpus")
        n, dtype = self.meta["num_tokens"], self.meta["dtype"]
        self.tokens = open_checked(self.dir, TOKENS, (n,), dtype)
        self.doc_offsets = open_checked(self.dir, DOC_OFFSETS, (self.meta["num_documents"] + 1,), "int64")

    @property
    def tokenizer(self) -> dict:
        return self.meta["tokenizer"]

    @property
    def num_tokens(self) -> int:
        return self.meta["num_tokens"]

    @property
    def num_positions(self) -> int:
        return self.num_tokens - 1

    def window_ids(self, start: int, length: int) -> np.ndarray:
        """Input ids of positions ``[start, start + length)``."""
        return np.asarray(self.tokens[start : start + length], dtype=np.int64)

    def next_tokens(self) -> np.ndarray:
        """The value (next token id) of every position."""
        return np.asarray(self.tokens[1:], dtype=np.int32)


def tokenize(
    text: str | list[str],
    out: Path,
    tokenizer: str = "gpt2",
    max_tokens: int | None = None,
    batch_documents: int = 256,
    overwrite: bool = False,
) -> Path:
    """Tokenize text files into a corpus directory.

    Args:
        text: text files (documents separated by blank lines, ``.txt`` or ``.txt.xz``), or
            ``embedded:<domain>/<split>`` for a shipped corpus (domains general, biomed, law).
        out: output corpus directory.
        tokenizer: Hugging Face tokenizer name or path, or a shipped one (gpt2, gpt-neox-20b).
        max_tokens: keep only the first this many tokens (for quick experiments).
        batch_documents: documents tokenized per call of the fast tokenizer.
        overwrite: replace an existing output.
    """
    text = [text] if isinstance(text, str) else list(text)
    if not text:
        raise ValueError("no input text given; pass --text FILE (or embedded:<domain>/<split>).")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}.")
    paths = [resolve_text(t) for t in text]
    tok = load_tokenizer(tokenizer)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer!r} has no EOS token to separate documents; set tokenizer.eos_token.")
    docs = [d for p in paths for d in read_documents(p)]
    if not docs:  # before the work directory exists, so the corrected rerun starts clean
        raise ArtifactError(f"the input text {[str(p) for p in paths]} holds no documents; give non-empty files.")
    sources = [{"path": str(p), "sha256": sha256_file(p)} for p in paths]
    run_config = {"sources": sources, "tokenizer": tokenizer, "max_tokens": max_tokens}
    work = start_work_dir(out, run_config, overwrite)

    dtype = np.uint16 if len(tok) <= np.iinfo(np.uint16).max + 1 else np.uint32
    pieces = encode_documents(docs, tok, max_tokens, batch_documents, dtype)
    return write_corpus(work, out, pieces, tokenizer_info(tok, tokenizer), sources=sources, max_tokens=max_tokens)


def write_corpus(work: Path, out: Path, documents: list[np.ndarray], tokenizer: dict, **provenance) -> Path:
    """Save token documents (each ending in EOS) as a corpus in ``work`` and publish it at ``out``.

    The one writer of the corpus format: ``tokenize`` and synthetic corpora (benchmarks) go through it.
    ``tokenizer`` is :func:`artifacts.tokenizer_info` of the tokenizer the ids belong to.
    """
    dtype = np.uint16 if tokenizer["vocab_size"] <= np.iinfo(np.uint16).max + 1 else np.uint32
    tokens = np.concatenate(documents).astype(dtype, copy=False)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in documents])]).astype(np.int64)
    np.save(work / TOKENS, tokens)
    np.save(work / DOC_OFFSETS, offsets)
    meta = base_meta(
        "corpus",
        tokenizer=tokenizer,
        num_tokens=int(len(tokens)),
        num_documents=int(len(documents)),
        dtype=np.dtype(dtype).name,
        content_sha256=_array_sha(tokens),
        **provenance,
    )
    return publish(work, out, meta)


def encode_documents(
    docs: list[str], tok, max_tokens: int | None = None, batch_documents: int = 256, dtype=np.int64
) -> list[np.ndarray]:
    """Token ids of each document followed by EOS, the last one cut so the total is at most ``max_tokens``."""
    pieces: list[np.ndarray] = []
    total = 0
    for i in tqdm(range(0, len(docs), batch_documents), desc="tokenize", unit="batch", leave=False):
        for ids in tok(docs[i : i + batch_documents], add_special_tokens=False)["input_ids"]:
            ids = np.asarray(ids + [tok.eos_token_id], dtype=dtype)
            if max_tokens is not None:
                ids = ids[: max_tokens - total]
            if len(ids) == 0:
                return pieces
            pieces.append(ids)
            total += len(ids)
    return pieces


def _array_sha(arr: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:16]
