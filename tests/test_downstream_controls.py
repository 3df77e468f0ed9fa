"""`memdec downstream`'s controls (the other base and the CE-only decoder, each λ tuned as MemDec's), paired intervals
of the differences, edge-λ flags, the headline and the general perplexity, against direct computations on tiny
models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import save_tiny
from test_downstream import ENTRY, TEXTS, direct_dcpmi, direct_next_token_probs, read_predictions, write_task_folder

import lightning_memdec.evaluation.downstream as ds
from lightning_memdec.evaluation.downstream import downstream
from lightning_memdec.evaluation.downstream_differences import paired_differences, task_draws
from lightning_memdec.evaluation.downstream_report import accuracy_summary, write_downstream_report
from lightning_memdec.evaluation.settings import Bootstrap, DownstreamMixing, GeneralSplit, Prompts
from lightning_memdec.hf.loading import load_causal_lm
from lightning_memdec.io.embedded import load_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:task .* multi-token verbalizers dropped")
RESAMPLES = 200
GENERAL = "The cat sat on the mat.\n\nA second document, a little longer than the first one.\n\nThird and last.\n"


@pytest.fixture(scope="module")
def controlled(tmp_path_factory):
    """One run: two bases, MemDec and a CE-only decoder, λ chosen on dev over {0, 0.5, 1}, a general text."""
    root = tmp_path_factory.mktemp("controls")
    models = {
        name: str(save_tiny(root / name, seed=seed)) for name, seed in (("a", 0), ("b", 2), ("mem", 1), ("ce", 3))
    }
    records = [{"id": i, "input": {"text": t}, "label": (i + i // 5) % 2} for i, t in enumerate(TEXTS * 3)]
    tasks = write_task_folder(root / "tasks", records=records)
    (root / "general.txt").write_text(GENERAL)
    report = downstream(
        [str(tasks)],
        [models["a"], models["b"]],
        root / "out",
        memdec=models["mem"],
        ce_only=models["ce"],
        mix=DownstreamMixing(lambda_grid=[0.0, 0.5, 1.0]),
        general=GeneralSplit(text=str(root / "general.txt")),
        prompts=Prompts(max_length=128, batch_size=4, device="cpu"),
        bootstrap=Bootstrap(resamples=RESAMPLES, seed=5),
    )
    return models, records, report, read_predictions(root / "out")


def direct_correct(models, records, first: str, second: str | None, lmbda: float) -> np.ndarray:
    """Each example's credit (1 correct, 1/m among m classes tied at the top, else 0), DCPMI of (1 − λ)·p_first +
    λ·p_second computed by hand on unpadded prompts."""
    tok = load_tokenizer("gpt2")
    ids = [[tok(w)["input_ids"][0] for w in words if len(tok(w)["input_ids"]) == 1] for words in ENTRY["verbalizers"]]
    lms = [load_causal_lm(m).eval() for m in ([first] if second is None else [first, second])]

    def probs(text):
        ps = [direct_next_token_probs(lm, tok, text) for lm in lms]
        return ps[0] if second is None else (1 - lmbda) * ps[0] + lmbda * ps[1]

    p_d = probs(ENTRY["domain_premise"])
    scores = [direct_dcpmi(probs(r["input"]["text"] + " It was"), p_d, ids) for r in records]
    tops = [np.array(s) == max(s) for s in scores]
    return np.array([top[r["label"]] / top.sum() for top, r in zip(tops, records)])


def direct_interval(a: np.ndarray, b: np.ndarray, seed: int) -> list[float]:
    """95 % percentile interval of mean(a) − mean(b) over the same resampled examples, by hand."""
    idx = np.random.default_rng(seed).integers(0, len(a), size=(RESAMPLES, len(a)))
    return list(np.quantile(a[idx].mean(axis=1) - b[idx].mean(axis=1), [0.025, 0.975]))


def test_every_mixture_tunes_its_own_lambda_on_dev_and_matches_a_direct_computation(controlled):
    """The controls get MemDec's care: λ chosen on dev over the same grid (dev here: the test examples reversed, so
    its accuracy at each λ is the test accuracy computed by hand), then scored at it."""
    models, records, report, preds = controlled
    a, b = models["a"], models["b"]
    acc = report["accuracy"]["toy"]
    assert set(report["systems"]) == {a, f"{a} + MemDec", f"{a} + CE-only", f"{a} + {b}",
                                      b, f"{b} + MemDec", f"{b} + CE-only", f"{b} + {a}"}  # fmt: skip
    for base, other in ((a, b), (b, a)):
        for system, model in ((f"{base} + MemDec", models["mem"]), (f"{base} + {other}", other),
                              (f"{base} + CE-only", models["ce"])):  # fmt: skip
            curve = [direct_correct(models, records, base, model, lmbda).mean() for lmbda in (0.0, 0.5, 1.0)]
            assert acc[system]["lmbda_from"] == "dev"
            np.testing.assert_allclose(acc[system]["dev_accuracy_by_lambda"], curve)
            assert acc[system]["lmbda"] == (0.0, 0.5, 1.0)[int(np.argmax(curve))]
            want = direct_correct(models, records, base, model, acc[system]["lmbda"])
            assert acc[system]["accuracy"] == pytest.approx(want.mean())
            got = np.array([p["pred"] == p["label"] for p in preds if p["system"] == system])
            np.testing.assert_array_equal(got, want == 1)  # no ties among these scores


def test_paired_intervals_of_the_differences_match_a_direct_bootstrap(controlled):
    models, records, report, _ = controlled
    a, b, ce = models["a"], models["b"], models["ce"]
    lmbdas = {system: cell["lmbda"] for system, cell in report["accuracy"]["toy"].items()}
    alone = direct_correct(models, records, a, None, 0.0)
    memdec = direct_correct(models, records, a, models["mem"], lmbdas[f"{a} + MemDec"])
    ce_mix = direct_correct(models, records, a, ce, lmbdas[f"{a} + CE-only"])
    other_mix = direct_correct(models, records, a, b, lmbdas[f"{a} + {b}"])
    for name, first, second, mixed in ((f"{a} + MemDec − {a}", memdec, alone, [f"{a} + MemDec"]),
                                       (f"{a} + MemDec − {a} + CE-only", memdec, ce_mix,
                                        [f"{a} + MemDec", f"{a} + CE-only"]),
                                       (f"{a} + {b} − {a}", other_mix, alone, [f"{a} + {b}"])):  # fmt: skip
        cell = report["differences"][name]["tasks"]["toy"]
        assert cell["difference"] == pytest.approx(first.mean() - second.mean())
        assert cell["ci95"] == pytest.approx(direct_interval(first, second, seed=5))  # task 0: seed + 0
        low, high = cell["ci95"]
        assert cell["outside"] == (low > 0 or high < 0)
        assert cell["lmbda_at_edge"] == any(lmbdas[system] in (0.0, 1.0) for system in mixed)
    assert report["differences"][f"{a} + MemDec − {a}"]["what"] == "mixture − base alone"
    assert report["differences"][f"{a} + MemDec − {a} + CE-only"]["what"] == "MemDec − other mixture"


def test_general_perplexity_of_every_model_and_mixture(controlled):
    models, _, report, _ = controlled
    a, b = models["a"], models["b"]
    general = report["general"]
    tok = load_tokenizer("gpt2")
    docs = [d.strip() for d in GENERAL.split("\n\n")]
    ids = torch.tensor([t for d in docs for t in tok(d)["input_ids"] + [tok.eos_token_id]])
    assert general["tokens"] == len(ids) and general["documents"] == 3

    def gold(model):  # one window holds the whole text: log p(gold) of every position by hand
        with torch.no_grad():
            logits = load_causal_lm(model).eval()(input_ids=ids[None]).logits[0, :-1].double()
        return torch.log_softmax(logits, -1).gather(1, ids[1:, None])[:, 0]

    lp = {name: gold(models[key]) for name, key in ((a, "a"), (b, "b"), ("MemDec", "mem"), ("CE-only", "ce"))}
    assert set(general["models"]) == set(lp)
    for name, g in lp.items():
        assert general["models"][name]["ppl"] == pytest.approx(math.exp(-g.mean().item()), rel=1e-5)
    acc = report["accuracy"]["toy"]
    for system, base, other in ((f"{a} + MemDec", a, "MemDec"), (f"{a} + {b}", a, b), (f"{b} + CE-only", b, "CE-only")):
        lmbda = acc[system]["lmbda"]
        mixed = torch.log((1 - lmbda) * lp[base].exp() + lmbda * lp[other].exp())
        entry = general["mixtures"][system][f"{lmbda:g}"]
        assert entry["ppl"] == pytest.approx(math.exp(-mixed.mean().item()), rel=1e-5)
        assert entry["ci95"][0] <= entry["ppl"] <= entry["ci95"][1]


def test_report_md_has_headline_differences_and_general_tables(controlled, tmp_path):
    models, _, report, _ = controlled
    write_downstream_report(report, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert f"**Headline.** {report['headline']}" in text
    assert f"| {models['a']} + MemDec − {models['a']} + CE-only | MemDec − other mixture |" in text
    assert "| MemDec | |" in text and "general ppl" in text
    assert json.loads((tmp_path / "report.json").read_text())["headline"] == report["headline"]


def synthetic(task: str, system: str, base: str, kind: str, correct, lmbda) -> dict:
    correct = np.asarray(correct, dtype=bool)
    scores = np.stack([~correct, correct], axis=1).astype(float)  # argmax = 1 exactly where correct
    return {"task": task, "system": system, "base": base, "kind": kind, "lmbda": lmbda, "lmbda_from": "dev",
            "dev_curve": None, "scores": scores, "labels": np.ones(len(correct), dtype=int), "knn_temperature": None,
            "knn_temperature_from": None, "knn_temperature_at_edge": False,
            "dev_accuracy_by_temperature": None}  # fmt: skip


def test_edge_flags_mean_over_tasks_and_headline_by_hand():
    rng = np.random.default_rng(0)
    base = {"t1": rng.random(40) < 0.5, "t2": rng.random(25) < 0.5}
    better = {"t1": np.ones(40, dtype=bool), "t2": base["t2"].copy()}  # a clear gain on t1, none on t2
    results = []
    for task, lmbda in (("t1", 0.0), ("t2", 0.5)):
        results += [synthetic(task, "B", "B", "base", base[task], None),
                    synthetic(task, "B + MemDec", "B", "memdec", better[task], lmbda)]  # fmt: skip
    summary = accuracy_summary(results, n_resamples=RESAMPLES, seed=7, grid=[0.0, 0.5, 1.0])
    assert summary["accuracy"]["t1"]["B + MemDec"]["lmbda_at_edge"] is True
    assert summary["accuracy"]["t2"]["B + MemDec"]["lmbda_at_edge"] is False
    diff = summary["differences"]["B + MemDec − B"]
    assert diff["tasks"]["t1"]["lmbda_at_edge"] and not diff["tasks"]["t2"]["lmbda_at_edge"]
    assert diff["tasks"]["t1"]["outside"] and not diff["tasks"]["t2"]["outside"]
    assert diff["tasks"]["t2"]["ci95"] == [0.0, 0.0]
    # the mean over tasks: task i resampled with seed + i, the tasks' resampled differences averaged draw by draw
    draws = []
    for i, task in enumerate(("t1", "t2")):
        idx = np.random.default_rng(7 + i).integers(0, len(base[task]), size=(RESAMPLES, len(base[task])))
        draws.append(better[task][idx].mean(axis=1) - base[task][idx].mean(axis=1))
    assert diff["mean"]["ci95"] == pytest.approx(list(np.quantile(np.mean(draws, axis=0), [0.025, 0.975])))
    assert diff["mean"]["difference"] == pytest.approx(np.mean([better[t].mean() - base[t].mean() for t in base]))
    assert diff["tasks"]["t1"]["ci95"] == pytest.approx(direct_interval(better["t1"], base["t1"], seed=7))
    head = summary["headline"]
    assert "B + MemDec − B on t1 +" in head and "(λ at grid edge)" in head and "Losses: none" in head
    assert "on t2" not in head
    low, high = summary["mean_accuracy_ci95"]["B"]
    assert low <= summary["mean_accuracy"]["B"] <= high
    draws_t1 = task_draws([r for r in results if r["task"] == "t1"], RESAMPLES, 7)
    assert paired_differences({"t1": draws_t1}, results, [0.0, 1.0])["B + MemDec − B"]["mean"]["outside"]


def test_ce_only_without_memdec_is_refused_before_any_model_is_loaded(tmp_path, monkeypatch, tiny_gpt2):
    monkeypatch.setattr(ds, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    tasks = write_task_folder(tmp_path / "tasks")
    with pytest.raises(ValueError, match="--ce_only .* pass --memdec"):
        downstream(
            [str(tasks)], [str(tiny_gpt2)], tmp_path / "out", ce_only=str(tiny_gpt2), prompts=Prompts(device="cpu")
        )
    assert not (tmp_path / "out").exists()


def test_general_windows_fit_the_models_context_with_the_default_max_length(tmp_path, tiny_gpt2):
    """The default --max_length (1024) exceeds the tiny models' 512 positions: the general windows take the models'
    context (read from their configs before any model loads) instead of failing on the position embeddings."""
    tasks = write_task_folder(tmp_path / "tasks", dev=False)
    (tmp_path / "general.txt").write_text(GENERAL * 30)  # > 512 tokens
    report = downstream(
        [str(tasks)],
        [str(tiny_gpt2)],
        tmp_path / "out",
        memdec=str(tiny_gpt2),
        mix=DownstreamMixing(lmbda=0.3),
        general=GeneralSplit(text=str(tmp_path / "general.txt")),
        prompts=Prompts(device="cpu"),
        bootstrap=Bootstrap(resamples=20),
    )
    general = report["general"]
    assert general["tokens"] > 512 and general["window"] == 512 and general["stride"] == 256
    # the decoder is the base itself here, so every mixture of the two is the base, at any λ
    base = general["models"][str(tiny_gpt2)]["ppl"]
    assert general["models"]["MemDec"]["ppl"] == pytest.approx(base)
    assert general["mixtures"][f"{tiny_gpt2} + MemDec"]["0.3"]["ppl"] == pytest.approx(base)
