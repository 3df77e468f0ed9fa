import numpy as np
import pytest

from lightning_memdec.artifacts import ArtifactError
from lightning_memdec.assets import load_tokenizer, read_documents, resolve_text
from lightning_memdec.corpus import Corpus, position_windows, tokenize


def test_tokens_are_documents_joined_by_eos(biomed_corpus):
    corpus = Corpus(biomed_corpus)
    tok = load_tokenizer("gpt2")
    docs = read_documents(resolve_text("embedded:biomed/valid"))
    expected = []
    for doc in docs:
        expected += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(expected) >= 3000:
            break
    np.testing.assert_array_equal(corpus.tokens, expected[:3000])
    assert corpus.tokens.dtype == np.uint16
    offsets = np.asarray(corpus.doc_offsets)
    assert offsets[0] == 0 and offsets[-1] == 3000
    # every document but the truncated last one ends with EOS
    assert all(corpus.tokens[e - 1] == tok.eos_token_id for e in offsets[1:-1])
    assert corpus.meta["tokenizer"]["vocab_size"] == 50257


@pytest.mark.parametrize("n,w,s", [(10, 4, 2), (11, 4, 2), (100, 16, 16), (100, 16, 5), (16, 16, 8), (1000, 64, 1)])
def test_windows_score_every_position_once_with_enough_context(n, w, s):
    win = position_windows(n, w, s)
    scored = np.concatenate([win.scored_positions(j) for j in range(len(win))])
    np.testing.assert_array_equal(scored, np.arange(n))
    assert (win.starts + w <= n).all() and (win.starts >= 0).all()
    for j in range(1, len(win)):
        context = win.scored_positions(j) - win.starts[j] + 1
        assert context.min() >= w - s + 1


def test_window_errors():
    with pytest.raises(ArtifactError, match="fewer than one window"):
        position_windows(10, 16, 8)
    with pytest.raises(ValueError, match="stride"):
        position_windows(100, 16, 32)


def test_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tokenize([str(tmp_path / "missing.txt")], tmp_path / "c")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(ArtifactError, match="no documents"):
        tokenize([str(empty)], tmp_path / "c")
    with pytest.raises(ValueError, match="no input text"):
        tokenize([], tmp_path / "c")
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()
    empty.write_text("now there is text.")  # the corrected rerun is not blocked by the failed one
    assert Corpus(tokenize([str(empty)], tmp_path / "c")).num_tokens > 1


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("first document here.\n\nsecond one.")
    out = tokenize([str(text)], tmp_path / "c")
    before = (out / "tokens.npy").read_bytes()
    text.write_text("something else entirely, longer than before.")
    with pytest.raises(ArtifactError, match="already exists"):
        tokenize([str(text)], out)
    assert (out / "tokens.npy").read_bytes() == before
    tokenize([str(text)], out, overwrite=True)
    assert (out / "tokens.npy").read_bytes() != before
    assert Corpus(out).meta["num_documents"] == 1


def test_truncated_memmap_is_refused(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("some real words for a small corpus.\n\nand another document.")
    out = tokenize([str(text)], tmp_path / "c")
    data = (out / "tokens.npy").read_bytes()
    (out / "tokens.npy").write_bytes(data[:-4])
    with pytest.raises(ArtifactError, match="truncated or corrupt|meta.json says"):
        Corpus(out)
