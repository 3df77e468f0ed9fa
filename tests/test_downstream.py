"""`memdec downstream`: kNN-Prompt's DCPMI on tiny random models, task validation, bootstrap, report, CLI."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import save_tiny

import lightning_memdec.evaluation.downstream as ds
from lightning_memdec.cli import main
from lightning_memdec.evaluation.dcpmi import choose_lambda, dcpmi_scores
from lightning_memdec.evaluation.downstream import downstream
from lightning_memdec.evaluation.downstream_report import bootstrap_interval
from lightning_memdec.evaluation.downstream_tasks import TaskError, load_tasks, single_token_verbalizers
from lightning_memdec.evaluation.settings import Bootstrap, DownstreamMixing, GeneralSplit, KNNLMRows, Prompts
from lightning_memdec.hf.loading import load_causal_lm
from lightning_memdec.inference.knnlm import KNNLM
from lightning_memdec.io.embedded import load_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:task .* multi-token verbalizers dropped")
ENTRY = {
    "template": "{text} It was",
    "domain_premise": " It was",
    "labels": ["negative", "positive"],
    "primary_verbalizers": [" terrible", " great"],
    "verbalizers": [[" terrible", " bad", " unfaithful"], [" great", " good"]],  # " unfaithful": 3 GPT-2 tokens
}
TEXTS = [
    "A dull, tired film.",
    "One of the best performances of the year, and a script that never lets go",
    "Fine.",
    "The plot wanders and the jokes fall flat for nearly two hours of screen time",
    "Warm and funny",
]


def write_task_folder(root: Path, entry=ENTRY, records=None, dev=True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "tasks.json").write_text(json.dumps({"toy": entry}))
    (root / "toy").mkdir(exist_ok=True)
    records = (
        records
        if records is not None
        else [{"id": i, "input": {"text": t}, "label": i % 2} for i, t in enumerate(TEXTS)]
    )
    (root / "toy" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if dev:
        (root / "toy" / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[::-1]))
    return root


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("decoder") / "dec", seed=1)


def read_predictions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def direct_next_token_probs(model, tok, text: str) -> torch.Tensor:
    """softmax by hand over the last logits of one unpadded prompt."""
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].double()
    e = torch.exp(logits - logits.max())
    return e / e.sum()


def direct_dcpmi(p_x: torch.Tensor, p_d: torch.Tensor, classes: list[list[int]]) -> list[float]:
    return [sum(math.log(p_x[v] + 1e-10) - math.log(p_d[v] + 1e-10) for v in cls) for cls in classes]


def test_dcpmi_matches_a_direct_computation_and_lambda_zero_is_the_base(tmp_path, tiny_gpt2, tiny_decoder):
    tasks = write_task_folder(tmp_path / "tasks")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="unfaithful"):
        downstream(
            [str(tasks)],
            [str(tiny_gpt2)],
            out,
            memdec=str(tiny_decoder),
            mix=DownstreamMixing(lmbda=0.3),
            prompts=Prompts(batch_size=2, device="cpu"),
            bootstrap=Bootstrap(resamples=50),
        )
    preds = read_predictions(out)
    tok = load_tokenizer("gpt2")
    base, dec = load_causal_lm(tiny_gpt2).eval(), load_causal_lm(tiny_decoder).eval()
    classes = [[tok(w)["input_ids"][0] for w in ENTRY["verbalizers"][0][:2]], [tok(" great")["input_ids"][0],
               tok(" good")["input_ids"][0]]]  # fmt: skip
    pb_d, pm_d = direct_next_token_probs(base, tok, " It was"), direct_next_token_probs(dec, tok, " It was")
    by_key = {(p["system"], p["id"]): p for p in preds}
    for i, text in enumerate(TEXTS):
        prompt = text + " It was"
        pb, pm = direct_next_token_probs(base, tok, prompt), direct_next_token_probs(dec, tok, prompt)
        want_base = direct_dcpmi(pb, pb_d, classes)
        want_mix = direct_dcpmi(0.7 * pb + 0.3 * pm, 0.7 * pb_d + 0.3 * pm_d, classes)
        got_base = by_key[(str(tiny_gpt2), i)]["scores"]
        got_mix = by_key[(f"{tiny_gpt2} + MemDec", i)]["scores"]
        np.testing.assert_allclose([got_base["negative"], got_base["positive"]], want_base, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose([got_mix["negative"], got_mix["positive"]], want_mix, rtol=1e-4, atol=1e-4)
    # λ = 0 is the base bit for bit, on the arrays the stage keeps
    x, d = np.random.default_rng(0).normal(size=(4, 5)), np.random.default_rng(1).normal(size=5)
    cols = [[0, 1], [2, 3, 4]]
    base_only = dcpmi_scores(x - 3, d - 3, cols)
    np.testing.assert_array_equal(dcpmi_scores(x - 3, d - 3, cols, x - 1, d - 1, 0.0), base_only)


def test_outputs_and_predictions_format(tmp_path, tiny_gpt2, tiny_decoder):
    tasks = write_task_folder(tmp_path / "tasks")
    out = tmp_path / "out"
    report = downstream(
        [str(tasks)],
        [str(tiny_gpt2)],
        out,
        memdec=str(tiny_decoder),
        mix=DownstreamMixing(lambda_grid=[0.1, 0.5, 0.9]),
        prompts=Prompts(batch_size=3, device="cpu"),
        bootstrap=Bootstrap(resamples=100),
    )
    preds = read_predictions(out)
    assert len(preds) == 2 * len(TEXTS)  # 1 task × 2 systems × 5 examples
    for p in preds:
        assert set(p) == {"task", "id", "system", "scores", "pred", "label", "tied"}
        assert set(p["scores"]) == {"negative", "positive"}
        scores = [p["scores"]["negative"], p["scores"]["positive"]]
        assert p["pred"] == int(np.argmax(scores)) and p["tied"] == scores.count(max(scores))
    cell = report["accuracy"]["toy"][f"{tiny_gpt2} + MemDec"]
    assert cell["lmbda_from"] == "dev" and cell["lmbda"] in (0.1, 0.5, 0.9)
    assert len(cell["dev_accuracy_by_lambda"]) == 3
    mine = [p for p in preds if p["system"] == f"{tiny_gpt2} + MemDec"]
    # tied credit, from the records alone: 1/tied when the label's score is the top one (pred == label without ties)
    names = ["negative", "positive"]
    credit = [(p["scores"][names[p["label"]]] == max(p["scores"].values())) / p["tied"] for p in mine]
    assert cell["accuracy"] == pytest.approx(np.mean(credit))
    assert json.loads((out / "report.json").read_text())["mean_accuracy"][str(tiny_gpt2)] == pytest.approx(
        report["accuracy"]["toy"][str(tiny_gpt2)]["accuracy"]
    )
    assert "| toy | 5 |" in (out / "report.md").read_text()
    low, high = cell["ci95"]
    assert low <= cell["accuracy"] <= high
    row = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| toy | 5 |"))
    assert f"{100 * cell['accuracy']:.1f} [{100 * low:.1f}, {100 * high:.1f}]" in row
    assert (out / "accuracy.png").stat().st_size > 0
    assert not list(out.glob("*.tmp*"))


def test_dcpmi_smooths_a_verbalizer_the_domain_premise_makes_unlikely():
    """log(P(v|x) + 1e-10) − log(P(v|d) + 1e-10), by hand, where P(v|d) is 1e-12 or 0 (p_kNN at λ = 1 with no
    neighbour on the verbalizer): finite, and the smoothing is what sets the score."""
    x, d = np.array([[0.30, 0.20, 0.10]]), np.array([0.50, 1e-12, 0.0])
    with np.errstate(divide="ignore"):
        scores = dcpmi_scores(np.log(x), np.log(d), [[0], [1], [2]])
    want = np.log(x[0] + 1e-10) - np.log(d + 1e-10)
    np.testing.assert_allclose(scores[0], want, rtol=1e-12)
    assert np.isfinite(scores).all()


def test_a_prompt_longer_than_max_length_keeps_its_last_tokens():
    """The template's end (what the verbalizer follows) stays; the start of a long text is cut."""
    from lightning_memdec.evaluation.dcpmi import PromptScorer

    tok = load_tokenizer("gpt2")
    prompt = "A very long review that runs on and on before the template ends with It was"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert PromptScorer(tok, max_length=4, batch_size=1).encode([prompt]) == [ids[-4:]]
    assert PromptScorer(tok, max_length=len(ids), batch_size=1).encode([prompt]) == [ids]


