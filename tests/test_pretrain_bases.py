"""`memdec pretrain-bases` reuses finished work only when it was made from the same text and the same recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_memdec.apps.pretrain_bases import check_same_recipe, general_corpora
from lightning_memdec.io.artifact_dirs import write_json_atomic


def test_a_finished_base_of_another_recipe_is_refused_naming_what_differs(tmp_path):
    """A rerun with another --max_steps kept the old base without a word."""
    recipe = {"trainer": {"max_steps": 2, "devices": 1}, "model": {"beta": 0.0}}
    write_json_atomic(tmp_path / "meta.json", {"kind": "base_lm", "recipe": recipe})
    check_same_recipe(tmp_path, {"trainer": {"max_steps": 2, "devices": 1}, "model": {"beta": 0.0}})
    with pytest.raises(ValueError, match=r"another recipe \(trainer.max_steps: trained with 2, asked 6\)"):
        check_same_recipe(tmp_path, {"trainer": {"max_steps": 6, "devices": 1}, "model": {"beta": 0.0}})


def test_a_corpus_of_other_extra_text_under_the_same_file_name_is_refused(tmp_path):
    """Sources were compared by file name: another folder's train.txt was taken for the one tokenized."""
    extra = tmp_path / "a" / "train.txt"
    extra.parent.mkdir()
    extra.write_text("Some more general text.\n")
    corpora = general_corpora(tmp_path / "out", [str(extra)])
    assert general_corpora(tmp_path / "out", [str(extra)]) == corpora  # the same text: reused
    other = tmp_path / "b" / "train.txt"
    other.parent.mkdir()
    other.write_text("Other text altogether.\n")
    with pytest.raises(ValueError, match="corpus-train was tokenized from .*not from the text of"):
        general_corpora(tmp_path / "out", [str(other)])


def test_checkpoints_are_removed_once_the_base_is_recorded_and_a_rerun_reuses_it(tmp_path, monkeypatch):
    """They served a resume; 168 MB a base were left beside the finished export (quickstart removes its own)."""
    import lightning_memdec.apps.pretrain_bases as pretrain_bases_module
    import lightning_memdec.training.fit as fit_module

    calls = []

    def fake_fit(config, ckpt_path=None):  # what a training leaves: checkpoints and the export
        calls.append(ckpt_path)
        (Path(config["checkpoint"]["dirpath"]) / "last.ckpt").parent.mkdir(parents=True, exist_ok=True)
        (Path(config["checkpoint"]["dirpath"]) / "last.ckpt").write_bytes(b"weights")
        Path(config["export"]["dirpath"]).mkdir(parents=True, exist_ok=True)

    def fake_record(export, config, corpora):
        write_json_atomic(export / "meta.json", {"kind": "base_lm", "recipe": config})
        write_json_atomic(export / "general_perplexity.json", {"valid": 1.0, "test": 1.0})

    monkeypatch.setattr(fit_module, "fit", fake_fit)
    monkeypatch.setattr(pretrain_bases_module, "record_base", fake_record)
    trained = pretrain_bases_module.pretrain_bases(tmp_path / "out", sizes=["small"], max_steps=2)
    assert calls == [None] and (trained["small"] / "general_perplexity.json").is_file()
    assert not (tmp_path / "out" / "runs" / "base-small" / "checkpoints").exists()
    assert pretrain_bases_module.pretrain_bases(tmp_path / "out", sizes=["small"], max_steps=2) == trained
    assert calls == [None]  # the finished base is reused: no second training
