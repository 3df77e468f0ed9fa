"""Hostile audit 4 (docs/results/hostile-audit-4.md): the public Python API used as a careless user would. Each
test failed on the code before its fix: a silent wrong result, a raw traceback that names nothing, or a process
exit from a library call."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny

from lightning_memdec.inference.interpolated_lm import InterpolatedLM

IDS = torch.tensor([[464, 3290, 373, 257, 1310, 13]])


@pytest.fixture(scope="module")
def mixture(tmp_path_factory, tiny_gpt2):
    return InterpolatedLM(str(tiny_gpt2), str(save_tiny(tmp_path_factory.mktemp("api") / "memdec", seed=5)), 0.4)


def test_a_model_path_that_is_no_model_is_named(tmp_path, tiny_gpt2):
    """Was transformers' "couldn't connect to huggingface.co" (the path unnamed), or torch's unpickling error."""
    for ref, message in ((tmp_path / "nope", "not a model directory"), (tiny_gpt2 / "config.json", "it is a file")):
        with pytest.raises(ValueError, match=f"cannot load causal LM '{ref}': .*{message}"):
            InterpolatedLM.from_pretrained(str(ref), str(tiny_gpt2), 0.3)


def test_attention_masks_of_other_values_than_0_and_1_are_refused(mixture):
    """A mask of 2s shifted every position (log-probs off by nats, silently); 0.5 failed in the embedding."""
    ones = torch.ones_like(IDS)
    mixture.log_probs(IDS, attention_mask=ones.bool())  # bool masks are fine
    for mask in (ones * 2, ones * 0.5):
        with pytest.raises(ValueError, match=r"attention_mask must hold 0 \(padding\) and 1 \(tokens\) only"):
            mixture.log_probs(IDS, attention_mask=mask)


def test_generate_without_a_prompt_starts_from_bos_as_generate_does(mixture):
    got = mixture.generate(max_new_tokens=3, do_sample=False)
    assert got.shape == (1, 4) and int(got[0, 0]) == mixture.generation_config.bos_token_id
    with pytest.raises(ValueError, match="pass token ids, not inputs_embeds"):
        mixture.generate(inputs_embeds=torch.zeros(1, 2, 32), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_length = 600 exceeds the context of the base LM"):
        mixture.generate(IDS, max_length=600)  # names the setting given, not "prompt + max_new_tokens"


def test_data_module_counts_that_mean_nothing_are_refused(tmp_path):
    """max_support=0 cut every target row to nothing, so the KL term vanished; stride=0 meant the window."""
    from lightning_memdec.training.datamodule import MemDecDataModule

    for kwargs, name in (({"max_support": 0}, "max_support"), ({"stride": 0}, "stride"), ({"window": 0}, "window"),
                         ({"batch_size": -2}, "batch_size")):  # fmt: skip
        with pytest.raises(ValueError, match=f"{name} must be positive"):
            MemDecDataModule(str(tmp_path), **kwargs)


def test_module_settings_that_would_train_otherwise_are_refused():
    from lightning_memdec.training.lightning_module import MemoryDecoderModule, lr_lambda

    for schedule in ("cosin", "Cosine"):  # both trained with the linear schedule
        with pytest.raises(ValueError, match="lr_schedule must be one of"):
            MemoryDecoderModule(model="embedded:base-small", lr_schedule=schedule)
        with pytest.raises(ValueError, match="lr_schedule must be one of"):
            lr_lambda(100, 5, schedule, 0.1)
    with pytest.raises(ValueError, match="config needs a model_type"):
        MemoryDecoderModule(config={"n_layer": 1})


def test_an_add_batch_that_adds_nothing_is_refused_before_the_build(tmp_path, biomed_datastore):
    """-1 published an empty index (kNN-LM then gave NaN); 0 failed mid-build, leaving a .partial behind."""
    from lightning_memdec.retrieval.faiss_index import build_index

    for add_batch in (-1, 0):
        with pytest.raises(ValueError, match="--add_batch must be positive"):
            build_index(biomed_datastore, tmp_path / "index", add_batch=add_batch)
    assert not any(tmp_path.iterdir())


def test_a_fit_config_mistake_raises_instead_of_exiting(tmp_path):
    """From Python (a notebook) the parser printed its usage and raised SystemExit."""
    from lightning_memdec.training.fit import fit

    config = {"model": {"model": "embedded:base-small"}, "data": {"train_corpus": str(tmp_path), "windw": 64}}
    with pytest.raises(ValueError, match="the fit config: .*'data' does not accept option 'windw'"):
        fit(config)


def test_one_base_or_one_text_file_as_a_plain_value(tmp_path):
    """quickstart read base="embedded:base-small" letter by letter ("--base e"); tokenize took no single Path."""
    from lightning_memdec.apps.quickstart import checked_bases
    from lightning_memdec.io.token_corpus import Corpus, tokenize

    assert checked_bases("embedded:base-small", None, False, None)[0] == ["embedded:base-small"]
    text = tmp_path / "text.txt"
    text.write_text("The patient was given aspirin.\n\nA second document.\n")
    assert Corpus(tokenize(text, tmp_path / "corpus", "gpt2")).num_tokens > 5


def test_one_dimensional_ids_and_negative_budgets_are_named(mixture, biomed_datastore, tiny_gpt2):
    """1-D ids failed deep in the models with a bare IndexError; generate_greedy(ids, -3) returned the prompt."""
    from lightning_memdec.inference.knnlm import KNNLM

    knnlm = KNNLM(str(tiny_gpt2), biomed_datastore, search="exact", k=8)
    for call in (lambda: mixture.log_probs(IDS[0]), lambda: knnlm.log_probs(IDS[0])):
        with pytest.raises(ValueError, match=r"must be \[batch ≥ 1, time ≥ 1\] integer token ids, got shape \[6\]"):
            call()
    with pytest.raises(ValueError, match="max_new_tokens must be a whole number ≥ 0, got -3"):
        knnlm.generate_greedy(IDS, -3)
    assert torch.equal(knnlm.generate_greedy(IDS, 0).cpu(), IDS)
