"""Overlap audit: repeated n-gram spans and verbatim documents against a direct loop; `memdec evaluate` reports
every perplexity on all positions and outside the repeated spans, and warns when too many positions repeat."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from conftest import save_tiny
from transformers import AutoModelForCausalLM

from lightning_memdec.evaluation.evaluate import evaluate, text_tokens
from lightning_memdec.evaluation.overlap import audit_overlap, document_offsets, ngram_hashes
from lightning_memdec.evaluation.settings import Audit, EvaluateMixing, Scoring
from lightning_memdec.inference.sliding_window import lm_scorer, sliding_gold_log_probs
from lightning_memdec.io.embedded import load_tokenizer, resolve_text
from lightning_memdec.io.text_sources import read_documents
from lightning_memdec.kernels.scoring import mix_log_probs, perplexity

EOS = 0


def reference_inside(tokens: np.ndarray, training: list[np.ndarray], n: int) -> np.ndarray:
    """Position i is inside when tokens i and i + 1 lie in one n-gram that also occurs in the training text."""
    grams = {tuple(t[s : s + n]) for t in training for s in range(len(t) - n + 1)}
    starts = {s for s in range(len(tokens) - n + 1) if tuple(tokens[s : s + n]) in grams}
    return np.array([any(s in starts for s in range(i - n + 2, i + 1)) for i in range(len(tokens) - 1)])


def reference_words(tokens: np.ndarray, tok) -> list[tuple[str, int, int]]:
    """(word, first token, last token) of a token stream, char by char: words are runs of alphanumeric chars."""
    out, word, first = [], "", None
    for t, token in enumerate(np.asarray(tokens).tolist()):
        for char in tok.decode([token]).lower():
            if char.isalnum():
                word, first = word + char, t if first is None else first
                last = t
            elif word:
                out.append((word, first, last))
                word, first = "", None
    return out + ([(word, first, last)] if word else [])


def reference_inside_words(tokens: np.ndarray, training: list[np.ndarray], tok, n: int, m: int) -> np.ndarray:
    """Exact n-token spans or m-word spans (lower-cased, punctuation and whitespace dropped) found in training."""
    inside = reference_inside(tokens, training, n)
    grams = set()
    for stream in training:
        words = [w for w, _, _ in reference_words(stream, tok)]
        grams |= {tuple(words[s : s + m]) for s in range(len(words) - m + 1)}
    words = reference_words(tokens, tok)
    for s in range(len(words) - m + 1):
        if tuple(w for w, _, _ in words[s : s + m]) in grams:
            inside[words[s][1] : words[s + m - 1][2]] = True  # positions predicting a token inside the span
    return inside


def with_eos(*docs: np.ndarray) -> np.ndarray:
    return np.concatenate([np.append(d, EOS) for d in docs])


@pytest.mark.parametrize("streams", [1, 2])
def test_audit_equals_a_direct_loop_on_planted_duplicates(streams):
    """``streams`` 2: the training text in two streams (the kNN corpus and a datastore's, or --audit.overlap_with a b),
    the copied span in the first and a verbatim document in the second: every stream is audited."""
    rng = np.random.default_rng(0)
    train_docs = [rng.integers(1, 50, size=int(m)) for m in rng.integers(20, 60, size=8)]
    fresh = [rng.integers(1, 50, size=30) for _ in range(3)]
    spliced = np.concatenate([fresh[0][:5], train_docs[2][3:15], fresh[1][:7]])  # a 12-token copied span
    test_docs = [train_docs[1], fresh[2], spliced, train_docs[5], fresh[0]]
    tokens = with_eos(*test_docs)
    training = [with_eos(*train_docs)] if streams == 1 else [with_eos(*train_docs[:4]), with_eos(*train_docs[4:])]
    for n in (4, 8, 12, 13):
        audit = audit_overlap(tokens, document_offsets(tokens, EOS), training, EOS, n)
        np.testing.assert_array_equal(audit.inside, reference_inside(tokens, training, n))
        assert audit.documents == 5 and audit.documents_verbatim == 2
    assert audit_overlap(tokens, document_offsets(tokens, EOS), training, EOS, 12).inside.sum() > (
        audit.inside.sum()  # the 12-token span counts at n = 12, not at 13
    )


def reformatted(text: str) -> str:
    """The same words as ``text``, in other case, punctuation and whitespace (some joined by underscores, as in
    identifiers): what exact token n-grams miss."""
    words = [w.strip(".,;:()[]") for w in text.split()]
    cased = [w.upper() if i % 3 == 0 else w for i, w in enumerate(words)]
    return "".join(w + ("_" if i % 5 == 4 else "  ") for i, w in enumerate(cased)).strip("_ ")


def test_near_duplicates_are_flagged_as_a_direct_word_loop_finds_them():
    """Training text reformatted (case, punctuation, whitespace) inside a test document: the word spans flag it, as
    a char-by-char reference does; exact token spans alone miss most of it; unrelated text is not flagged."""
    from lightning_memdec.evaluation.overlap import normalised_pieces, words_for

    tok = load_tokenizer("gpt2")
    train_docs = read_documents(resolve_text("embedded:biomed/train"))[:6]
    test_docs = read_documents(resolve_text("embedded:biomed/test"))[:3]
    copied = reformatted(" ".join(train_docs[4].split()[:80]))
    planted = [test_docs[0], f"{test_docs[1]} {copied} {test_docs[2]}"]
    training = [with_eos(*(np.asarray(tok(d)["input_ids"]) for d in train_docs))]
    tokens = with_eos(*(np.asarray(tok(d)["input_ids"]) for d in planted))
    eos = tok.eos_token_id
    offsets = document_offsets(tokens, eos)
    n = 32
    audit = audit_overlap(tokens, offsets, training, eos, n, normalised_pieces(tok))
    assert audit.ngram_words == words_for(n) == 24
    np.testing.assert_array_equal(audit.inside, reference_inside_words(tokens, training, tok, n, 24))
    copy_tokens = len(tok(" " + copied)["input_ids"])
    assert audit.inside.sum() >= 0.9 * copy_tokens  # the reformatted copy, nearly all of it
    assert audit.inside.sum() <= copy_tokens + 2  # and nothing of the unrelated documents
    exact_only = audit_overlap(tokens, offsets, training, eos, n)
    assert exact_only.inside.sum() < 0.1 * copy_tokens and exact_only.ngram_words is None


def test_a_word_ending_on_a_token_s_first_character_ends_its_span_there():
    """A toy vocabulary where "beta" is "bet" + "a.": the repeated run "x y beta" spans tokens 0..3, so the positions
    predicting tokens 1, 2 and 3 are inside it (by hand)."""
    pieces = np.array(["x ", "y ", "bet", "a.", " z", " w", "<eos>", "x", " y", " beta", " q"], dtype=object)
    split = np.array([0, 1, 2, 3, 4, 5, 6])  # "x y beta. z w<eos>"
    training = [np.array([7, 8, 9, 10, 6])]  # "x y beta q<eos>": the same three words, other tokens
    audit = audit_overlap(split, document_offsets(split, 6), training, eos_id=6, n=4, pieces=pieces)
    assert audit.inside.astype(int).tolist() == [1, 1, 1, 0, 0, 0]


def test_the_overlap_warning_is_for_a_share_above_its_threshold():
    from lightning_memdec.evaluation.overlap import WARN_SHARE, OverlapAudit

    inside = np.zeros(100, bool)
    inside[0] = True  # 1 of 100 positions: a share of exactly 0.01
    assert WARN_SHARE == 0.01 and OverlapAudit(inside, 1, 0, 32).summary()["warning"] is False
    inside[1] = True
    assert OverlapAudit(inside, 1, 0, 32).summary()["warning"] is True


def test_a_whole_corpus_split_counts_its_documents(tmp_path):
    """A corpus directory scored whole: its last offset is the split's length, which is no document boundary."""
    from lightning_memdec.evaluation.overlap import split_document_offsets
    from lightning_memdec.io.token_corpus import Corpus, tokenize

    (tmp_path / "split.txt").write_text("First document here.\n\nSecond one, a little longer.\n\nThird.\n")
    corpus = tokenize([str(tmp_path / "split.txt")], tmp_path / "corpus", "gpt2")
    tokens = np.asarray(Corpus(corpus).tokens)
    offsets = split_document_offsets(corpus, tokens, eos_id=50256)
    assert offsets.tolist() == np.asarray(Corpus(corpus).doc_offsets).tolist()
    assert audit_overlap(tokens, offsets, [], eos_id=50256, n=4).summary()["documents"] == 3


def test_ngram_hashes_are_equal_exactly_for_equal_ngrams():
    tokens = np.array([5, 1, 2, 3, 5, 1, 2, 3, 9, 50000, 0, 1])
    h = ngram_hashes(tokens, 4)
    grams = [tuple(tokens[s : s + 4]) for s in range(len(tokens) - 3)]
    for a in range(len(grams)):
        for b in range(len(grams)):
            assert (h[a] == h[b]) == (grams[a] == grams[b])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        ngram_hashes(tokens, 1)


def test_evaluate_reports_overlap_and_perplexities_outside_it(tmp_path, tiny_gpt2, caplog):
    train_docs = read_documents(resolve_text("embedded:biomed/train"))[:12]
    test_docs = read_documents(resolve_text("embedded:biomed/test"))[:4]
    copied = " ".join(train_docs[7].split()[:60])
    planted = [train_docs[3], test_docs[0], train_docs[9], f"{test_docs[1]} {copied}", test_docs[2], train_docs[0]]
    (tmp_path / "train.txt").write_text("\n\n".join(train_docs) + "\n")
    (tmp_path / "test.txt").write_text("\n\n".join(planted) + "\n")
    decoder = save_tiny(tmp_path / "decoder", seed=7)
    with caplog.at_level(logging.WARNING, logger="lightning_memdec.evaluation.row_figures"):
        report = evaluate(
            bases=[str(tiny_gpt2)],
            test=str(tmp_path / "test.txt"),
            memdec=str(decoder),
            out=tmp_path / "r",
            mix=EvaluateMixing(lmbda=0.4),
            audit=Audit(overlap_with=[str(tmp_path / "train.txt")]),
            scoring=Scoring(batch_size=4, window=32, stride=16),
        )
    tok = load_tokenizer("gpt2")
    tokens = text_tokens(tmp_path / "test.txt", tok)
    inside = reference_inside_words(tokens, [text_tokens(tmp_path / "train.txt", tok)], tok, 32, 24)
    audit = report["overlap"]["test"]
    assert audit["documents"] == 6 and audit["documents_verbatim"] == 3
    assert audit["positions_inside"] == inside.sum() and audit["positions"] == len(tokens) - 1
    assert audit["share_inside"] == pytest.approx(inside.mean()) and audit["warning"] is True
    assert "repeat 32-token (or 24-word normalised) spans" in caplog.text
    # both perplexities of each row against the direct computation
    b = sliding_gold_log_probs(tokens, 32, 16, 4, lm_scorer(AutoModelForCausalLM.from_pretrained(tiny_gpt2), 50257))
    d = sliding_gold_log_probs(tokens, 32, 16, 4, lm_scorer(AutoModelForCausalLM.from_pretrained(decoder), 50257))
    mixed = mix_log_probs(torch.as_tensor(b["lm"]), torch.as_tensor(d["lm"]), 0.4).numpy()
    row = report["rows"][0]
    outside = row["outside_overlap"]["ppl"]
    assert row["base_ppl"] == pytest.approx(perplexity(b["lm"]), rel=1e-6)
    assert outside["base_ppl"] == pytest.approx(perplexity(b["lm"][~inside]), rel=1e-6)
    assert row["memdec_ppl"] == pytest.approx(perplexity(mixed), rel=1e-6)
    assert outside["memdec_ppl"] == pytest.approx(perplexity(mixed[~inside]), rel=1e-6)
    assert outside["memdec_alone_ppl"] == pytest.approx(perplexity(d["lm"][~inside]), rel=1e-6)
    assert "Overlap audit" in (tmp_path / "r" / "report.md").read_text()


def test_the_audit_reads_the_training_corpus_a_decoder_names(tmp_path, biomed_corpus, biomed_datastore):
    """`memdec evaluate --memdec DIR` without a kNN datastore audited nothing ("not audited"), though the decoder's
    meta.json (a `memdec fit` export) names the corpus its targets came from."""
    from lightning_memdec.evaluation.row_figures import overlap_references

    decoder = tmp_path / "memdec"
    decoder.mkdir()
    (decoder / "meta.json").write_text(json.dumps({"kind": "memory_decoder", "corpus": str(biomed_corpus)}))
    assert overlap_references(None, None, [], [str(decoder), None, "gpt2"]) == [str(biomed_corpus)]
    # once, beside a datastore of the same corpus; a given --audit.overlap_with wins
    assert overlap_references(None, None, [str(biomed_datastore)], [str(decoder)]) == [str(biomed_corpus)]
    assert overlap_references("x.txt", None, [], [str(decoder)]) == ["x.txt"]
    # a relative --knn.corpus and the datastore's absolute path to the same corpus: audited once
    relative = os.path.relpath(biomed_corpus)
    assert overlap_references(None, relative, [str(biomed_datastore)], [str(decoder)]) == [relative]
