"""Small edge cases of model loading, tokenizer identity, text checks and downstream task files, each against a
direct computation of what the right answer is."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from conftest import save_tiny

from lightning_memdec.evaluation.downstream_tasks import (
    TaskError,
    knn_prompt_sample,
    load_tasks,
    single_token_verbalizers,
)
from lightning_memdec.hf.loading import check_token_ids, find_tokenizer, position_ids_from_mask
from lightning_memdec.io.artifact_dirs import ArtifactError
from lightning_memdec.io.embedded import load_tokenizer
from lightning_memdec.io.text_sources import check_utf8
from lightning_memdec.io.tokenizer_identity import check_same_tokenizer, tokenizer_info

ENTRY = {"template": "{text} It was", "domain_premise": " It was", "labels": ["negative", "positive"],
         "verbalizers": [[" bad"], [" good"]]}  # fmt: skip


def write_tasks(folder: Path, tasks: dict[str, list[dict]], entry: dict = ENTRY) -> Path:
    """A task folder: tasks.json naming each task with ``entry``, and <task>/test.jsonl holding its records."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tasks.json").write_text(json.dumps({name: entry for name in tasks}))
    for name, records in tasks.items():
        (folder / name).mkdir()
        (folder / name / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def by_hand_positions(mask: list[list[int]], length: int) -> list[list[int]]:
    """Positions counted over real tokens (padding at 0), the last ``length`` columns, by a plain loop."""
    rows = []
    for row in mask:
        count, positions = 0, []
        for m in row:
            positions.append(count if m else 0)
            count += m
        rows.append(positions[len(positions) - length :])
    return rows


def test_position_ids_are_those_of_the_last_columns():
    """The ids asked for are the last ``length`` columns (the new tokens of a cached step), not the first ones."""
    assert position_ids_from_mask(torch.ones(1, 5, dtype=torch.long), 1).tolist() == [[4]]
    mask = [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]]
    for length in (1, 2, 3, 6):
        got = position_ids_from_mask(torch.tensor(mask), length).tolist()
        assert got == by_hand_positions(mask, length), length
    assert by_hand_positions(mask, 2) == [[2, 3], [4, 5], [0, 1]]  # the by-hand rule itself, spelled out


def test_a_token_id_equal_to_the_vocabulary_size_is_refused():
    """Ids must lie in [0, vocab): vocab itself is one past the embeddings; vocab - 1 is the last good id."""
    check_token_ids(torch.tensor([[0, 9]]), 10)
    with pytest.raises(ValueError, match="10"):
        check_token_ids(torch.tensor([[0, 10]]), 10)
    with pytest.raises(ValueError):
        check_token_ids(torch.tensor([[-1, 3]]), 10)


def test_a_model_directory_with_only_a_tokenizer_config_has_no_tokenizer(tmp_path):
    """tokenizer_config.json alone builds a 1-token tokenizer under transformers 5: that is no tokenizer (None)."""
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert find_tokenizer(str(tmp_path)) is None


