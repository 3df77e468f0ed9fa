"""`memdec tokenize --separation official`: the token stream of the paper's preprocessing, checked against
`datasets.map` itself grouping rows as utils/preprocess_dataset.py has it grouped (batches per contiguous shard, each
cut to whole blocks), and against an official datastore's values through `memdec import-official --corpus`."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from lightning_memdec.io.artifact_dirs import ArtifactError
from lightning_memdec.io.embedded import load_tokenizer
from lightning_memdec.io.official_preprocessing import official_groups, shard_bounds
from lightning_memdec.io.readers import Datastore
from lightning_memdec.io.settings import DatasetRows
from lightning_memdec.io.token_corpus import Corpus, tokenize
from lightning_memdec.stages.official_import import import_official

WORDS = "the of memory decoder datastore neighbour token domain law medicine = Heading = , . @-@".split()


def wikitext_rows(n: int, seed: int = 0) -> list[str]:
    """WikiText-like rows: headings, blank lines and paragraphs, each ending in a newline as the dataset's do."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        if i % 7 == 3:
            rows.append("")
        elif i % 11 == 0:
            rows.append(f" = Heading {i} = \n")
        else:
            rows.append(" " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, 40)))) + " \n")
    return rows


def datasets_map_values(rows: list[str], tok, block: int, num_proc: int, batch_rows: int) -> np.ndarray:
    """The official datastore's values for ``rows``: datasets.map groups them (its own sharding and batching); in
    each group every token after the first is the value of the position before it, the group cut to whole blocks."""
    import datasets

    def values_of_group(batch):
        tokens = [t for ids in batch["input_ids"] for t in ids]
        if len(tokens) >= block:
            tokens = tokens[: len(tokens) // block * block]
        return {"values": [tokens[1:]]}

    ids = datasets.Dataset.from_dict({"input_ids": [tok(r)["input_ids"] for r in rows]})
    grouped = ids.map(
        values_of_group, batched=True, batch_size=batch_rows, num_proc=num_proc, remove_columns=["input_ids"]
    )
    return np.array([t for row in grouped["values"] for t in row], dtype=np.int64)


def test_groups_continue_as_the_official_values():
    tok = load_tokenizer("gpt2")
    rows = wikitext_rows(2300)
    expected = datasets_map_values(rows, tok, block=64, num_proc=3, batch_rows=200)
    groups = list(official_groups((tok(r)["input_ids"] for r in rows), len(rows), 64, num_proc=3, batch_rows=200))
    tokens = np.concatenate(groups)
    np.testing.assert_array_equal(tokens[1:], expected)
    assert len(groups) == 3 * 4  # 767/767/766 rows per shard, 4 batches of ≤ 200 each
    rows = ["", " = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 is a role-playing game .\n"]
    expected = datasets_map_values(rows, tok, block=64, num_proc=4, batch_rows=200)  # the first group is empty
    groups = list(official_groups((tok(r)["input_ids"] for r in rows), len(rows), 64, num_proc=4, batch_rows=200))
    np.testing.assert_array_equal(np.concatenate(groups)[1:], expected)


def test_shard_bounds_are_contiguous_and_never_more_than_rows():
    assert shard_bounds(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert shard_bounds(3, 32) == [(0, 1), (1, 2), (2, 3)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return path


def test_tokenize_official_rows_keep_special_tokens_and_no_eos(tmp_path):
    """40 rows over the official 32 shards: shards of 2 rows, then of 1; every row alone, with Llama-3's BOS."""
    from test_official_decoders import llama3_style_tokenizer

    tok = llama3_style_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    rows = wikitext_rows(40)
    out = tokenize(
        out=tmp_path / "c",
        tokenizer=str(tmp_path / "tok"),
        separation="official",
        dataset=DatasetRows(files=[str(write_jsonl(tmp_path / "train.jsonl", rows))]),
    )
    per_row = [tok(r)["input_ids"] for r in rows]
    assert all(ids[0] == tok.bos_token_id for ids in per_row)  # blank rows too: [BOS]
    shards = [per_row[2 * i : 2 * i + 2] for i in range(8)] + [[ids] for ids in per_row[16:]]
    groups = [sum(shard, []) for shard in shards]
    expected = groups[0] + [t for g in groups[1:] for t in g[1:]]
    corpus = Corpus(out)
    np.testing.assert_array_equal(corpus.tokens, expected)
    non_empty = 1 + sum(len(g) > 1 for g in groups[1:])  # a blank row alone is [BOS], its group empty once cut
    assert corpus.meta["separation"] == "official" and corpus.meta["num_documents"] == non_empty == 28
    assert tok.eos_token_id not in set(np.asarray(corpus.tokens).tolist())


def test_official_separation_refuses_text_files_and_document_start(tmp_path):
    with pytest.raises(ValueError, match="--separation official tokenizes dataset rows"):
        tokenize(text=["embedded:biomed/valid"], out=tmp_path / "c", separation="official")
    data = write_jsonl(tmp_path / "d.jsonl", ["a"])
    with pytest.raises(ValueError, match="and no --dataset.document_start"):
        tokenize(
            out=tmp_path / "c", separation="official", dataset=DatasetRows(files=[str(data)], document_start="^ = ")
        )
    with pytest.raises(ValueError, match="--separation must be one of"):
        tokenize(out=tmp_path / "c", separation="none", dataset=DatasetRows(files=[str(data)]))
    assert not (tmp_path / "c").exists()


def test_official_corpus_is_accepted_by_import_and_the_eos_corpus_is_not(tmp_path):
    """An official datastore's values (datasets.map's grouping, the official defaults) continue the official corpus
    exactly; the same rows tokenized with an EOS after each document are refused, at the first differing entry."""
    tok = load_tokenizer("gpt2")
    rows = wikitext_rows(300, seed=1)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    values = datasets_map_values(rows, tok, block=1024, num_proc=32, batch_rows=1000)
    keys = np.random.default_rng(0).standard_normal((len(values), 8)).astype(np.float16)
    schema = pa.schema([pa.field("keys", pa.list_(pa.float16(), 8)), pa.field("vals", pa.int32())])
    arrow = tmp_path / "dstore_gpt2_train_8.arrow"
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(
            pa.RecordBatch.from_arrays(
                [pa.array(list(keys), schema[0].type), pa.array(values, pa.int32())], schema=schema
            )
        )
    official = tokenize(out=tmp_path / "official", separation="official", dataset=DatasetRows(files=[str(data)]))
    store = Datastore(import_official(tmp_path / "ds", datastore=arrow, corpus=official))
    np.testing.assert_array_equal(store.values, values)
    eos = tokenize(out=tmp_path / "eos", dataset=DatasetRows(files=[str(data)]))
    with pytest.raises(ArtifactError, match="entry \\d+ has value \\d+ but corpus .* has token"):
        import_official(tmp_path / "ds2", datastore=arrow, corpus=eos)


def test_at_most_reads_no_piece_past_max_tokens():
    """--max_tokens with --separation official: the groups (each a tokenizer call) stop being read once it is met."""
    from lightning_memdec.io.token_corpus import at_most

    pulled = []

    def pieces():
        for i in range(10):
            pulled.append(i)
            yield np.arange(3) if i != 1 else np.arange(0)  # an empty piece does not end the reading

    assert [len(p) for p in at_most(pieces(), 7)] == [3, 3, 1] and pulled == [0, 1, 2, 3]
    assert sum(len(p) for p in at_most(pieces(), None)) == 27
