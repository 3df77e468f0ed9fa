"""Overlap audit of a test split against a train split (text files or embedded:<domain>/<split>), GPT-2 tokens.

python docs/results/overlap_audit.py --test T --train TR   prints the audit's fields as `name: value` lines. It is
the audit `memdec evaluate` runs: exact token spans of ``ngram`` tokens and, with ``--words true`` (the default),
near-duplicate word spans (case, punctuation and spacing ignored). docs/results/overlap-audit-biomed.txt holds its
output for the old and the de-duplicated embedded biomed splits (before 2026-12-05: exact spans only).
"""

from __future__ import annotations

from jsonargparse import CLI

from lightning_memdec.evaluation.overlap import audit_overlap, document_offsets, normalised_pieces
from lightning_memdec.evaluation.split_tokens import text_tokens
from lightning_memdec.io.embedded import load_tokenizer


def main(test: str, train: str, tokenizer: str = "gpt2", ngram: int = 32, words: bool = True) -> None:
    tok = load_tokenizer(tokenizer)
    test_tokens, train_tokens = text_tokens(test, tok), text_tokens(train, tok)
    offsets, pieces = document_offsets(test_tokens, tok.eos_token_id), normalised_pieces(tok) if words else None
    audit = audit_overlap(test_tokens, offsets, [train_tokens], tok.eos_token_id, ngram, pieces)
    print(f"test: {test}\ntrain: {train}\ntrain_tokens: {len(train_tokens)}")
    for name, value in audit.summary().items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    CLI(main, as_positional=False)
