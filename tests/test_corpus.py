import numpy as np
import pytest

from lightning_memdec.io.artifact_dirs import ArtifactError
from lightning_memdec.io.embedded import load_tokenizer, resolve_text
from lightning_memdec.io.settings import DatasetRows
from lightning_memdec.io.text_sources import read_documents
from lightning_memdec.io.token_corpus import Corpus, position_windows, tokenize


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
    with pytest.raises(ValueError, match="exactly one source"):
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


def test_a_rerun_with_another_tokenizer_at_the_same_path_after_a_stop_inside_publish_is_refused(tmp_path, monkeypatch):
    """The run settings named the tokenizer by its path: a tokenizer saved there after a stop inside publish was
    called done with the old tokenizer's ids. Its fingerprint tells them apart; the same command is still done."""
    import shutil

    from conftest import stopped_inside_publish

    from lightning_memdec.io.artifact_dirs import partial_dir

    text, tok = ["embedded:biomed/valid"], tmp_path / "tok"
    load_tokenizer("gpt2").save_pretrained(tok)
    for out in (tmp_path / "same", tmp_path / "changed"):
        stopped_inside_publish(monkeypatch, tokenize, text, out, str(tok), max_tokens=500)
        assert not out.exists() and (partial_dir(out) / "meta.json").is_file()
    assert tokenize(text, tmp_path / "same", str(tok), max_tokens=500) == tmp_path / "same"  # done: in place
    assert not partial_dir(tmp_path / "same").exists()
    shutil.rmtree(tok)
    load_tokenizer("gpt-neox-20b").save_pretrained(tok)  # another tokenizer at the same path
    with pytest.raises(ArtifactError, match="already exists; pass --overwrite"):
        tokenize(text, tmp_path / "changed", str(tok), max_tokens=500)
    assert Corpus(tmp_path / "changed").tokenizer["vocab_size"] == len(load_tokenizer("gpt2"))  # the stopped run's
    out = tokenize(text, tmp_path / "changed", str(tok), max_tokens=500, overwrite=True)
    assert Corpus(out).tokenizer["vocab_size"] == len(load_tokenizer("gpt-neox-20b"))


def test_truncated_memmap_is_refused(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("some real words for a small corpus.\n\nand another document.")
    out = tokenize([str(text)], tmp_path / "c")
    data = (out / "tokens.npy").read_bytes()
    (out / "tokens.npy").write_bytes(data[:-4])
    with pytest.raises(ArtifactError, match="truncated or corrupt|meta.json says"):
        Corpus(out)


# -- streaming, Hugging Face datasets, several processes -----------------------------------------------------------

BIOMED_DOCS = 40


def reference_tokens(docs: list[str], tok) -> np.ndarray:
    """What a corpus of ``docs`` must hold: each document's ids (no special tokens) followed by EOS."""
    return np.asarray([i for d in docs for i in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])


def write_data_file(path, docs: list[str]):
    """``docs`` as rows of a ``text`` column (plus an ``id`` column) in the format the extension names."""
    import json

    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    table = pa.table({"id": list(range(len(docs))), "text": docs}, schema=schema)
    if path.suffix == ".parquet":
        pyarrow.parquet.write_table(table, path, row_group_size=7)  # several row groups, read one at a time
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
    elif path.suffix == ".arrow":  # the IPC stream format `datasets` itself writes
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=7)
    elif path.suffix == ".csv":
        pyarrow.csv.write_csv(table, path)
    return path


@pytest.fixture(scope="module")
def biomed_docs() -> list[str]:
    return read_documents(resolve_text("embedded:biomed/valid"))[:BIOMED_DOCS]


def test_text_files_stream_documents_by_the_blank_line_rule(tmp_path):
    def reference(text: str) -> list[str]:  # the rule as the whole-file reader applied it
        blocks = text.replace("\r\n", "\n").replace("\r", "\n").split("\n\n")
        return [b.strip("\n") for b in blocks if b.strip()]

    rng = np.random.default_rng(0)
    pieces = ["word", "b ", "\n", "\n", " ", "\r\n", "\r", "\t"]
    for _ in range(500):
        text = "".join(rng.choice(pieces, size=rng.integers(0, 30)))
        (tmp_path / "a.txt").write_bytes(text.encode())
        assert read_documents(tmp_path / "a.txt") == reference(text), repr(text)
    law = resolve_text("embedded:law/valid")
    import lzma

    assert read_documents(law) == reference(lzma.open(law, "rt", encoding="utf-8").read())


