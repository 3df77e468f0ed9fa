"""Two tokenizers of one vocabulary that encode text otherwise (here: one lowercases first) are one id space and two
encodings: pairing models checks the vocabulary, and whatever reuses tokenized text must check the encoding."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import save_tiny, stopped_inside_publish
from tokenizers import normalizers

from lightning_memdec.apps.quickstart_stages import check_same_settings
from lightning_memdec.evaluation.downstream import general_text
from lightning_memdec.evaluation.evaluate import evaluate
from lightning_memdec.evaluation.settings import Scoring
from lightning_memdec.evaluation.split_tokens import text_tokens
from lightning_memdec.io.artifact_dirs import ArtifactError, partial_dir
from lightning_memdec.io.embedded import load_tokenizer
from lightning_memdec.io.token_corpus import Corpus, tokenize
from lightning_memdec.io.tokenizer_identity import encoding_fingerprint, tokenizer_fingerprint

TEXT = "embedded:biomed/valid"


def lowercasing_gpt2(path):
    """GPT-2's tokenizer with a lowercasing normaliser in front: the same token → id map, other ids for most text."""
    tok = load_tokenizer("gpt2")
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    tok.save_pretrained(path)
    return load_tokenizer(str(path))


def test_the_encoding_fingerprint_tells_apart_what_the_vocabulary_fingerprint_cannot(tmp_path):
    gpt2, lower = load_tokenizer("gpt2"), lowercasing_gpt2(tmp_path / "lower")
    assert gpt2.get_vocab() == lower.get_vocab() and tokenizer_fingerprint(gpt2) == tokenizer_fingerprint(lower)
    assert gpt2("Hello World")["input_ids"] != lower("Hello World")["input_ids"]
    assert encoding_fingerprint(gpt2) != encoding_fingerprint(lower)
    assert encoding_fingerprint(load_tokenizer("gpt2")) == encoding_fingerprint(gpt2)  # loaded again: the same
    gpt2.pad_token = gpt2.eos_token
    gpt2(["a b", "c"], padding="max_length", max_length=8, truncation=True)  # padding/truncation a call leaves set
    assert encoding_fingerprint(gpt2) == encoding_fingerprint(load_tokenizer("gpt2"))


def test_a_tokenize_rerun_with_a_tokenizer_of_the_same_vocabulary_that_encodes_otherwise_is_refused(
    tmp_path, monkeypatch
):
    """Stopped inside publish, then rerun with the tokenizer at the same path replaced by one of the same vocabulary
    and another normaliser: the vocabulary's fingerprint called it done, with the old tokenizer's ids."""
    tok, out = tmp_path / "tok", tmp_path / "corpus"
    load_tokenizer("gpt2").save_pretrained(tok)
    stopped_inside_publish(monkeypatch, tokenize, [TEXT], out, str(tok), max_tokens=300)
    assert (partial_dir(out) / "meta.json").is_file()
    shutil.rmtree(tok)
    lower = lowercasing_gpt2(tok)
    with pytest.raises(ArtifactError, match="already exists; pass --overwrite"):
        tokenize([TEXT], out, str(tok), max_tokens=300)
    redone = Corpus(tokenize([TEXT], out, str(tok), max_tokens=300, overwrite=True))
    assert redone.tokens[:].tolist() == text_tokens(TEXT, lower, 300).tolist()
    assert redone.meta["encoding"] == encoding_fingerprint(lower)


def test_evaluate_scores_each_base_on_its_own_encoding_of_the_text(tmp_path):
    """Two bases of the same weights, one behind a lowercasing tokenizer: the second's perplexity is of its own ids
    (the split's tokens were cached by the vocabulary's fingerprint: it was scored on the first's)."""
    upper = save_tiny(tmp_path / "upper", n_embd=16, n_layer=1)
    lower = tmp_path / "lower"
    shutil.copytree(upper, lower)
    lowercasing_gpt2(lower)
    scoring = Scoring(batch_size=4, window=32, stride=16, max_tokens=200)
    common = {"test": "embedded:biomed/test", "scoring": scoring}
    both = evaluate(bases=[str(upper), str(lower)], out=tmp_path / "both", **common)
    rows = {row["base"]: row["base_ppl"] for row in both["rows"]}
    alone = evaluate(bases=[str(lower)], out=tmp_path / "alone", **common)["rows"][0]["base_ppl"]
    assert rows["lower"] == pytest.approx(alone, rel=1e-9) and rows["lower"] != pytest.approx(rows["upper"], rel=1e-3)


def test_general_text_needs_bases_that_encode_alike(tmp_path):
    gpt2, lower = load_tokenizer("gpt2"), lowercasing_gpt2(tmp_path / "lower")
    with pytest.raises(ValueError, match="encode text alike"):
        general_text("embedded:general/test", 200, {"a": gpt2, "b": lower}, [], 64, 4)


def test_a_quickstart_rerun_with_another_encoding_is_refused_and_a_record_without_one_is_not(tmp_path):
    settings = {"domain": None, "tokenizer": "tok", "texts": {}, "fingerprints": {}, "encoding": "a" * 16}
    check_same_settings(tmp_path, settings)
    check_same_settings(tmp_path, dict(settings))  # the same: reused
    with pytest.raises(ArtifactError, match="how the tokenizer encodes text differ"):
        check_same_settings(tmp_path, settings | {"encoding": "b" * 16})
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    recorded = {key: value for key, value in settings.items() if key != "encoding"}
    (earlier / "quickstart_settings.json").write_text(json.dumps(recorded))
    check_same_settings(earlier, settings)  # an earlier version's run: the encoding was not recorded, not compared
