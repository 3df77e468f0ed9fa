"""One process at a time per output: a second build (or fit) into a locked output is refused before any work,
with the holder's pid; the lock goes when its process ends, even by SIGKILL."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_memdec.io.artifact_dirs import ArtifactError, partial_dir
from lightning_memdec.io.output_lock import OutputLock, lock_path
from lightning_memdec.retrieval.settings import IndexSettings
from lightning_memdec.stages.settings import KNNTargets, Windows

HOLD = """
import sys, time
from lightning_memdec.io.output_lock import OutputLock
OutputLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_process_is_refused_with_the_holders_pid_and_a_sigkill_releases(tmp_path):
    out = tmp_path / "corpus"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ArtifactError, match=rf"pid {holder.pid}, lock {lock_path(out)}"):
            OutputLock(out).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with OutputLock(out):  # the OS released the dead process's lock
        assert lock_path(out).read_text().strip() == str(os.getpid())
    assert not lock_path(out).exists()


def test_every_stage_is_refused_before_any_work_while_its_output_is_locked(
    tmp_path, biomed_corpus, biomed_datastore, biomed_index, tiny_gpt2
):
    from lightning_memdec.evaluation.evaluate import evaluate
    from lightning_memdec.io.token_corpus import tokenize
    from lightning_memdec.retrieval.faiss_index import build_index
    from lightning_memdec.stages.datastore import build_datastore
    from lightning_memdec.stages.targets import build_targets
    from lightning_memdec.training.vocab_transfer import transfer_vocab

    stages = {
        "tokenize": lambda out: tokenize(["embedded:biomed/valid"], out, "gpt2", max_tokens=100),
        "datastore": lambda out: build_datastore(
            biomed_corpus, str(tiny_gpt2), out, windows=Windows(window=64, stride=32)
        ),
        "index": lambda out: build_index(biomed_datastore, out, plan=IndexSettings(factory="Flat")),
        "targets": lambda out: build_targets(biomed_datastore, biomed_index, out, knn=KNNTargets(k=8)),
        "transfer-vocab": lambda out: transfer_vocab(str(tiny_gpt2), "gpt2", out),
        "evaluate": lambda out: evaluate([str(tiny_gpt2)], "embedded:biomed/test", out),
    }
    for name, stage in stages.items():
        out = tmp_path / name
        with OutputLock(out):
            with pytest.raises(ArtifactError, match=rf"{out} is being written by another process \(pid {os.getpid()}"):
                stage(out)
        assert not partial_dir(out).exists() and not out.exists(), name
    tokenize(["embedded:biomed/valid"], tmp_path / "tokenize", "gpt2", max_tokens=100)  # unlocked: it runs
    assert (tmp_path / "tokenize" / "meta.json").is_file() and not lock_path(tmp_path / "tokenize").exists()


def test_a_second_fit_into_a_locked_root_is_refused(tmp_path, biomed_targets_pair):
    from test_training import resume_args

    from lightning_memdec.training.fit import lightning_cli

    root = tmp_path / "run"
    with OutputLock(root):
        with pytest.raises(ArtifactError, match=rf"{root} is being written by another process"):
            lightning_cli([*resume_args(biomed_targets_pair, root), "--trainer.max_steps", "1"])
    assert not (root / "checkpoints").exists()
    lightning_cli([*resume_args(biomed_targets_pair, root), "--trainer.max_steps", "1"])  # released: it runs
    assert (root / "checkpoints" / "last.ckpt").is_file() and not lock_path(root).exists()


def test_a_second_fit_is_refused_before_its_classes_are_built(tmp_path, biomed_targets_pair):
    """The refusal comes before the model loads (seconds to minutes for a real one): a setting the module's
    constructor rejects (beta 2) is not reached while the root is locked; a failed fit from Python leaves the root
    unlocked for the next one."""
    from test_training import resume_args

    from lightning_memdec.training.fit import fit, lightning_cli

    root = tmp_path / "run"
    bad_beta = [*resume_args(biomed_targets_pair, root), "--model.beta", "2"]
    with OutputLock(root):
        with pytest.raises(ArtifactError, match=rf"{root} is being written by another process"):
            lightning_cli(bad_beta)
    with pytest.raises(ValueError, match="beta must be in"):
        lightning_cli(bad_beta)  # unlocked, the constructor runs and refuses
    assert not lock_path(root).exists()
    config = {
        "model": {"config": {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2}, "beta": 2.0},
        "data": {"train_corpus": "unused", "tokenizer": "gpt2"},
        "trainer": {"default_root_dir": str(root)},
    }
    with pytest.raises(ValueError):
        fit(config)
    assert not lock_path(root).exists()


def test_the_benchmarks_synthetic_artefacts_hold_the_output_lock(tmp_path, monkeypatch):
    """Synthetic corpora and datastores written by the benchmark scripts are outputs too: one writer at a time."""
    import importlib

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    scale, gpu = importlib.import_module("scale"), importlib.import_module("gpu")
    writers = {
        "store": lambda out: scale.write_store(out, n=64, dim=8, centres=2, spread=1.0, seed=0),
        "corpus": lambda out: gpu.random_corpus(out, num_tokens=500, seed=0),
    }
    for name, write in writers.items():
        out = tmp_path / name
        with OutputLock(out):
            with pytest.raises(ArtifactError, match=rf"{out} is being written by another process \(pid {os.getpid()}"):
                write(out)
        assert not partial_dir(out).exists() and not out.exists(), name
        write(out)
        assert (out / "meta.json").is_file() and not lock_path(out).exists()