def test_the_accuracy_figure_draws_each_interval_where_it_lies(tmp_path, monkeypatch):
    """accuracy.png's error bars run from the interval's low to its high end (asymmetric near 0 % and 100 %)."""
    import matplotlib.axes

    from lightning_memdec.evaluation.downstream_report import plot_accuracy

    drawn, bar = [], matplotlib.axes.Axes.bar

    def spy(self, x, height, width=0.8, **kwargs):
        below, above = kwargs["yerr"]
        drawn.extend((h - b, h + a) for h, b, a in zip(height, below, above))
        return bar(self, x, height, width, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", spy)
    acc = {"t": {"S": {"accuracy": 0.6, "ci95": (0.5, 0.65)}, "R": {"accuracy": 0.95, "ci95": (0.9, 1.0)}}}
    plot_accuracy(acc, ["S", "R"], tmp_path / "a.png")
    assert drawn == [pytest.approx((50, 65)), pytest.approx((90, 100))]


def test_each_task_is_resampled_with_its_own_seed():
    """Task i's interval comes from draws seeded with seed + i (as report.json says): two tasks of equal outcomes get
    the intervals a direct bootstrap with seeds 5 and 6 gives."""
    from lightning_memdec.evaluation.downstream_report import accuracy_summary

    correct = np.random.default_rng(0).random(30) < 0.6

    def result(task: str) -> dict:
        return {"task": task, "system": "B", "base": "B", "kind": "base", "lmbda": None, "lmbda_from": None,
                "dev_curve": None, "scores": np.stack([~correct, correct], 1).astype(float),
                "labels": np.ones(30, int), "knn_temperature": None, "knn_temperature_from": None,
                "knn_temperature_at_edge": False, "dev_accuracy_by_temperature": None}  # fmt: skip

    summary = accuracy_summary([result("t1"), result("t2")], n_resamples=200, seed=5)
    for task, seed in (("t1", 5), ("t2", 6)):
        draws = np.random.default_rng(seed).integers(0, 30, size=(200, 30))
        want = np.percentile(correct[draws].mean(1), [2.5, 97.5])
        assert summary["accuracy"][task]["B"]["ci95"] == pytest.approx(tuple(want))


def test_a_prompt_longer_than_a_model_s_context_is_cut_to_it(tmp_path):
    """A base of 32 positions and a ~60-token prompt with the default --prompts.max_length (1024): scored on its
    last 32 tokens (it failed after loading the models with an IndexError when the cap was not the context)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32)).save_pretrained(tmp_path / "base")
    load_tokenizer("gpt2").save_pretrained(tmp_path / "base")
    long = " ".join(["a film that goes on"] * 12)
    records = [{"id": 0, "input": {"text": long}, "label": 0}, {"id": 1, "input": {"text": "Fine."}, "label": 1}]
    entry = {**ENTRY, "verbalizers": [[" bad"], [" good"]]}
    tasks = write_task_folder(tmp_path / "tasks", entry, records, dev=False)
    report = downstream([str(tasks)], [str(tmp_path / "base")], tmp_path / "out", prompts=Prompts(device="cpu"),
                        bootstrap=Bootstrap(resamples=10))  # fmt: skip
    scored = read_predictions(tmp_path / "out")
    assert [p["id"] for p in scored] == [0, 1] and report["accuracy"]["toy"][str(tmp_path / "base")]["n"] == 2
    base = load_causal_lm(str(tmp_path / "base")).eval()
    tok = load_tokenizer("gpt2")
    ids = tok(f"{long} It was", add_special_tokens=False)["input_ids"][-32:]
    premise = tok(" It was", add_special_tokens=False)["input_ids"]
    bad, good = tok(" bad")["input_ids"][0], tok(" good")["input_ids"][0]
    with torch.no_grad():
        x = base(torch.tensor([ids])).logits[0, -1].double().log_softmax(-1)
        d = base(torch.tensor([premise])).logits[0, -1].double().log_softmax(-1)
    want = dcpmi_scores(x[[bad, good]][None].numpy(), d[[bad, good]].numpy(), [[0], [1]])[0]
    assert [scored[0]["scores"][n] for n in ("negative", "positive")] == pytest.approx(want.tolist(), abs=1e-4)


def test_choose_lambda_takes_the_best_dev_accuracy_first_on_ties():
    # two examples, one column per class: the other model flips example 1 to the right class once λ > 0.2
    base_x, base_d = np.log([[0.6, 0.4], [0.6, 0.4]]), np.log([0.5, 0.5])
    other_x, other_d = np.log([[0.6, 0.4], [0.1, 0.9]]), np.log([0.5, 0.5])
    dev = {"base_x": base_x, "base_d": base_d, "other_x": other_x, "other_d": other_d}
    lmbda, accs = choose_lambda(dev, [[0], [1]], np.array([0, 1]), [0.1, 0.15, 0.3, 0.9])
    assert accs == [0.5, 0.5, 1.0, 1.0] and lmbda == 0.3


def test_bootstrap_interval_matches_numpy():
    correct = np.random.default_rng(3).random(57) < 0.7
    rng = np.random.default_rng(11)
    idx = rng.integers(0, 57, size=(400, 57))
    means = correct.astype(float)[idx].mean(axis=1)
    want = np.percentile(means, [2.5, 97.5])
    assert bootstrap_interval(correct, 400, seed=11) == pytest.approx(tuple(want))
    low, high = bootstrap_interval(correct, 400, seed=11)
    assert low <= correct.mean() <= high


def test_verbalizer_filtering_names_dropped_words_and_refuses_an_empty_class(tmp_path):
    tok = load_tokenizer("gpt2")
    [task] = load_tasks(write_task_folder(tmp_path / "a"))
    with pytest.warns(UserWarning, match="' unfaithful'"):
        ids = single_token_verbalizers(task, tok, "gpt2")
    assert ids == [[tok(" terrible")["input_ids"][0], tok(" bad")["input_ids"][0]],
                   [tok(" great")["input_ids"][0], tok(" good")["input_ids"][0]]]  # fmt: skip
    [primary] = load_tasks(write_task_folder(tmp_path / "a"), verbalizer_set="primary")
    assert primary.verbalizers == [[" terrible"], [" great"]]


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing_label", r"test\.jsonl:2: record has no 'label'"),
        ("label_range", r"test\.jsonl:1: field 'label' is 2, not a class index in 0\.\.1"),
        ("template_field", r"test\.jsonl:1: field 'input' lacks 'text'"),
        ("entry_field", r"tasks\.json: task 'toy' has no 'domain_premise'"),
        ("multi_token_class", r"class 1 \(positive\) has no single-token verbalizer"),
        ("bad_json", r"test\.jsonl:1: not a JSON object"),
        ("repeated_id", r"test\.jsonl:2: id 0 is the id of line 1 too; ids must be unique"),
    ],
)
def test_bad_task_files_fail_before_any_model_is_loaded(tmp_path, monkeypatch, tiny_gpt2, case, match):
    entry, records = dict(ENTRY), [{"id": 0, "input": {"text": "ok"}, "label": 0}, {"id": 1, "input": {"text": "x"}}]
    if case != "missing_label":
        records = [{"id": 0, "input": {"text": "ok"}, "label": 2 if case == "label_range" else 0}]
    if case == "template_field":
        records = [{"id": 0, "input": {"body": "ok"}, "label": 0}]
    if case == "repeated_id":  # one example scored and counted twice
        records = [{"id": 0, "input": {"text": "ok"}, "label": 0}, {"id": 0, "input": {"text": "ok"}, "label": 0}]
    if case == "entry_field":
        del entry["domain_premise"]
    if case == "multi_token_class":
        entry["verbalizers"] = [[" bad"], [" unfaithful", " unremarkable"]]
    root = write_task_folder(tmp_path / "t", entry, records, dev=False)
    if case == "bad_json":
        (root / "toy" / "test.jsonl").write_text("{not json\n")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the task files were checked")

    monkeypatch.setattr(ds, "load_causal_lm", no_model)
    with pytest.raises(TaskError, match=match):
        downstream([str(root)], [str(tiny_gpt2)], tmp_path / "out", prompts=Prompts(device="cpu"))


def test_yaml_tasks_and_knnlm_system(tmp_path, tiny_gpt2, biomed_datastore, biomed_index):
    data = tmp_path / "mine"
    data.mkdir()
    (data / "test.jsonl").write_text(
        "".join(json.dumps({"id": 10 + i, "input": {"text": t}, "label": i % 2}) + "\n" for i, t in enumerate(TEXTS))
    )
    spec = tmp_path / "tasks.yaml"
    spec.write_text(
        # the task file's λ is the decoders'; kNN-LM's is its own (here the fallback: no dev split)
        yaml.safe_dump(
            {"mine": {**ENTRY, "verbalizers": [[" bad"], [" good"]], "test": "mine/test.jsonl", "lmbda": 0.3}}
        )
    )
    out = tmp_path / "out"
    report = downstream(
        [str(spec)],
        [str(tiny_gpt2)],
        out,
        knn=KNNLMRows(datastore=[str(biomed_datastore)], index=[str(biomed_index)], k=8, temperature=4.0),
        mix=DownstreamMixing(fallback_lmbda=0.4),
        prompts=Prompts(batch_size=2, device="cpu"),
        bootstrap=Bootstrap(resamples=20),
    )
    cell = report["accuracy"]["mine"][f"{tiny_gpt2} + kNN-LM"]
    assert cell["lmbda"] == 0.4 and cell["lmbda_from"].startswith("fallback")
    # against the kNN-LM's own mixed distribution on one unpadded prompt
    tok = load_tokenizer("gpt2")
    knnlm = KNNLM(str(tiny_gpt2), biomed_datastore, biomed_index, k=8, temperature=4.0, lmbda=0.4)
    bad, good = tok(" bad")["input_ids"][0], tok(" good")["input_ids"][0]

    def probs(text):
        return knnlm.log_probs(torch.tensor([tok(text)["input_ids"]]))[0, -1].double().exp()

    p_d = probs(" It was")
    preds = {p["id"]: p for p in read_predictions(out) if p["system"].endswith("kNN-LM")}
    for i, text in enumerate(TEXTS[:2]):
        want = direct_dcpmi(probs(text + " It was"), p_d, [[bad], [good]])
        got = preds[10 + i]["scores"]
        np.testing.assert_allclose([got["negative"], got["positive"]], want, rtol=1e-4, atol=1e-4)


def test_cli_stage_end_to_end(tmp_path, tiny_gpt2, tiny_decoder):
    tasks = write_task_folder(tmp_path / "tasks")
    out = tmp_path / "cli"
    main(["downstream", "--tasks", str(tasks), "--bases", str(tiny_gpt2), "--memdec", str(tiny_decoder),
          "--out", str(out), "--mix.lmbda", "0.25", "--prompts.n_sample", "3", "--prompts.device", "cpu",
          "--bootstrap.resamples", "30"])  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["systems"] == [str(tiny_gpt2), f"{tiny_gpt2} + MemDec"]
    assert report["accuracy"]["toy"][f"{tiny_gpt2} + MemDec"]["lmbda"] == 0.25
    assert report["accuracy"]["toy"][str(tiny_gpt2)]["n"] == 3
    assert len(read_predictions(out)) == 6


def test_tied_class_scores_share_the_credit_whatever_order_the_classes_are_listed_in():
    """p_kNN alone (λ = 1) gives both verbalizers no mass: every score is log(1e-10) − log(1e-10) = 0 exactly. argmax
    gave every tie to the first-listed class, so the λ sweep picked λ = 1 whenever that class was dev's majority."""
    from lightning_memdec.evaluation.downstream_differences import credit

    rng = np.random.default_rng(0)
    labels = (rng.random(40) < 0.2).astype(int)  # 80 % class 0, the first listed
    informative = np.where(labels[:, None] == np.arange(2), -1.0, -1.6) + rng.normal(0, 0.4, (40, 2))  # ~75 % right
    dev = {"base_x": informative, "base_d": np.full(2, -1.3), "other_x": np.full((40, 2), -np.inf),
           "other_d": np.full(2, -np.inf)}  # fmt: skip
    want_base = float(np.mean(informative.argmax(axis=1) == labels))
    for order in ([0, 1], [1, 0]):  # the task's classes as listed, and swapped
        lmbda, curve = choose_lambda(dev, [[c] for c in order], np.array([order.index(y) for y in labels]), [0.0, 1.0])
        assert curve == pytest.approx([want_base, 0.5]) and lmbda == 0.0
    scores = np.array([[0.0, 0.0, -1.0], [2.0, 1.0, 2.0], [0.5, 3.0, 1.0], [1.0, 1.0, 1.0]])
    direct = [1 / 2, 1 / 2, 0.0, 1 / 3]  # label 0 each time: 2-way tie, 2-way tie, wrong, 3-way tie
    np.testing.assert_allclose(credit(scores, np.zeros(4, int)), direct)


def test_verbalizers_without_a_leading_space_after_a_prompt_without_one_are_named():
    """A user's task with 'great' for ' great': each word was scored as the end of the prompt's last word."""
    from lightning_memdec.evaluation.downstream_tasks import Task, single_token_verbalizers

    tok = load_tokenizer("gpt2")
    task = Task("t", "{text} It was", "It was", ["negative", "positive"], [["bad"], ["great"]])
    with pytest.warns(UserWarning, match=r"2 verbalizers have no leading space \('bad', 'great'\)"):
        single_token_verbalizers(task, tok)
    spaced = Task("t", "{text} It was", "It was", ["negative", "positive"], [[" bad"], [" great"]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        single_token_verbalizers(spaced, tok)
        single_token_verbalizers(Task("t", "{text} It was ", "It was ", task.labels, task.verbalizers), tok)


@pytest.mark.parametrize("template, premise, named", [("{text} It was", "It was ", "template"),
                                                      ("{text} It was ", "It was", "domain premise")])  # fmt: skip
def test_a_template_or_a_premise_alone_that_glues_the_verbalizers_is_named(template, premise, named):
    """Either glues a verbalizer onto its last word: the template's prompts (p(y | x)) or the premise (PMI's
    denominator); the warning came only when both did."""
    from lightning_memdec.evaluation.downstream_tasks import Task, single_token_verbalizers

    task = Task("t", template, premise, ["negative", "positive"], [["bad"], ["great"]])
    with pytest.warns(UserWarning, match=rf"and the {named} end without one"):
        single_token_verbalizers(task, load_tokenizer("gpt2"))


@pytest.fixture(scope="module")
def verbalizer_store(tmp_path_factory, tiny_gpt2) -> tuple[Path, Path]:
    """A datastore (and Flat index) whose next tokens are the task's verbalizers after varied reviews, so that p_kNN
    gives them mass and the temperature changes the scores (the biomedical store gives them none at any T)."""
    from lightning_memdec.io.token_corpus import tokenize
    from lightning_memdec.retrieval.faiss_index import build_index
    from lightning_memdec.retrieval.settings import IndexSettings
    from lightning_memdec.stages.datastore import build_datastore
    from lightning_memdec.stages.settings import Hardware, Windows

    root = tmp_path_factory.mktemp("verbalizer-store")
    words = [" terrible", " bad", " great", " good"]
    docs = [f"{t} It was{words[(3 * i + j) % 4]}." for i, t in enumerate(TEXTS) for j in range(4)]
    (root / "reviews.txt").write_text("\n\n".join(docs) + "\n")
    corpus = tokenize([str(root / "reviews.txt")], root / "corpus", "gpt2")
    store = build_datastore(corpus, str(tiny_gpt2), root / "ds", windows=Windows(window=64, stride=32, batch_size=4),
                            hardware=Hardware(accelerator="cpu"))  # fmt: skip
    return store, build_index(store, root / "flat", plan=IndexSettings(factory="Flat"))


def test_knnlm_temperature_and_lambda_chosen_on_dev_by_hand(tmp_path, tiny_gpt2, verbalizer_store):
    """kNN-LM's T is tuned on dev as its λ is (the strongest baseline, as `evaluate` tunes it): the (T, λ) with the
    best dev accuracy, the first on ties, recomputed with KNNLM's own mixture on unpadded prompts; the test scores and
    the general perplexity are those of the chosen pair."""
    store, index = verbalizer_store
    records = [{"id": i, "input": {"text": t}, "label": (i + i // 5) % 2} for i, t in enumerate(TEXTS * 3)]
    tasks = write_task_folder(tmp_path / "tasks", records=records)
    general = "The cat sat on the mat.\n\nA second document, a little longer than the first one.\n"
    (tmp_path / "general.txt").write_text(general)
    temperatures, lambdas = [0.5, 8.0, 512.0], [0.5, 1.0]  # λ = 0 (the base alone) would tie every T on dev
    report = downstream(
        [str(tasks)],
        [str(tiny_gpt2)],
        tmp_path / "out",
        knn=KNNLMRows(datastore=[str(store)], index=[str(index)], k=8),
        mix=DownstreamMixing(lambda_grid=lambdas, temperature_grid=temperatures),
        general=GeneralSplit(text=str(tmp_path / "general.txt")),
        prompts=Prompts(batch_size=4, device="cpu"),
        bootstrap=Bootstrap(resamples=20),
    )
    tok = load_tokenizer("gpt2")
    classes = [[tok(w)["input_ids"][0] for w in ENTRY["verbalizers"][0][:2]], [tok(" great")["input_ids"][0],
               tok(" good")["input_ids"][0]]]  # fmt: skip
    dev = records[::-1]

    def scores(knnlm, rows):
        def probs(text):
            return knnlm.log_probs(torch.tensor([tok(text)["input_ids"]]))[0, -1].double().exp()

        p_d = probs(" It was")
        return np.array([direct_dcpmi(probs(r["input"]["text"] + " It was"), p_d, classes) for r in rows])

    def credit(s, labels):  # 1 right, 1/m among m classes tied at the top
        top = s == s.max(axis=1, keepdims=True)
        return top[np.arange(len(labels)), labels] / top.sum(axis=1)

    dev_labels = np.array([r["label"] for r in dev])
    by_pair = {}
    for t in temperatures:
        for lmbda in lambdas:
            knnlm = KNNLM(str(tiny_gpt2), store, index, k=8, temperature=t, lmbda=lmbda)
            by_pair[t, lmbda] = credit(scores(knnlm, dev), dev_labels).mean()
    best_t = {t: max(by_pair[t, lmbda] for lmbda in lambdas) for t in temperatures}
    assert len(set(best_t.values())) > 1, "every T ties on dev: the choice would not be tested"
    want_t = next(t for t in temperatures if best_t[t] == max(best_t.values()))
    want_lmbda = next(lmbda for lmbda in lambdas if by_pair[want_t, lmbda] == best_t[want_t])
    cell = report["accuracy"]["toy"][f"{tiny_gpt2} + kNN-LM"]
    assert (cell["knn_temperature"], cell["knn_temperature_from"]) == (want_t, "dev")
    assert (cell["lmbda"], cell["lmbda_from"]) == (want_lmbda, "dev")
    assert cell["dev_accuracy_by_knn_temperature"] == pytest.approx({f"{t:g}": best_t[t] for t in temperatures})
    assert cell["knn_temperature_at_edge"] is (want_t in (temperatures[0], temperatures[-1]) and
                                               list(best_t.values()).count(best_t[want_t]) == 1)  # fmt: skip
    chosen = KNNLM(str(tiny_gpt2), store, index, k=8, temperature=want_t, lmbda=want_lmbda)
    want = scores(chosen, records)
    got = [p["scores"] for p in read_predictions(tmp_path / "out") if p["system"].endswith("kNN-LM")]
    np.testing.assert_allclose([[g["negative"], g["positive"]] for g in got], want, rtol=1e-4, atol=1e-4)
    # general perplexity of the chosen mixture: one window holds the text, log p(gold) by the KNNLM itself
    ids = torch.tensor([t for d in general.strip().split("\n\n") for t in tok(d)["input_ids"] + [tok.eos_token_id]])
    gold = chosen.gold_log_probs(ids[None, :-1], ids[None, 1:])
    mixed = torch.logaddexp(gold["base"][0] + math.log(1 - want_lmbda), gold["knn"][0] + math.log(want_lmbda))
    entry = report["general"]["mixtures"][f"{tiny_gpt2} + kNN-LM"][f"{want_lmbda:g} at T={want_t:g}"]
    assert entry["ppl"] == pytest.approx(math.exp(-mixed.mean().item()), rel=1e-5)


@pytest.mark.parametrize("temperatures", [[0.5, 8.0], [8.0, 512.0]])
def test_knnlm_temperature_at_an_end_of_its_grid_is_flagged_unless_another_ties(
    tmp_path, tiny_gpt2, verbalizer_store, temperatures
):
    """On this dev split T = 8 and T = 512 tie (best λ), T = 0.5 is worse (the test above): T = 8 at the end of
    [0.5, 8] may hide a better T beyond it (flagged); at the start of [8, 512], tied with 512, it says nothing."""
    store, index = verbalizer_store
    records = [{"id": i, "input": {"text": t}, "label": (i + i // 5) % 2} for i, t in enumerate(TEXTS * 3)]
    report = downstream(
        [str(write_task_folder(tmp_path / "tasks", records=records))],
        [str(tiny_gpt2)],
        tmp_path / "out",
        knn=KNNLMRows(datastore=[str(store)], index=[str(index)], k=8),
        mix=DownstreamMixing(lambda_grid=[0.5, 1.0], temperature_grid=temperatures),
        prompts=Prompts(batch_size=8, device="cpu"),
        bootstrap=Bootstrap(resamples=10),
    )
    cell = report["accuracy"]["toy"][f"{tiny_gpt2} + kNN-LM"]
    assert cell["knn_temperature"] == 8.0
    assert cell["knn_temperature_at_edge"] is (temperatures == [0.5, 8.0])
    assert ("T=8 (dev) ⚠ at grid edge" in (tmp_path / "out" / "report.md").read_text()) is (temperatures == [0.5, 8.0])
