"""WikiText-2 raw test, tokenized as the official preprocessing does (--separation official) and as this package
does by default (an EOS after each article, --dataset.document_start): tokens, documents/groups, and how the official
stream's groups cut it. Rows are rebuilt as the hub's (a blank row between lines; see docs/official.md)."""

import json
import sys
from pathlib import Path

import numpy as np

from lightning_memdec.io.settings import DatasetRows
from lightning_memdec.io.token_corpus import Corpus, tokenize

raw, work = Path(sys.argv[1]), Path(sys.argv[2])
lines = [r.replace("\r\n", "\n") for r in raw.read_text(encoding="utf-8").splitlines(keepends=True)]
rows = [""] + [r for line in lines for r in (line, "")]
data = work / "wikitext2_test.jsonl"
data.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
official = Corpus(
    tokenize(out=work / "official", separation="official", overwrite=True, dataset=DatasetRows(files=[str(data)]))
)
eos = Corpus(
    tokenize(out=work / "eos", overwrite=True, dataset=DatasetRows(files=[str(data)], document_start="^ = [^=].* = $"))
)
print(f"rows: {len(rows):,}")
for name, corpus in (("official", official), ("eos + document_start", eos)):
    sizes = np.diff(corpus.doc_offsets)
    print(
        f"{name}: {corpus.num_tokens:,} tokens, {corpus.meta['num_documents']} documents "
        f"(median {int(np.median(sizes)):,} tokens), EOS tokens: {int((np.asarray(corpus.tokens) == 50256).sum())}"
    )
