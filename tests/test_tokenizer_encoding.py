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
from lightning_memdec.evaluation.settings import Audit, EvaluateMixing, Scoring
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


def test_the_encoding_fingerprint_is_the_pipeline_s_not_the_python_class_s(tmp_path):
    """The same tokenizer.json loaded as GPT2Tokenizer (what a Hub GPT-2's config names) and as the shipped
    TokenizersBackend encodes alike: one fingerprint (the class name made them two: --general.text refused the pair)."""
    from lightning_memdec.io.embedded import ASSETS

    shutil.copytree(ASSETS / "tokenizers" / "gpt2", tmp_path / "hub-like")
    config = json.loads((tmp_path / "hub-like" / "tokenizer_config.json").read_text())
    (tmp_path / "hub-like" / "tokenizer_config.json").write_text(
        json.dumps(config | {"tokenizer_class": "GPT2Tokenizer"})
    )
    shipped, hub_like = load_tokenizer("gpt2"), load_tokenizer(str(tmp_path / "hub-like"))
    assert type(shipped) is not type(hub_like)
    text = " ".join(Corpus.__doc__.split()) + " Hello World, ÀÉÎ 123"
    assert shipped(text)["input_ids"] == hub_like(text)["input_ids"]
    assert encoding_fingerprint(shipped) == encoding_fingerprint(hub_like)


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
    decoder = save_tiny(tmp_path / "memdec", n_embd=16, n_layer=1, seed=1)
    scoring = Scoring(batch_size=4, window=32, stride=16, max_tokens=200)
    common = {
        "test": "embedded:biomed/test",
        "scoring": scoring,
        "memdec": str(decoder),
        "mix": EvaluateMixing(lmbda=0.4),
        "audit": Audit(overlap_with=["embedded:biomed/valid"], overlap_ngram=3),  # its figures: of each encoding
    }
    both = evaluate(bases=[str(upper), str(lower)], out=tmp_path / "both", **common)
    rows = {row["base"]: row for row in both["rows"]}
    alone = evaluate(bases=[str(lower)], out=tmp_path / "alone", **common)["rows"][0]
    assert rows["lower"]["base_ppl"] != pytest.approx(rows["upper"]["base_ppl"], rel=1e-3)
    # its own ids: the base's, the decoder's (cached per encoding) and the overlap audit's figures are the lone run's
    assert json.dumps(rows["lower"], sort_keys=True) == json.dumps(alone, sort_keys=True)  # NaN intervals included


def test_downstream_scores_each_base_s_decoder_column_on_its_own_encoding_of_the_prompts(tmp_path):
    """The decoders' prompt scores were cached by the vocabulary: a second base behind a lowercasing tokenizer got
    the first base's MemDec scores (of other ids). Its cells equal a run with it alone."""
    from test_downstream import TEXTS, write_task_folder

    from lightning_memdec.evaluation.downstream import downstream
    from lightning_memdec.evaluation.settings import Bootstrap, Prompts

    upper = save_tiny(tmp_path / "upper", n_embd=16, n_layer=1)
    lower = tmp_path / "lower"
    shutil.copytree(upper, lower)
    lowercasing_gpt2(lower)
    decoder = save_tiny(tmp_path / "memdec", n_embd=16, n_layer=1, seed=1)
    entry = {"template": "{text} It was", "domain_premise": " It was", "labels": ["negative", "positive"],
             "verbalizers": [[" terrible", " bad"], [" great", " good"]]}  # fmt: skip
    records = [{"id": i, "input": {"text": t.upper()}, "label": i % 2} for i, t in enumerate(TEXTS)]
    folder = write_task_folder(tmp_path / "tasks", entry, records, dev=False)
    common = dict(memdec=str(decoder), prompts=Prompts(device="cpu"), bootstrap=Bootstrap(resamples=10))
    both = downstream([str(folder)], [str(upper), str(lower)], tmp_path / "both", **common)["accuracy"]["toy"]
    alone = downstream([str(folder)], [str(lower)], tmp_path / "alone", **common)["accuracy"]["toy"]
    cell = f"{lower} + MemDec"
    assert json.dumps(both[cell], sort_keys=True) == json.dumps(alone[cell], sort_keys=True)

    def scores(out) -> list[dict]:  # per example: the classes' DCPMI scores (the accuracy of 5 examples is coarse)
        lines = (json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines())
        return [line["scores"] for line in lines if line["system"] == cell]

    assert scores(tmp_path / "both") == scores(tmp_path / "alone") != []


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