def test_write_corpus_streams_to_disk_with_np_save_bytes(tmp_path):
    import hashlib
    import io
    import tracemalloc

    from lightning_memdec.io.artifact_dirs import start_work_dir
    from lightning_memdec.io.token_corpus import write_corpus

    def documents(seed):  # 3M uint16 tokens (6 MB, 24 MB as int64) in 3000 documents, made on the fly
        rng = np.random.default_rng(seed)
        for _ in range(3000):
            yield rng.integers(0, 50256, size=1000).astype(np.int64)

    info = {"name": "gpt2", "vocab_size": 50257, "fingerprint": "x", "eos_token_id": 50256}
    work = start_work_dir(tmp_path / "c", {"test": 1}, overwrite=False)
    tracemalloc.start()
    out = write_corpus(work, tmp_path / "c", documents(0), info, sources=["random"])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000, f"writing held {peak} bytes at once"

    tokens = np.concatenate(list(documents(0))).astype(np.uint16)
    expected = io.BytesIO()
    np.save(expected, tokens)
    assert (out / "tokens.npy").read_bytes() == expected.getvalue()
    expected = io.BytesIO()
    np.save(expected, np.arange(0, 3_000_001, 1000, dtype=np.int64))
    assert (out / "doc_offsets.npy").read_bytes() == expected.getvalue()
    corpus = Corpus(out)
    assert corpus.meta["content_sha256"] == hashlib.sha256(tokens.tobytes()).hexdigest()[:16]
    assert (corpus.num_tokens, corpus.meta["num_documents"]) == (3_000_000, 3000)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".arrow", ".csv"])
def test_data_files_give_the_text_paths_corpus(tmp_path, biomed_docs, suffix, capsys):
    tok = load_tokenizer("gpt2")
    data = write_data_file(tmp_path / f"docs{suffix}", biomed_docs)
    out = tokenize(out=tmp_path / "from-data", batch_documents=8, dataset=DatasetRows(files=[str(data)]))
    corpus = Corpus(out)
    np.testing.assert_array_equal(corpus.tokens, reference_tokens(biomed_docs, tok))
    assert corpus.meta["num_documents"] == BIOMED_DOCS
    assert corpus.meta["sources"][0]["path"] == str(data) and corpus.meta["sources"][0]["text_field"] == "text"
    printed = capsys.readouterr().out
    assert f"tokenized {BIOMED_DOCS} documents, {corpus.num_tokens:,} tokens in " in printed and "tokens/s" in printed

    text = tmp_path / "docs.txt"  # the same documents through the text-file path: the same bytes
    text.write_text("\n\n".join(biomed_docs))
    from_text = tokenize(str(text), tmp_path / "from-text", batch_documents=8)
    for name in ("tokens.npy", "doc_offsets.npy"):
        assert (out / name).read_bytes() == (from_text / name).read_bytes()
    assert corpus.meta["content_sha256"] == Corpus(from_text).meta["content_sha256"]


def test_txt_data_files_are_one_row_per_line_and_max_tokens_cuts(tmp_path, biomed_docs):
    tok = load_tokenizer("gpt2")
    text = tmp_path / "lines.txt"
    text.write_text("\n\n".join(biomed_docs))
    lines = [line for line in text.read_text().split("\n") if line.strip()]
    out = tokenize(out=tmp_path / "c", max_tokens=2500, dataset=DatasetRows(files=[str(text)]))
    np.testing.assert_array_equal(Corpus(out).tokens, reference_tokens(lines, tok)[:2500])
    assert Corpus(out).meta["max_tokens"] == 2500


def test_mixed_formats_are_read_in_order(tmp_path, biomed_docs):
    tok = load_tokenizer("gpt2")
    first = write_data_file(tmp_path / "a.parquet", biomed_docs[:10])
    second = write_data_file(tmp_path / "b.jsonl", biomed_docs[10:25])
    out = tokenize(out=tmp_path / "c", dataset=DatasetRows(files=[str(first), str(second)]))
    np.testing.assert_array_equal(Corpus(out).tokens, reference_tokens(biomed_docs[:25], tok))
    assert [s["path"] for s in Corpus(out).meta["sources"]] == [str(first), str(second)]


