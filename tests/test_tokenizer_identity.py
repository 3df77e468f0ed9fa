"""The two tokenizer compatibility checks every stage and model calls, against a direct comparison."""

from __future__ import annotations

import pytest

from lightning_memdec.io.artifact_dirs import ArtifactError
from lightning_memdec.io.embedded import load_tokenizer
from lightning_memdec.io.tokenizer_identity import (
    check_head_covers_vocab,
    check_same_tokenizer,
    tokenizer_fingerprint,
    tokenizer_info,
)


def test_same_tokenizer_iff_same_ids_and_the_refusal_names_both_sides_and_the_fix():
    gpt2, neox = load_tokenizer("gpt2"), load_tokenizer("gpt-neox-20b")
    a, b = tokenizer_info(gpt2, "gpt2"), tokenizer_info(neox, "neox")
    assert gpt2.get_vocab() != neox.get_vocab() and a["fingerprint"] != b["fingerprint"]
    check_same_tokenizer(a, "corpus c", tokenizer_info(load_tokenizer("gpt2"), "again"), "base LM m")  # same ids: ok
    fp_a, fp_b = tokenizer_fingerprint(gpt2)[:8], tokenizer_fingerprint(neox)[:8]
    expected = (
        rf"corpus c uses tokenizer gpt2 \(vocab {len(gpt2)}, fp {fp_a}…\), "
        rf"but base LM m uses neox \(vocab {len(neox)}, fp {fp_b}…\); use a base of the corpus's tokenizer\.$"
    )
    with pytest.raises(ArtifactError, match=expected):
        check_same_tokenizer(a, "corpus c", b, "base LM m", "use a base of the corpus's tokenizer")


@pytest.mark.parametrize("rows, vocab", [(50257, 50257), (50304, 50257), (50000, 50257), (0, 1)])
def test_head_covers_vocab_iff_it_has_at_least_as_many_rows(rows, vocab):
    if rows >= vocab:  # a padded head (more rows) is fine
        check_head_covers_vocab(rows, "the base", vocab, "the tokenizer", "fix it")
        return
    expected = rf"the base's LM head has {rows} rows but the tokenizer has {vocab} tokens; fix it\.$"
    with pytest.raises(ArtifactError, match=expected):
        check_head_covers_vocab(rows, "the base", vocab, "the tokenizer", "fix it")
