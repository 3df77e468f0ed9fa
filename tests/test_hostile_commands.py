"""The second hostile audit (docs/results/hostile-audit-2.md): downstream, serve, transfer-vocab, quickstart,
fit-router, import-official and build-index-sharded as a user mistypes them. Each test failed on the code before
its fix: the user gets a clear error naming the file or setting and the fix, before any work, and nothing already
written is lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lightning_memdec.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:task .* multi-token verbalizers dropped")
TASK = {
    "template": "{text} It was",
    "domain_premise": " It was",
    "labels": ["negative", "positive"],
    "primary_verbalizers": [" terrible", " great"],
    "verbalizers": [[" terrible", " bad"], [" great", " good"]],
}


def task_folder(root: Path) -> Path:
    (root / "toy").mkdir(parents=True)
    (root / "tasks.json").write_text(json.dumps({"toy": TASK}))
    records = [{"id": i, "input": {"text": t}, "label": i % 2} for i, t in enumerate(["Dull.", "Warm and funny"])]
    (root / "toy" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def refused(args: list[str], capsys) -> str:
    """The CLI's one-line error for ``args`` (exit 1, no traceback)."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 1
    return capsys.readouterr().err


def no_model_loaded(monkeypatch, *modules) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was refused")

    for module in modules:
        monkeypatch.setattr(module, "load_causal_lm", no_model)


# -- every stage with an output lock: an --out that is one of its inputs ----------------------------------------------


def test_an_output_that_is_an_input_is_refused_and_the_input_kept(tmp_path, biomed_datastore, capsys):
    """`build-index --datastore ds --out ds --overwrite true` replaced the datastore by its index (keys lost);
    the same for build-index-sharded and build-targets. Refused now, whatever --overwrite says."""
    store = tmp_path / "ds"
    shutil.copytree(biomed_datastore, store)
    before = sorted(p.name for p in store.iterdir())
    for args in (
        ["build-index", "--datastore", str(store), "--out", str(store), "--factory", "Flat", "--overwrite", "true"],
        ["build-index-sharded", "--datastore", str(store), "--out", str(store), "--factory", "Flat"],
        ["build-index", "--datastore", str(store / "."), "--out", str(tmp_path), "--overwrite", "true"],  # holds it
    ):
        err = refused(args, capsys)
        assert "is (or holds) the --datastore input" in err and "choose another --out" in err
    assert sorted(p.name for p in store.iterdir()) == before
    assert json.loads((store / "meta.json").read_text())["kind"] == "datastore"


# -- tokenizers: a directory without tokenizer files is no tokenizer --------------------------------------------------


def test_a_directory_named_like_a_shipped_tokenizer_does_not_give_an_empty_one(tmp_path, monkeypatch, capsys):
    """A model folder named gpt2 (no tokenizer files) in the working directory shadowed the shipped gpt2: `memdec
    tokenize --tokenizer gpt2` wrote a corpus of end-of-text tokens only (transformers' 1-token tokenizer)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text("{}")
    args = ["tokenize", "--text", "embedded:biomed/valid", "--out", "c", "--tokenizer", "gpt2", "--max_tokens", "50"]
    err = refused(args, capsys)
    assert "'gpt2' is a directory without tokenizer files" in err and "shadows the shipped tokenizer" in err
    assert not (tmp_path / "c").exists()