def test_document_start_joins_wikitext_rows_into_articles(tmp_path):
    # WikiText as Hugging Face rows (one per line, as the raw files lay them out); articles begin at a level-1
    # heading ` = Title = `, sections at ` = = Section = = ` (written here: the test runs in any checkout)
    lines = []
    for title in ("Du Fu", "Alpha", "Beta = Gamma", "Delta"):
        lines += [f" = {title} = \n", " \n", f" {title} ( born 712 ) was a test article .\n", " \n",
                  " = = Life = = \n", " \n", f" The life of {title} began in 1900 .\n", " \n"]  # fmt: skip
    rows = [""] + [r for row in lines for r in (row, "")]  # the hub's blank rows between lines
    data = write_data_file(tmp_path / "wiki.parquet", rows)
    out = tokenize(out=tmp_path / "c", dataset=DatasetRows(files=[str(data)], document_start="^ = [^=].* = $"))

    starts = [i for i, r in enumerate(rows) if r.startswith(" = ") and not r.startswith(" = = ")]
    articles = ["\n".join(r.removesuffix("\n") for r in rows[a:b]).strip("\n") for a, b in zip(starts, starts[1:])]
    articles.append("\n".join(r.removesuffix("\n") for r in rows[starts[-1] :]).strip("\n"))
    assert len(articles) == 4 and articles[1].startswith(" = Alpha = \n\n \n\n Alpha ( born 712 )")
    corpus = Corpus(out)
    assert corpus.meta["num_documents"] == len(articles)
    np.testing.assert_array_equal(corpus.tokens, reference_tokens(articles, load_tokenizer("gpt2")))


def test_num_proc_gives_identical_bytes(tmp_path, biomed_docs):
    data = write_data_file(tmp_path / "docs.parquet", biomed_docs)
    runs = {}
    for num_proc, max_tokens in [(1, None), (2, None), (1, 4000), (2, 4000)]:
        out = tmp_path / f"c{num_proc}-{max_tokens}"
        tokenize(
            out=out, batch_documents=3, num_proc=num_proc, max_tokens=max_tokens, dataset=DatasetRows(files=[str(data)])
        )
        runs[num_proc, max_tokens] = [(out / n).read_bytes() for n in ("tokens.npy", "doc_offsets.npy", "meta.json")]
    assert runs[1, None] == runs[2, None] and runs[1, 4000] == runs[2, 4000]
    assert Corpus(tmp_path / "c2-4000").num_tokens == 4000
    text = tokenize("embedded:law/test", tmp_path / "law2", num_proc=2, batch_documents=16, max_tokens=20000)
    law = read_documents(resolve_text("embedded:law/test"))
    np.testing.assert_array_equal(Corpus(text).tokens, reference_tokens(law[:30], load_tokenizer("gpt2"))[:20000])


