"""Long documents in bounded pieces, cut only where a tokenizer's output does not change.

A document is tokenized by one call, so one huge line (hundreds of MB without a newline) would be held, with the
tokenizer's per-character bookkeeping, all at once. Readers hand it on as ``(text, ends_document)`` pieces of about
:data:`PIECE_CHARS`; :func:`safe_pieces` re-cuts them before a single space between two non-space characters. A
byte-level BPE's pre-tokenizer (GPT-2, GPT-NeoX: `` ?\\p{L}+``, `` ?\\p{N}+``, ...) starts a new pre-token at such a
space, so encoding the pieces one by one gives the ids of the whole document; :func:`cuts_are_safe` checks that on
probe texts for the tokenizer at hand, and a tokenizer that fails it gets whole documents as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

PIECE_CHARS = 1 << 18  # characters a reader hands on at a time (~50 MB of tokenizer state at most)
PROBES = ("Hello world, it is 2024 .", "x = f(a, b) ; y", "naïve café 東京 über", "don't stop 'em now", "a\tb c")


def safe_cut(text: str) -> int:
    """The last index ``i`` where ``text[i]`` is a space with a non-space character on both sides; 0 when none."""
    i = text.rfind(" ", 1, len(text) - 1)
    while i > 0:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
        i = text.rfind(" ", 1, i)
    return 0


def safe_pieces(pieces: Iterable[tuple[str, bool]], cut: bool = True) -> Iterator[tuple[str, bool]]:
    """``(text, ends_document)`` pieces re-cut at :func:`safe_cut` (the rest carried into the next piece); with
    ``cut=False``, each document joined whole. A document's last piece always ends it."""
    carry: list[str] = []
    for text, ends in pieces:
        carry.append(text)
        if ends:
            yield "".join(carry), True
            carry = []
            continue
        if not cut:
            continue
        joined = "".join(carry)
        at = safe_cut(joined)
        carry = [joined[at:]] if at else [joined]
        if at:
            yield joined[:at], False
    if carry:
        raise ValueError("a stream of document pieces ended inside a document (its last piece must end it).")


def cuts_are_safe(tok) -> bool:
    """Whether encoding the two sides of every :func:`safe_cut` of the probe texts gives the ids of the whole."""
    for text in PROBES:
        whole = tok(text, add_special_tokens=False)["input_ids"]
        for i in (j for j in range(1, len(text) - 1) if safe_cut(text[: j + 2]) == j):
            left, right = tok([text[:i], text[i:]], add_special_tokens=False)["input_ids"]
            if left + right != whole:
                return False
    return True