def test_a_model_directory_whose_tokenizer_files_do_not_load_is_an_error_not_another_tokenizer(tmp_path):
    """A truncated tokenizer.json beside a model whose meta.json names a shipped tokenizer: the shipped one was
    returned in silence (another vocabulary: 50,257 ids where the saved tokenizer had 50,258), or, without meta.json,
    None ("no tokenizer saved"). The error names the directory and what failed."""
    tok = load_tokenizer("gpt2")
    tok.add_tokens(["<my_domain_token>"])
    tok.save_pretrained(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": {"name": "gpt2"}}))
    assert len(find_tokenizer(str(tmp_path))) == 50258
    whole = (tmp_path / "tokenizer.json").read_text()
    (tmp_path / "tokenizer.json").write_text(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=rf"the tokenizer files in {tmp_path} do not load \(JSONDecodeError"):
        find_tokenizer(str(tmp_path))


def test_same_size_tokenizers_with_swapped_ids_are_told_apart(tmp_path):
    """Equal vocabulary sizes are not equal tokenizers: GPT-2 with two ids swapped maps text to other ids."""
    gpt2 = load_tokenizer("gpt2")
    d = tmp_path / "tok"
    gpt2.save_pretrained(d)
    data = json.loads((d / "tokenizer.json").read_text())
    vocab, a, b = data["model"]["vocab"], "Ġthe", "Ġof"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (d / "tokenizer.json").write_text(json.dumps(data))
    if (d / "vocab.json").exists():
        vj = json.loads((d / "vocab.json").read_text())
        vj[a], vj[b] = vj[b], vj[a]
        (d / "vocab.json").write_text(json.dumps(vj))
    other = load_tokenizer(str(d))
    assert len(other) == len(gpt2)
    assert other(" the of")["input_ids"] == gpt2(" the of")["input_ids"][::-1]  # the swap took
    check_same_tokenizer(tokenizer_info(gpt2, "gpt2"), "datastore", tokenizer_info(gpt2, "gpt2"), "base")
    with pytest.raises(ArtifactError):
        check_same_tokenizer(tokenizer_info(gpt2, "gpt2"), "datastore", tokenizer_info(other, "swapped"), "base")


def test_a_file_ending_in_a_truncated_utf8_character_is_refused_at_its_start(tmp_path):
    """A multi-byte character cut off by the end of the file is not UTF-8; the offset named is its first byte."""
    head = b"Hello world.\n\nSecond "
    path = tmp_path / "t.txt"
    path.write_bytes(head + b"\xe2\x82")  # the first two of € (e2 82 ac)
    with pytest.raises(ValueError, match=f"byte {len(head):,} "):
        check_utf8(path)
    path.write_bytes(head + b"\xe2\x82\xac")  # whole, it is fine
    check_utf8(path)


def test_a_boolean_label_is_refused(tmp_path):
    """JSON true is a bool, not a class index, though Python's bool is an int: the record is refused."""
    folder = write_tasks(tmp_path / "t", {"toy": [{"id": 0, "input": {"text": "fine"}, "label": True}]})
    with pytest.raises(TaskError, match="label"):
        load_tasks(folder)
    folder = write_tasks(tmp_path / "u", {"toy": [{"id": 0, "input": {"text": "fine"}, "label": 1}]})
    assert load_tasks(folder)[0].splits["test"][0]["label"] == 1


def test_the_prompt_sample_is_knn_prompts_recipe():
    """kNN-Prompt: random.seed(0); shuffle the records; random.sample(range(n), k) of the shuffled ones."""
    records = [{"id": i} for i in range(50)]
    for k in (1, 5, 20):
        rng = random.Random(0)
        ids = list(range(50))
        rng.shuffle(ids)
        want = [ids[i] for i in rng.sample(range(50), k)]
        assert [r["id"] for r in knn_prompt_sample(records, k)] == want, k
    assert knn_prompt_sample(records, None) == records and knn_prompt_sample(records, 50) == records


def test_names_select_tasks_of_a_folder(tmp_path):
    """A folder of two tasks loaded with names=[one] gives that one only."""
    rec = [{"id": 0, "input": {"text": "x"}, "label": 0}]
    folder = write_tasks(tmp_path / "t", {"alpha": rec, "beta": rec})
    assert [t.name for t in load_tasks(folder, names=["beta"])] == ["beta"]
    assert [t.name for t in load_tasks(folder)] == ["alpha", "beta"]


def test_verbalizers_under_a_bos_adding_tokenizer_are_single_tokens(tmp_path):
    """A tokenizer that puts a BOS before every text makes each word two ids; the word's own id is the verbalizer."""
    from test_official_decoders import llama3_style_tokenizer

    tok = llama3_style_tokenizer()
    candidates = [" the", " of", " and", " to", " a", " in"]
    words = [w for w in candidates if len(tok(w, add_special_tokens=False)["input_ids"]) == 1]
    assert len(words) >= 2 and all(len(tok(w)["input_ids"]) == 2 for w in words[:2])  # a BOS is added
    entry = dict(ENTRY, verbalizers=[[words[0]], [words[1]]])
    [task] = load_tasks(write_tasks(tmp_path / "t", {"toy": [{"id": 0, "input": {"text": "x"}, "label": 0}]}, entry))
    want = [[tok(w, add_special_tokens=False)["input_ids"][0]] for w in words[:2]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert single_token_verbalizers(task, tok) == want


def test_generation_with_a_static_cache_is_refused(tmp_path):
    """The paired cache is dynamic only: cache_implementation='static' is refused up front, not run wrongly."""
    from lightning_memdec.inference.interpolated_lm import InterpolatedLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, mem = save_tiny(tmp_path / "b", n_layer=1), save_tiny(tmp_path / "m", n_layer=1, seed=1)
        lm = InterpolatedLM.from_pretrained(str(base), str(mem), lmbda=0.3)
        with pytest.raises(ValueError, match="static"):
            lm.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False, cache_implementation="static")


def test_a_yaml_task_reads_its_dev_split(tmp_path):
    """λ is chosen on a task's dev split: a YAML task's `dev:` path was ignored, λ came from the fallback."""
    import yaml

    records = [{"id": i, "input": {"text": f"x{i}"}, "label": i % 2} for i in range(4)]
    for split, recs in (("test", records), ("dev", records[:2])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    spec = tmp_path / "tasks.yaml"
    spec.write_text(yaml.safe_dump({"toy": dict(ENTRY, test="test.jsonl", dev="dev.jsonl")}))
    [task] = load_tasks(spec)
    assert task.splits["dev"] == records[:2] and task.splits["test"] == records


def test_a_task_of_one_class_is_refused(tmp_path):
    """Zero-shot classification needs two classes at least: one class scores every example correct."""
    entry = dict(ENTRY, labels=["only"], verbalizers=[[" bad"]])
    with pytest.raises(TaskError, match="labels"):
        load_tasks(write_tasks(tmp_path / "t", {"toy": [{"id": 0, "input": {"text": "x"}, "label": 0}]}, entry))


def test_a_sample_of_all_the_records_keeps_their_order():
    """n_sample at the number of records samples nothing: predictions and intervals keep the file's order."""
    records = [{"id": i} for i in range(7)]
    assert knn_prompt_sample(records, 7) == records and knn_prompt_sample(records, None) == records


def test_the_decoder_s_skipped_tokens_wait_in_order_and_move_with_their_beams():
    """Tokens a router let the decoder skip are handed over in the order they came, and a beam reorder (or a batch
    expansion) moves them with their rows: else the decoder caught up on another beam's tokens, or on them reversed."""
    from lightning_memdec.hf.paired_generation import PairCache

    cache = PairCache()
    first, second = torch.tensor([[1, 2], [3, 4]]), torch.tensor([[5], [6]])  # [beams, tokens]
    cache.defer(first, first + 100)
    cache.defer(second, second + 100)
    cache.reorder_cache(torch.tensor([1, 0]))
    ids, positions = cache.take_pending()
    expected = torch.tensor([[3, 4, 6], [1, 2, 5]])  # each row's tokens in order, the rows swapped
    assert torch.equal(ids, expected) and torch.equal(positions, expected + 100)
    assert cache.take_pending() == (None, None)  # handed over once
    cache.defer(torch.tensor([[7], [8]]), None)
    cache.batch_repeat_interleave(2)
    assert torch.equal(cache.take_pending()[0], torch.tensor([[7], [7], [8], [8]]))


def test_two_tasks_of_one_size_each_score_their_own_prompts(tmp_path):
    """The decoder's scores are cached per task: two tasks with as many examples each must not share them (the
    second task's + MemDec scores were the first's)."""
    from lightning_memdec.evaluation.downstream import downstream
    from lightning_memdec.evaluation.settings import Bootstrap, DownstreamMixing, Prompts

    base, mem = save_tiny(tmp_path / "base", n_layer=1), save_tiny(tmp_path / "mem", n_layer=1, seed=1)
    texts = {"alpha": ["A dull film.", "Great fun", "Fine.", "Bad plot"],
             "beta": ["Warm and funny", "Boring", "Superb acting", "Awful"]}  # fmt: skip
    folder = write_tasks(tmp_path / "t", {name: [{"id": i, "input": {"text": t}, "label": i % 2}
                                                 for i, t in enumerate(ts)] for name, ts in texts.items()})  # fmt: skip

    def memdec_scores(names, out):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            downstream([str(folder)], [str(base)], tmp_path / out, memdec=str(mem), mix=DownstreamMixing(lmbda=0.5),
                       prompts=Prompts(batch_size=2, device="cpu", task_names=names),
                       bootstrap=Bootstrap(resamples=10))  # fmt: skip
        lines = (tmp_path / out / "predictions.jsonl").read_text().splitlines()
        return {(p["task"], p["id"]): p["scores"] for p in map(json.loads, lines) if p["system"].endswith("+ MemDec")}

    both, beta_alone = memdec_scores(None, "both"), memdec_scores(["beta"], "beta")
    for i in range(4):
        assert both[("beta", i)] == pytest.approx(beta_alone[("beta", i)], abs=1e-6)