def test_reading_stops_a_few_batches_past_max_tokens(tmp_path, biomed_docs):
    import itertools

    from lightning_memdec.io.artifact_dirs import start_work_dir
    from lightning_memdec.io.text_sources import row_documents
    from lightning_memdec.io.token_corpus import encode_stream, write_corpus
    from lightning_memdec.io.tokenizer_identity import tokenizer_info

    tok, rows_per_batch, max_tokens = load_tokenizer("gpt2"), 4, 3000
    docs = [biomed_docs[i % BIOMED_DOCS] for i in range(400)]
    needed = int(np.searchsorted(np.cumsum([len(tok(d)["input_ids"]) + 1 for d in docs]), max_tokens)) + 1

    def rows(limit, pulled):  # an endless dataset: reading it whole would never end, so it raises past `limit` batches
        for i in itertools.count():
            if i >= limit:
                raise AssertionError(f"read {i} batches of rows for {needed} documents")
            pulled.append(i)
            yield {"text": [docs[(i * rows_per_batch + j) % len(docs)] for j in range(rows_per_batch)]}

    for num_proc in (1, 2):
        # one batch at a time, or two per worker in flight, plus the one being cut
        limit = -(-needed // rows_per_batch) + (1 if num_proc == 1 else 2 * num_proc + 1)
        pulled = []
        documents = ((d, True) for d in row_documents([(rows(limit, pulled), {"path": "fake.parquet"})], "text", None))
        pieces = encode_stream(documents, tok, max_tokens, batch_documents=rows_per_batch, num_proc=num_proc)
        out = tmp_path / f"c{num_proc}"
        write_corpus(start_work_dir(out, {}, False), out, pieces, tokenizer_info(tok, "gpt2"))
        np.testing.assert_array_equal(Corpus(out).tokens, reference_tokens(docs[:needed], tok)[:max_tokens])
        assert len(pulled) <= limit


def test_dataset_input_errors_come_before_any_work(tmp_path, biomed_docs, monkeypatch):
    import sys

    good = write_data_file(tmp_path / "a.parquet", biomed_docs[:3])
    out = tmp_path / "c"
    with pytest.raises(FileNotFoundError, match="missing.parquet does not exist"):
        tokenize(out=out, dataset=DatasetRows(files=[str(good), str(tmp_path / "missing.parquet")]))
    (tmp_path / "a.xlsx").write_text("x")
    with pytest.raises(ValueError, match=r"unknown format '.xlsx'.*'.parquet'"):
        tokenize(out=out, dataset=DatasetRows(files=[str(tmp_path / "a.xlsx")]))
    with pytest.raises(ValueError, match=r"no column 'body'; its columns are \['id', 'text'\]"):
        tokenize(out=out, dataset=DatasetRows(files=[str(good)], text_field="body"))
    with pytest.raises(ValueError, match="column 'id' of data file .* holds int64, not text"):
        tokenize(out=out, dataset=DatasetRows(files=[str(good)], text_field="id"))
    for name, rows in (("empty.parquet", []), ("empty.jsonl", []), ("blank.jsonl", ["", "  \n", "\n\n"])):
        with pytest.raises(ArtifactError, match="holds no documents"):
            tokenize(out=out, dataset=DatasetRows(files=[str(write_data_file(tmp_path / name, rows))]))
    with pytest.raises(ValueError, match=r"exactly one source.*\['--text', '--dataset.files'\]"):
        tokenize("embedded:biomed/valid", out, dataset=DatasetRows(files=[str(good)]))
    with pytest.raises(ValueError, match="exactly one source"):
        tokenize(out=out)
    with pytest.raises(ValueError, match="--out DIR"):
        tokenize(dataset=DatasetRows(files=[str(good)]))
    with pytest.raises(ValueError, match="hold rows, not blank-line separated text: give them with --dataset.files"):
        tokenize(str(good), out)
    with pytest.raises(ValueError, match="--dataset.document_start splits dataset rows"):
        tokenize("embedded:biomed/valid", out, dataset=DatasetRows(document_start="^ = "))
    with pytest.raises(ValueError, match="not a regular expression"):
        tokenize(out=out, dataset=DatasetRows(files=[str(good)], document_start="("))
    with pytest.raises(ValueError, match="num_proc"):
        tokenize(out=out, num_proc=0, dataset=DatasetRows(files=[str(good)]))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'lightning_memdec\[datasets\]'"):
        tokenize(out=out, dataset=DatasetRows(files=[str(good)]))
    assert not out.exists() and not (tmp_path / "c.partial").exists()


def test_a_row_that_is_not_text_is_named(tmp_path):
    from lightning_memdec.io.text_sources import row_documents

    rows = [{"text": ["fine", None, "also fine"]}, {"text": [3]}]
    documents = row_documents([(rows, {"path": "x.jsonl"})], "text", None)
    assert [next(documents), next(documents)] == ["fine", "also fine"]  # a null row is a blank one
    with pytest.raises(ValueError, match="column 'text' of data file x.jsonl holds int, not text"):
        next(documents)
    with pytest.raises(ValueError, match=r"no column 'text'; its columns are \['body'\]"):
        next(row_documents([([{"body": ["a"]}], {"path": "x.jsonl"})], "text", None))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_cli_tokenizes_data_files_in_several_processes(tmp_path, biomed_docs):
    import os
    import subprocess
    import sys

    first = write_data_file(tmp_path / "a.parquet", biomed_docs[:20])
    second = write_data_file(tmp_path / "b.jsonl", biomed_docs[20:])
    flags = ["--dataset.files", str(first), str(second), "--max_tokens", "6000", "--batch_documents", "4"]
    flags += [
        "--dataset.document_start",
        "^ = [^=].* = $",
        "--num_proc",
        "2",
    ]  # no row matches: both files' rows are one document
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "lightning_memdec", "tokenize"]
    result = subprocess.run([*cli, *flags, "--out", str(tmp_path / "cli")], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokenized 1 documents, 6,000 tokens in" in result.stdout and "tokens/s (2 processes)" in result.stdout
    python = tokenize(
        out=tmp_path / "py",
        max_tokens=6000,
        dataset=DatasetRows(files=[str(first), str(second)], document_start="^ = [^=].* = $"),
    )
    for name in ("tokens.npy", "doc_offsets.npy", "meta.json"):
        assert (tmp_path / "cli" / name).read_bytes() == (python / name).read_bytes()

    hub = [
        *cli,
        "--dataset.name",
        "wikitext",
        "--dataset.config",
        "wikitext-103-raw-v1",
        "--out",
        str(tmp_path / "hub"),
    ]
    result = subprocess.run(hub, capture_output=True, text=True, env=env)
    assert result.returncode != 0 and "offline, give local files with --dataset.files" in result.stderr
    assert not (tmp_path / "hub").exists() and not (tmp_path / "hub.partial").exists()


def long_line(rng, words: int) -> str:
    """One line of words, numbers, punctuation, accents, CJK, double spaces and tabs: the cuts' hard cases."""
    vocab = ["the", "Cat", "2024", "3.14", "naïve", "東京", ",", ".", "(x)", "don't", "  ", "\t", "'em", "über", "--"]
    return " ".join(rng.choice(vocab, size=words))


@pytest.mark.parametrize("tokenizer", ["gpt2", "gpt-neox-20b"])
def test_a_huge_line_is_read_in_bounded_pieces_with_the_tokens_of_the_whole(tmp_path, tokenizer, monkeypatch):
    import lightning_memdec.io.text_sources as text_sources
    import lightning_memdec.io.token_corpus as token_corpus

    rng = np.random.default_rng(0)
    docs = ["a short first document", long_line(rng, 6000) + "\n" + long_line(rng, 300), "a short last one"]
    text = tmp_path / "huge.txt"
    text.write_text("\n\n".join(docs) + "\n")
    tok = load_tokenizer(tokenizer)
    seen = []
    original = type(tok).__call__

    def recording(self, texts, *args, **kwargs):
        seen.extend([texts] if isinstance(texts, str) else texts)
        return original(self, texts, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", recording)
    monkeypatch.setattr(text_sources, "PIECE_CHARS", 500)  # read 500 characters at a time …
    monkeypatch.setattr(token_corpus, "PIECE_CHARS", 500)  # … and encode a batch once it holds 500
    out = tokenize([str(text)], tmp_path / "c", tokenizer)
    np.testing.assert_array_equal(Corpus(out).tokens, reference_tokens(docs, tok))
    assert Corpus(out).meta["num_documents"] == 3
    encoded = [t for t in seen if t not in docs]  # the reference's own calls encode whole documents
    assert len(encoded) > 20 and max(map(len, encoded)) < 2 * 500, "the tokenizer saw pieces, never the whole line"
    seen.clear()
    tokenize([str(text)], tmp_path / "c1000", tokenizer, max_tokens=1000)
    assert sum(map(len, (t for t in seen if t not in docs))) < len(docs[1]) // 4, "reading stops near max_tokens"


def test_document_pieces_join_to_the_documents_whatever_the_piece_size(tmp_path):
    from lightning_memdec.io.text_sources import iter_document_pieces

    rng = np.random.default_rng(1)
    pieces = ["word", "b ", "\n", "\n", " ", "\r\n", "\t", "xxxxxxx"]
    for _ in range(300):
        text = "".join(rng.choice(pieces, size=rng.integers(0, 40)))
        (tmp_path / "a.txt").write_bytes(text.encode())
        want = read_documents(tmp_path / "a.txt")
        for size in (1, 3, 8):
            got, parts = [], []
            for piece, ends in iter_document_pieces(tmp_path / "a.txt", size):
                parts.append(piece)
                if ends:
                    got.append("".join(parts))
                    parts = []
            assert got == want and not parts, (repr(text), size)


def test_a_tokenizer_whose_cuts_change_ids_gets_whole_documents():
    from lightning_memdec.io.text_pieces import cuts_are_safe, safe_cut, safe_pieces

    assert safe_cut("ab cd  ef") == 2 and safe_cut("ab  cd") == 0 and safe_cut("abc ") == 0
    pieces = [("one two thr", False), ("ee four", True)]
    assert list(safe_pieces(pieces)) == [("one two", False), (" three four", True)]
    assert list(safe_pieces(pieces, cut=False)) == [("one two three four", True)]
    assert cuts_are_safe(load_tokenizer("gpt2"))

    def per_character(texts, add_special_tokens=False):  # a "tokenizer" whose ids depend on the text's length
        texts = [texts] if isinstance(texts, str) else texts
        ids = [[len(t)] for t in texts]
        return {"input_ids": ids[0] if len(ids) == 1 and isinstance(texts, str) else ids}

    assert not cuts_are_safe(per_character)
