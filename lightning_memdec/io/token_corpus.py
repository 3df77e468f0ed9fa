"""Token corpora (text → token memmap + document offsets) and the position windows every stage shares.

Positions: position ``i`` is the context ending at token ``i``; its next token is ``i + 1``. A corpus of
``T`` tokens has ``T - 1`` positions. Datastore entries, kNN targets and perplexity terms are all
indexed by position, so stages align by index with no lookup table.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import multiprocessing
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lightning_memdec.io.artifact_dirs import ArtifactError, base_meta, publish, read_meta, start_work_dir
from lightning_memdec.io.embedded import load_tokenizer
from lightning_memdec.io.npy_rows import NpyAppender, open_checked
from lightning_memdec.io.official_preprocessing import official_groups
from lightning_memdec.io.output_lock import exclusive_output
from lightning_memdec.io.settings import DatasetRows
from lightning_memdec.io.text_pieces import PIECE_CHARS, cuts_are_safe, safe_pieces
from lightning_memdec.io.text_sources import open_documents, open_rows
from lightning_memdec.io.tokenizer_identity import encoding_fingerprint, tokenizer_info

SEPARATIONS = ("eos", "official")
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


@exclusive_output
def tokenize(
    text: str | Path | list[str] | None = None,
    out: Path | None = None,
    tokenizer: str = "gpt2",
    max_tokens: int | None = None,
    batch_documents: int = 256,
    overwrite: bool = False,
    dataset: DatasetRows = DatasetRows(),
    num_proc: int = 1,
    separation: str = "eos",
) -> Path:
    """Tokenize text files or a Hugging Face dataset into a corpus directory, streaming.

    Documents are read, encoded in batches and appended to the output as they come, so memory stays that of a few
    batches whatever the corpus size; the output is the same for any ``num_proc``.

    Args:
        text: text files (documents separated by blank lines, ``.txt`` or ``.txt.xz``), or
            ``embedded:<domain>/<split>`` for a shipped corpus (domains general, biomed, law).
        out: output corpus directory.
        tokenizer: Hugging Face tokenizer name or path, or a shipped one (gpt2, gpt-neox-20b).
        max_tokens: keep only the first this many tokens (for quick experiments; reading stops there;
            --separation official counts the rows first: its grouping depends on their number).
        batch_documents: documents tokenized per call of the fast tokenizer.
        overwrite: replace an existing output.
        dataset: dataset rows (a hub dataset or local files) instead of ``text``.
        num_proc: processes that encode batches (the output does not depend on it).
        separation: ``eos``: an EOS after each document; ``official``: the paper's preprocessing, whose datastores
            ``memdec import-official`` reads: every dataset row tokenized alone (with the tokenizer's own special
            tokens), no EOS, grouped as the official code groups them (see io/official_preprocessing.py).
    """
    if out is None:
        raise ValueError("give the output corpus directory with --out DIR.")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}.")
    if num_proc < 1 or batch_documents < 1:
        raise ValueError(f"num_proc and batch_documents must be at least 1, got {num_proc} and {batch_documents}.")
    if separation not in SEPARATIONS:
        raise ValueError(f"--separation must be one of {SEPARATIONS}, got {separation!r}.")
    rows = (dataset.name, dataset.config, dataset.split, dataset.files, dataset.text_field)
    if separation == "official" and (text or dataset.document_start is not None):
        raise ValueError("--separation official tokenizes dataset rows one by one: give --dataset.name or "
                         "--dataset.files, and no --dataset.document_start (the official preprocessing splits no "
                         "documents).")  # fmt: skip
    text = [text] if isinstance(text, (str, Path)) else text  # one file as a str or a Path
    if separation == "official":
        documents, sources = open_rows(*rows)
    else:
        documents, sources = open_documents(text, *rows, dataset.document_start)
    tok = load_tokenizer(tokenizer)
    if separation == "eos" and tok.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer!r} has no EOS token to separate documents; set tokenizer.eos_token.")
    info = tokenizer_info(tok, tokenizer)  # its vocabulary's fingerprint, not its name: another tokenizer at the path
    # is another run, and so is one of the same vocabulary that encodes text otherwise (a normaliser, a BOS rule); every
    # setting always (one a record lacks is compared, one this run lacks is not: same_settings)
    encoding = encoding_fingerprint(tok)
    run_config = {"sources": sources, "tokenizer": info, "encoding": encoding, "max_tokens": max_tokens,
                  "separation": separation}  # fmt: skip
    work = start_work_dir(out, run_config, overwrite)

    start = time.perf_counter()
    if separation == "official":
        num_rows = sum(1 for _ in open_rows(*rows)[0])
        pieces = at_most(official_groups(encode_rows(documents, tok, batch_documents), num_rows), max_tokens)
    else:
        pieces = encode_stream(documents, tok, max_tokens, batch_documents, num_proc, token_dtype(info["vocab_size"]))
    provenance = {"separation": separation} if separation != "eos" else {}
    out = write_corpus(work, out, pieces, info, sources=sources, max_tokens=max_tokens, encoding=encoding, **provenance)
    meta, seconds = read_meta(out), time.perf_counter() - start
    print(
        f"tokenized {meta['num_documents']:,} documents, {meta['num_tokens']:,} tokens in {seconds:.1f} s: "
        f"{meta['num_tokens'] / seconds:,.0f} tokens/s ({num_proc} process{'es' if num_proc > 1 else ''})",
        flush=True,
    )
    return out


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def write_corpus(work: Path, out: Path, documents: Iterable[np.ndarray], tokenizer: dict, **provenance) -> Path:
    """Save token documents (each ending in EOS, or the official preprocessing's groups) as a corpus in ``work``
    and publish it at ``out``.

    The one writer of the corpus format: ``tokenize`` and synthetic corpora (benchmarks) go through it.
    ``documents`` may be any iterable; each is appended to the files as it comes, so memory holds one at a time.
    ``tokenizer`` is :func:`artifacts.tokenizer_info` of the tokenizer the ids belong to.
    """
    digest, num_documents = hashlib.sha256(), 0
    with NpyAppender(work / TOKENS, token_dtype(tokenizer["vocab_size"])) as tokens:
        with NpyAppender(work / DOC_OFFSETS, np.int64) as offsets:
            offsets.append([0])
            for document in documents:
                digest.update(tokens.append(document))
                offsets.append([tokens.count])
                num_documents += 1
    if tokens.count == 0:
        raise ArtifactError(f"no tokens to write to {out}; give non-empty documents.")
    meta = base_meta(
        "corpus",
        tokenizer=tokenizer,
        num_tokens=tokens.count,
        num_documents=num_documents,
        dtype=tokens.dtype.name,
        content_sha256=digest.hexdigest()[:16],
        **provenance,
    )
    return publish(work, out, meta)


def encode_stream(
    documents: Iterable[tuple[str, bool]],
    tok,
    max_tokens: int | None = None,
    batch_documents: int = 256,
    num_proc: int = 1,
    dtype=np.int64,
) -> Iterator[np.ndarray]:
    """Token ids of each document followed by EOS, lazily and in order, the last one cut so the total is at most
    ``max_tokens`` (documents are then read no further than a few batches past it).

    ``documents`` are ``(text, ends_document)`` pieces (:func:`~lightning_memdec.io.text_sources.open_documents`);
    they are re-cut where the tokenizer gives the ids of the whole (:mod:`~lightning_memdec.io.text_pieces`) and
    encoded one by one, so a huge document costs the tokenizer one piece at a time, and its ids, not its text.
    """
    total, parts = 0, []
    pieces = safe_pieces(documents, cut=cuts_are_safe(tok))
    progress = tqdm(total=max_tokens, desc="tokenize", unit="tok", unit_scale=True, leave=False)
    with progress, contextlib.closing(encoded_batches(pieces, tok, batch_documents, num_proc, dtype)) as batches:
        for batch in batches:
            for ids, ends in batch:
                if max_tokens is not None:
                    ids = ids[: max_tokens - total]
                total += len(ids)
                progress.update(len(ids))
                parts.append(ids)
                full = max_tokens is not None and total >= max_tokens
                if ends or full:
                    document, parts = np.concatenate(parts), []
                    if len(document):
                        yield document
                if full:
                    return


def at_most(pieces: Iterable[np.ndarray], max_tokens: int | None) -> Iterator[np.ndarray]:
    """``pieces`` in order, the last one cut so the total is at most ``max_tokens``; none is read past it."""
    total = 0
    for ids in pieces:
        if max_tokens is not None:
            ids = ids[: max_tokens - total]
        if len(ids):
            total += len(ids)
            yield ids
        if max_tokens is not None and total >= max_tokens:
            return


def encode_rows(rows: Iterable[str], tok, batch_rows: int) -> Iterator[list[int]]:
    """Each row's ids as the official preprocessing has them: ``tok(rows)``, the tokenizer's special tokens, no EOS."""
    rows = iter(rows)
    for batch in iter(lambda: list(itertools.islice(rows, batch_rows)), []):
        yield from tok(batch)["input_ids"]


def encode_documents(
    docs: list[str], tok, max_tokens: int | None = None, batch_documents: int = 256, dtype=np.int64
) -> list[np.ndarray]:
    """:func:`encode_stream` of whole documents in memory, as a list."""
    return list(encode_stream(((doc, True) for doc in docs), tok, max_tokens, batch_documents, dtype=dtype))


def encoded_batches(
    pieces: Iterable[tuple[str, bool]], tok, batch_documents: int, num_proc: int, dtype
) -> Iterator[list[tuple[np.ndarray, bool]]]:
    """``(ids, ends_document)`` of ``batch_documents`` pieces at a time, in order, EOS after a document's last piece;
    with ``num_proc`` > 1 encoded by worker processes, at most two batches per worker in flight, so reading runs only
    that far ahead of writing."""
    batches = bounded_batches(pieces, batch_documents, PIECE_CHARS)
    if num_proc == 1:
        for batch in batches:
            yield with_eos(encode_batch(tok, [text for text, _ in batch], dtype), batch, tok.eos_token_id)
        return
    # fork where there is one: callers' scripts need no `if __name__ == "__main__"` guard and no tokenizer is pickled
    # per worker (if this process already encoded in parallel, the tokenizers library turns its threads off in the
    # children, with a warning: slower, same ids)
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    pool = ProcessPoolExecutor(num_proc, mp_context=context, initializer=_set_worker_tokenizer, initargs=(tok,))
    try:
        pending: deque = deque()
        for batch in batches:
            pending.append((pool.submit(_encode_in_worker, [text for text, _ in batch], dtype), batch))
            if len(pending) >= 2 * num_proc:
                future, done = pending.popleft()
                yield with_eos(future.result(), done, tok.eos_token_id)
        while pending:
            future, done = pending.popleft()
            yield with_eos(future.result(), done, tok.eos_token_id)
    finally:
        pool.shutdown(cancel_futures=True)


def bounded_batches(
    pieces: Iterable[tuple[str, bool]], max_pieces: int, max_chars: int
) -> Iterator[list[tuple[str, bool]]]:
    """Batches of at most ``max_pieces`` pieces that stop once they hold ``max_chars`` characters, so a tokenizer call
    never gets more than about a piece's worth of a huge document (and ``max_tokens`` stops reading near it)."""
    batch, chars = [], 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece[0])
        if len(batch) >= max_pieces or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encode_batch(tok, texts: list[str], dtype) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=dtype) for ids in tok(texts, add_special_tokens=False)["input_ids"]]


def with_eos(ids: list[np.ndarray], pieces: list[tuple[str, bool]], eos: int) -> list[tuple[np.ndarray, bool]]:
    """Each piece's ids, with EOS appended where the piece ends its document."""
    return [(np.append(x, np.asarray([eos], x.dtype)) if ends else x, ends) for x, (_, ends) in zip(ids, pieces)]


_worker_tokenizer = None  # each worker process's copy, set once by the pool's initializer


def _set_worker_tokenizer(tok) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tok


def _encode_in_worker(documents: list[str], dtype) -> list[np.ndarray]:
    return encode_batch(_worker_tokenizer, documents, dtype)
