import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_memdec.cli import stage_functions
from lightning_memdec.io.artifact_dirs import ArtifactError, base_meta, write_json_atomic
from lightning_memdec.io.embedded import load_tokenizer
from lightning_memdec.io.tokenizer_identity import tokenizer_info
from lightning_memdec.training.fit import lightning_cli
from lightning_memdec.training.vocab_transfer import budget_steps, transfer_vocab, vocab_mapping

A_VOCAB = ["[UNK]", "<eos>", "the", "cat", "sat", "-", "on"]
# by hand: copied <|endoftext|> (eos↔eos), cat, the, sat, <unk> (unk↔unk) = 5;
# averaged the-cat (the,-,cat), on-the (on,-,the), dog-cat (-,cat; the unknown "dog" is dropped) = 3;
# fallback <pad> (no counterpart in A), dog (only [UNK] in A) = 2
B_VOCAB = ["<|endoftext|>", "<pad>", "cat", "the", "dog", "the-cat", "on-the", "sat", "<unk>", "dog-cat"]
AVERAGED = {"the-cat": ["the", "-", "cat"], "on-the": ["on", "-", "the"], "dog-cat": ["-", "cat"]}


def word_tokenizer(path: Path, words: list[str], **special) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=special["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(path)
    return path


def trained_decoder(path: Path, global_step: int = 120, **kwargs) -> Path:
    """A tiny decoder directory as `memdec fit` exports it: model, tokenizer, meta.json."""
    save_tiny(path, **kwargs)
    tok = load_tokenizer(str(path))
    write_json_atomic(
        path / "meta.json", base_meta("memory_decoder", global_step=global_step, tokenizer=tokenizer_info(tok, "A"))
    )
    return path


def embedding_names(model) -> set[str]:
    emb = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return {n for n, p in model.state_dict(keep_vars=True).items() if id(p) in emb}


def assert_body_unchanged(src, dst):
    skip = embedding_names(src)
    state = dst.state_dict()
    body = [n for n in src.state_dict() if n not in skip]
    assert body and skip
    for name in body:
        assert torch.equal(src.state_dict()[name], state[name]), name


@pytest.fixture(scope="module")
def handmade(tmp_path_factory):
    root = tmp_path_factory.mktemp("handmade")
    tok_b = word_tokenizer(root / "tok-b", B_VOCAB, unk_token="<unk>", eos_token="<|endoftext|>", pad_token="<pad>")
    src = root / "src"
    word_tokenizer(src, A_VOCAB, unk_token="[UNK]", eos_token="<eos>")
    trained_decoder(src, arch="llama", vocab=len(A_VOCAB), tokenizer=None)  # llama: untied embeddings
    out = transfer_vocab(str(src), str(tok_b), root / "out")
    return {"root": root, "src": src, "tok_b": tok_b, "out": out}


def test_handmade_coverage_counted_by_hand(handmade):
    meta = json.loads((handmade["out"] / "meta.json").read_text())
    assert meta["coverage"] == {
        "total": 10,
        "copied": 5,
        "copied_fraction": 0.5,
        "averaged": 3,
        "averaged_fraction": 0.3,
        "fallback": 2,
        "fallback_fraction": 0.2,
    }
    mapping = vocab_mapping(load_tokenizer(str(handmade["src"])), load_tokenizer(str(handmade["tok_b"])))
    kinds = dict(zip(B_VOCAB, mapping.kinds))
    assert [w for w in B_VOCAB if kinds[w] == "copied"] == ["<|endoftext|>", "cat", "the", "sat", "<unk>"]
    assert [w for w in B_VOCAB if kinds[w] == "fallback"] == ["<pad>", "dog"]
    assert meta["kind"] == "memory_decoder" and meta["source_global_step"] == 120 and meta["init"] == "overlap"
    assert meta["source_meta"]["global_step"] == 120 and meta["tied_embeddings"] is False
    assert meta["tokenizer"]["vocab_size"] == 10 and meta["source_tokenizer"]["vocab_size"] == 7


def test_handmade_rows_copied_averaged_and_fallback(handmade):
    src = AutoModelForCausalLM.from_pretrained(handmade["src"])
    dst = AutoModelForCausalLM.from_pretrained(handmade["out"])
    assert dst.config.vocab_size == 10 and dst.config.eos_token_id == 0 and dst.config.pad_token_id == 1
    a = {w: i for i, w in enumerate(A_VOCAB)}
    pairs = {"<|endoftext|>": "<eos>", "cat": "cat", "the": "the", "sat": "sat", "<unk>": "[UNK]"}
    for get in ("get_input_embeddings", "get_output_embeddings"):  # untied: each mapped on its own
        old, new = getattr(src, get)().weight.detach(), getattr(dst, get)().weight.detach()
        assert new.shape == (10, old.shape[1])
        for j, w in enumerate(B_VOCAB):
            if w in pairs:
                expected = old[a[pairs[w]]]
            elif w in AVERAGED:
                expected = torch.stack([old[a[p]] for p in AVERAGED[w]]).mean(0)
            else:
                expected = old.mean(0)
            torch.testing.assert_close(new[j], expected, msg=f"{get} row {w}")
    assert not torch.equal(dst.get_input_embeddings().weight, dst.get_output_embeddings().weight)
    assert_body_unchanged(src, dst)


def test_random_init_differs_from_overlap(handmade):
    out = transfer_vocab(
        str(handmade["src"]), str(handmade["tok_b"]), handmade["root"] / "random", init="random", seed=3
    )
    src = AutoModelForCausalLM.from_pretrained(handmade["src"])
    rand = AutoModelForCausalLM.from_pretrained(out)
    over = AutoModelForCausalLM.from_pretrained(handmade["out"])
    for get in ("get_input_embeddings", "get_output_embeddings"):
        r, o = getattr(rand, get)().weight.detach(), getattr(over, get)().weight.detach()
        assert r.shape == o.shape and not torch.allclose(r, o)
    g = torch.Generator().manual_seed(3)
    expected = torch.randn(10, src.config.hidden_size, generator=g) * src.config.initializer_range
    torch.testing.assert_close(rand.get_input_embeddings().weight.detach(), expected)
    assert json.loads((out / "meta.json").read_text())["init"] == "random"
    assert_body_unchanged(src, rand)


@pytest.fixture(scope="module")
def gpt2_to_neox(tmp_path_factory):
    root = tmp_path_factory.mktemp("neox")
    src = trained_decoder(root / "src", global_step=57)
    out = stage_functions()["transfer-vocab"](str(src), "gpt-neox-20b", root / "out")
    return {"src": src, "out": out}


def test_gpt2_to_neox_copies_shared_tokens_and_averages_the_rest(gpt2_to_neox):
    gpt2, neox = load_tokenizer("gpt2"), load_tokenizer("gpt-neox-20b")
    src = AutoModelForCausalLM.from_pretrained(gpt2_to_neox["src"])
    dst = AutoModelForCausalLM.from_pretrained(gpt2_to_neox["out"])
    tok = AutoTokenizer.from_pretrained(gpt2_to_neox["out"])
    assert tokenizer_info(tok, "x")["fingerprint"] == tokenizer_info(neox, "x")["fingerprint"]
    assert dst.get_output_embeddings().weight is dst.get_input_embeddings().weight  # tied stays tied
    old, new = src.get_input_embeddings().weight.detach(), dst.get_input_embeddings().weight.detach()
    assert new.shape == (50277, 32)

    # both byte-level BPE: a raw vocabulary string shared by the two names the same bytes
    va, added = gpt2.get_vocab(), set(neox.added_tokens_decoder)
    shared = {j: va[t] for t, j in neox.get_vocab().items() if j not in added and t in va}
    b_ids, a_ids = torch.tensor(list(shared)), torch.tensor(list(shared.values()))
    assert torch.equal(new[b_ids], old[a_ids])
    assert torch.equal(new[0], old[50256])  # <|endoftext|> ↔ <|endoftext|> (eos)
    torch.testing.assert_close(new[1], old.mean(0))  # <|padding|>: no counterpart in gpt2

    meta = json.loads((gpt2_to_neox["out"] / "meta.json").read_text())
    cov = meta["coverage"]
    assert cov["total"] == 50277 and cov["copied"] == len(shared) + 1 and cov["fallback"] == 1
    assert cov["copied"] + cov["averaged"] + cov["fallback"] == 50277
    assert cov["copied_fraction"] == pytest.approx((len(shared) + 1) / 50277)

    vb = neox.get_vocab()
    for token in ["ely", "ĠĠ", "âĢĻ"]:  # not in gpt2's vocabulary: mean of their gpt2 pieces
        j = vb[token]
        assert token not in va
        pieces = gpt2.encode(neox.convert_tokens_to_string([token]), add_special_tokens=False)
        assert len(pieces) > 1
        torch.testing.assert_close(new[j], old[pieces].mean(0))
    j = 50276  # an added token of literal spaces ("  "): gpt2 has no such token either
    torch.testing.assert_close(new[j], old[gpt2.encode("  ")].mean(0))

    assert_body_unchanged(src, dst)
    ids = torch.as_tensor(tok("A memory decoder.")["input_ids"])[None]
    assert dst(ids).logits.shape == (1, ids.shape[1], 50277)
    assert dst.config.eos_token_id == 0 and meta["source_global_step"] == 57


def test_unloadable_tokenizer_and_untrained_source_write_nothing(tmp_path, gpt2_to_neox):
    (tmp_path / "not-a-tokenizer").mkdir()
    with pytest.raises(ArtifactError, match="cannot load the target tokenizer"):
        transfer_vocab(str(gpt2_to_neox["src"]), str(tmp_path / "not-a-tokenizer"), tmp_path / "out")
    bare = save_tiny(tmp_path / "bare", n_layer=1)
    with pytest.raises(ArtifactError, match="not a trained Memory Decoder.*no meta.json"):
        transfer_vocab(str(bare), "gpt-neox-20b", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    with pytest.raises(ArtifactError, match="already exists"):
        transfer_vocab(str(gpt2_to_neox["src"]), "gpt-neox-20b", gpt2_to_neox["out"])


def test_budget_is_a_fraction_of_the_source_run(gpt2_to_neox):
    out, src = gpt2_to_neox["out"], gpt2_to_neox["src"]
    assert budget_steps(str(out), 0.1) == round(0.1 * 57) == 6
    assert budget_steps(str(out), 0.001) == 1
    assert budget_steps(str(src), 0.1) is None and budget_steps("gpt2", 0.1) is None
    with pytest.raises(ValueError, match="budget_fraction"):
        budget_steps(str(out), 0.0)

    def max_steps(*extra):
        args = [
            "--model.model",
            str(out),
            "--data.train_corpus",
            "unused",
            "--trainer.accelerator",
            "cpu",
            "--trainer.logger",
            "false",
            *extra,
        ]
        return lightning_cli(args, run=False).trainer.max_steps

    assert max_steps() == 6
    assert max_steps("--budget_fraction", "0.5") == round(0.5 * 57)
    assert max_steps("--trainer.max_steps", "9") == 9  # an explicit budget wins
    assert max_steps("--model.model", str(src)) == -1  # not a transferred decoder: untouched


def test_fit_continues_a_transferred_decoder_for_its_budget(tmp_path, biomed_targets_pair):
    """neox decoder (source run: 30 steps) → gpt2 vocabulary → `memdec fit` trains 0.1 × 30 = 3 steps."""
    src = trained_decoder(
        tmp_path / "src", global_step=30, arch="gpt_neox", n_layer=1, vocab=50277, tokenizer="gpt-neox-20b"
    )
    out = transfer_vocab(str(src), "gpt2", tmp_path / "out")
    root = tmp_path / "run"
    args = [
        "fit",
        "--model.model",
        str(out),
        "--trainer.accelerator",
        "cpu",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(root),
        "--export.dirpath",
        str(root / "hf"),
        "--data.window",
        "64",
        "--data.batch_size",
        "2",
    ]
    for key, value in biomed_targets_pair.items():
        args += [f"--data.{key}", value]
    cli = lightning_cli(args)
    assert cli.trainer.global_step == 3
    assert json.loads((root / "hf" / "meta.json").read_text())["global_step"] == 3


def test_sentencepiece_style_tokens_compare_by_bytes(tmp_path):
    """'▁the' (SentencePiece) and 'Ġthe' (byte-level) are both b' the'; '<0x0A>' byte fallback is b'\\n'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lightning_memdec.training.vocab_transfer import token_bytes

    vocab = {"<unk>": 0, "<0x0A>": 1, "▁the": 2, "▁": 3, "the": 4, "▁cat": 5}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tmp_path / "sp")
    sp = load_tokenizer(str(tmp_path / "sp"))
    assert token_bytes(sp) == [b"<unk>", b"\n", b" the", b" ", b"the", b" cat"]
    gpt2 = load_tokenizer("gpt2")
    mapping = vocab_mapping(gpt2, sp)
    va = gpt2.get_vocab()
    assert mapping.source == [50256, va["Ċ"], va["Ġthe"], va["Ġ"], va["the"], va["Ġcat"]]  # <unk> ↔ gpt2's unk


def test_an_out_that_is_a_file_is_refused_before_the_model_loads(tmp_path, monkeypatch, gpt2_to_neox):
    """`transfer-vocab --out FILE --overwrite true` loaded the decoder first and failed only when writing."""
    import lightning_memdec.hf.loading as loading

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the --out file was refused")

    monkeypatch.setattr(loading, "load_causal_lm", no_model)
    target = tmp_path / "a-file"
    target.write_text("kept")
    with pytest.raises(ArtifactError, match="--out"):
        transfer_vocab(str(gpt2_to_neox["src"]), "gpt-neox-20b", target, overwrite=True)
    assert target.read_text() == "kept"


@pytest.mark.parametrize("changed", ["decoder", "tokenizer"])
def test_a_rerun_with_another_input_at_the_same_path_after_a_stop_inside_publish_is_refused(
    tmp_path, monkeypatch, changed
):
    """The run settings named the decoder and tokenizer B by their paths: a decoder retrained (or a tokenizer saved)
    there after a stop inside publish was called done with the old one's weights. The decoder's weights hash and B's
    fingerprint tell them apart; the same command is still done."""
    from conftest import stopped_inside_publish

    from lightning_memdec.io.artifact_dirs import partial_dir, read_meta

    src, tok_b = tmp_path / "src", tmp_path / "tok-b"
    word_tokenizer(tok_b, B_VOCAB, unk_token="<unk>", eos_token="<|endoftext|>", pad_token="<pad>")
    word_tokenizer(src, A_VOCAB, unk_token="[UNK]", eos_token="<eos>")
    trained_decoder(src, arch="llama", vocab=len(A_VOCAB), tokenizer=None)
    for out in (tmp_path / "same", tmp_path / "changed"):
        stopped_inside_publish(monkeypatch, transfer_vocab, str(src), str(tok_b), out)
        assert not out.exists() and (partial_dir(out) / "meta.json").is_file()
    assert transfer_vocab(str(src), str(tok_b), tmp_path / "same") == tmp_path / "same"  # done: in place
    assert not partial_dir(tmp_path / "same").exists()
    if changed == "decoder":  # `memdec fit` exported a retrained decoder there
        trained_decoder(src, global_step=300, arch="llama", vocab=len(A_VOCAB), tokenizer=None, seed=1)
    else:  # B without its last token
        word_tokenizer(tok_b, B_VOCAB[:-1], unk_token="<unk>", eos_token="<|endoftext|>", pad_token="<pad>")
    with pytest.raises(ArtifactError, match="already exists; pass --overwrite"):
        transfer_vocab(str(src), str(tok_b), tmp_path / "changed")
    assert read_meta(tmp_path / "changed")["source_global_step"] == 120  # the stopped run's, left for --overwrite
    assert read_meta(tmp_path / "changed")["coverage"]["total"] == len(B_VOCAB)
