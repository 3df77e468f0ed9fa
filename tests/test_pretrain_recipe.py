"""`memdec pretrain-bases`: the recipe each base is trained with carries the run's flags, and the base's meta.json
records how its general perplexity was measured."""

from __future__ import annotations

from pathlib import Path

import lightning_memdec.apps.pretrain_bases as pretrain_bases_module
import lightning_memdec.training.fit as fit_module
from lightning_memdec.io.artifact_dirs import read_meta, write_json_atomic


def test_max_time_reaches_the_trainer(tmp_path, monkeypatch):
    """--max_time was dropped: a base meant to stop after its time budget trained to the recipe's max_steps."""
    configs = []

    def fake_fit(config, ckpt_path=None):  # what a training leaves: a checkpoint folder and the export
        configs.append(config)
        for folder in (config["checkpoint"]["dirpath"], config["export"]["dirpath"]):
            Path(folder).mkdir(parents=True, exist_ok=True)

    def fake_record(export, config, corpora):
        write_json_atomic(export / "general_perplexity.json", {"valid": 1.0, "test": 1.0})

    corpora = {split: tmp_path / f"corpus-{split}" for split in ("train", "valid", "test")}
    monkeypatch.setattr(pretrain_bases_module, "general_corpora", lambda out, extra: corpora)
    monkeypatch.setattr(fit_module, "fit", fake_fit)
    monkeypatch.setattr(pretrain_bases_module, "record_base", fake_record)
    pretrain_bases_module.pretrain_bases(tmp_path / "out", sizes=["small"], max_steps=3, max_time="00:00:05:00")
    trainer = configs[0]["trainer"]
    assert trainer["max_time"] == "00:00:05:00" and trainer["max_steps"] == 3
    assert configs[0]["data"]["train_corpus"] == str(corpora["train"])


def test_the_recorded_stride_is_half_the_window_the_perplexity_was_scored_with(tmp_path, monkeypatch):
    """general_perplexity scores over windows every window / 2; meta.json said the stride was the whole window."""
    scored = []

    def fake_perplexity(model_dir, corpus, window, batch_size=16):
        scored.append(window)
        return 20.0 + len(scored)

    export, train = tmp_path / "base-small", tmp_path / "corpus-train"
    export.mkdir()
    train.mkdir()
    write_json_atomic(export / "meta.json", {"kind": "memory_decoder"})
    write_json_atomic(train / "meta.json", {"kind": "corpus", "num_tokens": 100, "sources": [{"path": "/x/a.txt"}]})
    monkeypatch.setattr(pretrain_bases_module, "general_perplexity", fake_perplexity)
    config = {"data": {"window": 96}, "trainer": {"max_steps": 2}}
    corpora = {"train": train, "valid": tmp_path / "corpus-valid", "test": tmp_path / "corpus-test"}
    pretrain_bases_module.record_base(export, config, corpora)
    recorded = read_meta(export, kind="base_lm")["general_perplexity"]
    assert scored == [96, 96]
    assert recorded == {"valid": 21.0, "test": 22.0, "window": 96, "stride": 96 // 2}


def test_a_base_stopped_before_its_export_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    """Hours of pretraining: a rerun after a stop continues from last.ckpt instead of starting over."""
    calls = []

    def fake_fit(config, ckpt_path=None):
        calls.append(ckpt_path)
        for folder in (config["checkpoint"]["dirpath"], config["export"]["dirpath"]):
            Path(folder).mkdir(parents=True, exist_ok=True)

    corpora = {split: tmp_path / f"corpus-{split}" for split in ("train", "valid", "test")}
    monkeypatch.setattr(pretrain_bases_module, "general_corpora", lambda out, extra: corpora)
    monkeypatch.setattr(fit_module, "fit", fake_fit)
    monkeypatch.setattr(pretrain_bases_module, "record_base", lambda export, config, corpora: None)
    pretrain_bases_module.pretrain_bases(tmp_path / "fresh", sizes=["small"])
    config = pretrain_bases_module.base_config("small", corpora, tmp_path / "stopped", {})
    Path(config["checkpoint"]["dirpath"]).mkdir(parents=True)
    (Path(config["checkpoint"]["dirpath"]) / "last.ckpt").write_bytes(b"a stopped run's")
    pretrain_bases_module.pretrain_bases(tmp_path / "stopped", sizes=["small"])
    assert calls == [None, "last"]
