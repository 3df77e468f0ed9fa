"""Tiny models and real-text corpora shared by the tests (built once per session, loaded by path)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lightning_memdec.apps.openai_protocol import Job, ServedModel, check_requests
from lightning_memdec.retrieval.settings import IndexSettings
from lightning_memdec.stages.settings import Hardware, KNNTargets, Windows

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # The xdist workers share the machine's cores: each gets its share of threads, and so do the processes its tests
    # start (DDP ranks, the notebook's kernel), instead of every worker's OpenMP pool spinning on all of them.
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(_threads)
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def save_tiny(
    path: Path,
    arch: str = "gpt2",
    n_embd: int = 32,
    n_layer: int = 2,
    vocab: int = 50257,
    tokenizer: str | None = "gpt2",
    seed: int = 0,
) -> Path:
    """A randomly initialised causal LM built from a config and saved like a hub model."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
    )

    from lightning_memdec.io.embedded import load_tokenizer

    torch.manual_seed(seed)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=vocab, n_positions=512))
    elif arch == "gpt_neox":
        model = GPTNeoXForCausalLM(
            GPTNeoXConfig(
                num_hidden_layers=n_layer,
                hidden_size=n_embd,
                num_attention_heads=2,
                intermediate_size=2 * n_embd,
                vocab_size=vocab,
                max_position_embeddings=512,
            )
        )
    elif arch in ("llama", "qwen2", "qwen3", "mistral"):  # the Llama family: its blocks name their norms alike
        config = AutoConfig.for_model(
            arch,
            num_hidden_layers=n_layer,
            hidden_size=n_embd,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=2 * n_embd,
            vocab_size=vocab,
            max_position_embeddings=512,
        )
        model = AutoModelForCausalLM.from_config(config)
    else:
        raise ValueError(arch)
    model.save_pretrained(path)
    if tokenizer is not None:
        load_tokenizer(tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("models") / "gpt2-tiny")


@pytest.fixture(scope="session")
def biomed_corpus(tmp_path_factory) -> Path:
    from lightning_memdec.io.token_corpus import tokenize

    return tokenize(["embedded:biomed/valid"], tmp_path_factory.mktemp("corpora") / "biomed", "gpt2", max_tokens=3000)


@pytest.fixture(scope="session")
def biomed_datastore(tmp_path_factory, biomed_corpus, tiny_gpt2) -> Path:
    from lightning_memdec.stages.datastore import build_datastore

    out = tmp_path_factory.mktemp("stores") / "ds"
    return build_datastore(
        biomed_corpus,
        str(tiny_gpt2),
        out,
        windows=Windows(window=64, stride=32, batch_size=4),
        hardware=Hardware(accelerator="cpu"),
    )


@pytest.fixture(scope="session")
def biomed_index(tmp_path_factory, biomed_datastore) -> Path:
    from lightning_memdec.retrieval.faiss_index import build_index

    return build_index(
        biomed_datastore, tmp_path_factory.mktemp("indexes") / "flat", plan=IndexSettings(factory="Flat")
    )


@pytest.fixture(scope="session")
def biomed_targets_pair(tmp_path_factory, biomed_corpus, biomed_datastore, biomed_index, tiny_gpt2) -> dict:
    """Train and validation corpora with their kNN targets: what `memdec fit` consumes."""
    from lightning_memdec.io.token_corpus import tokenize
    from lightning_memdec.stages.datastore import build_datastore
    from lightning_memdec.stages.targets import build_targets

    root = tmp_path_factory.mktemp("pair")
    valid = tokenize(["embedded:biomed/test"], root / "corpus-valid", "gpt2", max_tokens=1200)
    vstore = build_datastore(
        valid,
        str(tiny_gpt2),
        root / "ds-valid",
        windows=Windows(window=64, stride=32),
        hardware=Hardware(accelerator="cpu"),
    )
    return {
        "train_corpus": str(biomed_corpus),
        "train_targets": str(
            build_targets(biomed_datastore, biomed_index, root / "t-train", knn=KNNTargets(k=32, temperature=4.0))
        ),
        "val_corpus": str(valid),
        "val_targets": str(
            build_targets(
                biomed_datastore, biomed_index, root / "t-valid", queries=vstore, knn=KNNTargets(k=32, temperature=4.0)
            )
        ),
    }


@pytest.fixture
def cuvs(monkeypatch):
    """cuVS's API from the double (tests/cuvs_double.py), and its 'GPU' the CPU (the stages' ranks on the CPU count
    as on a GPU)."""
    from cuvs_double import install

    from lightning_memdec.retrieval import cuvs_index
    from lightning_memdec.stages import targets

    monkeypatch.setattr(cuvs_index, "cuvs_device", lambda device=None: torch.device("cpu"))
    monkeypatch.setattr(targets, "on_cuda", lambda accelerator: True)
    return install(monkeypatch)


def pytest_collection_modifyitems(config, items):
    """Notebooks, run end to end by nbmake (``pytest tests notebooks --nbmake``), take a minute or more: slow.
    Each test records its registered markers as a ``markers`` property, which ``--junitxml`` writes and
    tests/suite_times.py totals."""
    registered = {line.split(":", 1)[0].strip() for line in config.getini("markers")}
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.slow)
        marks = sorted({mark.name for mark in item.iter_markers()} & registered)
        item.user_properties.append(("markers", ",".join(marks)))


def knnlm_scorer(knnlm):
    """The reference ScoreFn of a KNNLM for sliding_gold_log_probs: base and p_kNN gold log-probs from
    KNNLM.gold_log_probs itself (one base pass, retrieval at the scored positions)."""

    def score(input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = knnlm.gold_log_probs(input_ids, labels)
        return {"base": out["base"], "knn": out["knn"]}

    return score


def check_request(body: dict, served: ServedModel, chat: bool) -> Job:
    """The one job of a one-prompt, n = 1 request (what `memdec serve` queues for it)."""
    (job,) = check_requests(body, served, chat)
    return job


class StoppedInsidePublish(Exception):
    """The process 'died' inside publish: meta.json written and synced, the rename into place not done."""


def stopped_inside_publish(monkeypatch, stage, *args, **kwargs) -> None:
    """Run ``stage`` up to its rename into place and stop it there (as a kill inside publish leaves it: the finished
    work in ``<out>.partial`` with meta.json and the run's settings), so the next run decides whether it is its own."""
    import lightning_memdec.io.artifact_dirs as artifact_dirs

    def stop(work, out):
        raise StoppedInsidePublish(f"stopped before {work} became {out}")

    with monkeypatch.context() as patch:
        patch.setattr(artifact_dirs, "swap_in", stop)
        with pytest.raises(StoppedInsidePublish):
            stage(*args, **kwargs)
