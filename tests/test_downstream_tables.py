"""`memdec downstream`'s paired differences (which pairs, each example's credit, edge-λ flags, gains and losses) and
its general-text perplexities, on small synthetic scores against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import save_tiny

from lightning_memdec.evaluation.downstream_differences import (
    MEMDEC_VS_OTHER,
    MIXTURE_VS_BASE,
    comparisons,
    credit,
    headline,
    paired_differences,
    task_draws,
)
from lightning_memdec.evaluation.downstream_general import GeneralText, knn_model_name, mixture_label
from lightning_memdec.hf.loading import load_causal_lm
from lightning_memdec.io.embedded import load_tokenizer

GRID = [0.0, 0.25, 0.5, 0.75, 1.0]
SYSTEMS = (("B", "base"), ("B + MemDec", "memdec"), ("B + CE", "ce_only"), ("B + kNN", "knnlm"))
GENERAL = (
    "The cat sat on the mat and looked out of the window at the rain.\n\n"
    "A second document, a little longer than the first one, about a walk along the river in the morning.\n\n"
    "Third and last: the train left the station late, and nobody on it minded very much at all.\n"
)


def result(task, system, kind, correct, lmbda):
    """One system's scores on a task: two classes, the label (1) on top where ``correct``, else the other."""
    correct = np.asarray(correct, bool)
    scores = np.stack([~correct, correct], axis=1).astype(float)
    return {"task": task, "system": system, "base": "B", "kind": kind, "lmbda": lmbda, "scores": scores,
            "labels": np.ones(len(correct), int)}  # fmt: skip


def test_memdec_is_compared_with_every_other_mixture_and_the_controls_only_with_the_base():
    """Every mixture was also compared with every other one (CE-only − kNN-LM, …): differences nobody asked for."""
    results = [result("t", s, kind, [True, False], None) for s, kind in SYSTEMS]
    expected = {
        ("B + MemDec", "B", MIXTURE_VS_BASE), ("B + CE", "B", MIXTURE_VS_BASE), ("B + kNN", "B", MIXTURE_VS_BASE),
        ("B + MemDec", "B + CE", MEMDEC_VS_OTHER), ("B + MemDec", "B + kNN", MEMDEC_VS_OTHER),
    }  # fmt: skip
    pairs = comparisons(results)
    assert set(pairs) == expected and len(pairs) == len(expected)


def direct_credit(scores, labels) -> list[float]:
    """1 / m when the label is one of the m classes at the top score, else 0, example by example."""
    out = []
    for row, label in zip(scores.tolist(), labels.tolist()):
        top = [c for c, s in enumerate(row) if s == max(row)]
        out.append(1 / len(top) if label in top else 0.0)
    return out


def test_credit_splits_a_tie_at_the_top_among_the_tied_classes():
    """p_kNN alone gives most verbalizers no mass: without the split, every tie at 0 counted as correct."""
    scores = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.2, 0.5, 0.1], [0.3, 0.3, 0.9], [0.7, 0.7, 0.1]])
    labels = np.array([0, 1, 2, 0, 2])
    np.testing.assert_allclose(credit(scores, labels), direct_credit(scores, labels), rtol=1e-12)


@pytest.fixture(scope="module")
def two_tasks():
    """t1: MemDec λ 0.5 (inside the grid), kNN-LM λ 1 (its end); t2: MemDec λ 1, kNN-LM λ 0.25."""
    rng = np.random.default_rng(1)
    results = []
    for task, n, lm, lk in (("t1", 50, 0.5, 1.0), ("t2", 40, 1.0, 0.25)):
        right = rng.random(n) < 0.7
        results += [
            result(task, "B", "base", right, None),
            result(task, "B + MemDec", "memdec", right & (rng.random(n) < 0.6), lm),
            result(task, "B + CE", "ce_only", right | (rng.random(n) < 0.3), 0.5),
            result(task, "B + kNN", "knnlm", rng.random(n) < 0.5, lk),
        ]
    draws = {t: task_draws([r for r in results if r["task"] == t], 200, 3) for t in ("t1", "t2")}
    return results, paired_differences(draws, results, GRID)


def test_a_pair_is_at_the_edge_when_either_systems_lambda_is(two_tasks):
    """Only the first system's λ was checked: MemDec − kNN-LM with kNN-LM's λ at 1 was not flagged."""
    results, diffs = two_tasks
    at_edge = {(r["task"], r["system"]) for r in results if r["lmbda"] is not None and r["lmbda"] in (0.0, 1.0)}
    accuracy = {(r["task"], r["system"]): np.mean(direct_credit(r["scores"], r["labels"])) for r in results}
    for name, entry in diffs.items():
        first, second = name.split(" − ")
        for task, cell in entry["tasks"].items():
            assert cell["lmbda_at_edge"] == ((task, first) in at_edge or (task, second) in at_edge), (name, task)
            assert cell["difference"] == pytest.approx(accuracy[(task, first)] - accuracy[(task, second)], abs=1e-12)
    assert diffs["B + MemDec − B + kNN"]["tasks"]["t1"]["lmbda_at_edge"]  # MemDec 0.5, kNN-LM 1


def test_the_mean_is_at_the_edge_when_any_task_is(two_tasks):
    """The mean over tasks was flagged only when every task's λ sat at an edge."""
    results, diffs = two_tasks
    mean = diffs["B + MemDec − B"]["mean"]
    per_task = diffs["B + MemDec − B"]["tasks"]
    assert [per_task[t]["lmbda_at_edge"] for t in ("t1", "t2")] == [False, True]
    assert mean["lmbda_at_edge"] is True
    assert mean["difference"] == pytest.approx(np.mean([per_task[t]["difference"] for t in ("t1", "t2")]))


def test_a_clear_loss_is_listed_under_losses():
    """A difference whose interval lies below zero was not "outside" it: the headline hid every loss."""
    n = 30
    results = [result("t", "B", "base", np.ones(n, bool), None),
               result("t", "B + MemDec", "memdec", np.arange(n) < 3, 0.5)]  # fmt: skip
    diffs = paired_differences({"t": task_draws(results, 200, 0)}, results, GRID)
    cell = diffs["B + MemDec − B"]["tasks"]["t"]
    assert cell["difference"] == pytest.approx(3 / n - 1)
    assert cell["ci95"][1] < 0 and cell["outside"] is True
    text = headline(diffs)
    losses = text.split("Losses: ")[1]
    assert f"B + MemDec − B on t {100 * (3 / n - 1):+.1f}" in losses
    assert "gains: none." in text


@pytest.fixture(scope="module")
def general(tmp_path_factory):
    root = tmp_path_factory.mktemp("general")
    (root / "general.txt").write_text(GENERAL)
    model = load_causal_lm(save_tiny(root / "m", seed=1)).eval()
    return GeneralText(str(root / "general.txt"), load_tokenizer("gpt2"), None, 16, 4), model


def direct_windows(tokens, model, window: int, stride: int) -> np.ndarray:
    """log p(gold) per position over windows of ``window`` tokens every ``stride`` (the last one ending at the end),
    each position scored by the first window that covers it, by hand."""
    n = len(tokens) - 1
    starts = list(range(0, n - window + 1, stride))
    starts += [n - window] if starts[-1] + window < n else []
    out = np.full(n, np.nan)
    with torch.no_grad():
        for start in starts:
            ids = torch.as_tensor(tokens[start : start + window + 1], dtype=torch.long)
            lp = torch.log_softmax(model(input_ids=ids[None, :-1]).logits[0].double(), dim=-1)
            gold = lp[torch.arange(window), ids[1:]].numpy()
            fresh = np.isnan(out[start : start + window])
            out[start : start + window][fresh] = gold[fresh]
    return out


def test_general_text_is_scored_over_windows_every_half_window(general):
    """The general split was scored with stride = window: a position just after a window's end had no context."""
    g, model = general
    assert len(g.tokens) > 3 * g.window  # several windows
    g.score("a", model, 50257)
    expected = direct_windows(np.asarray(g.tokens), model, g.window, g.window // 2)
    np.testing.assert_allclose(g.log_probs["a"], expected, rtol=0, atol=2e-5)
    assert g.stride == g.window // 2


def test_two_knn_mixtures_at_one_lambda_and_two_temperatures_are_two_entries(general):
    """Labelled by λ alone, the T = 8 mixture overwrote the T = 1 one."""
    g, _ = general
    n = len(g.tokens) - 1
    rng = np.random.default_rng(0)
    g.log_probs["base"] = np.log(rng.uniform(0.01, 1, n))
    for t in (1.0, 8.0):
        g.log_probs[knn_model_name("base", t)] = np.log(rng.uniform(0.01, 1, n))
    mixtures = [("B + kNN-LM", "base", knn_model_name("base", t), 0.3, t) for t in (1.0, 8.0)]
    summary = g.summary(["base"], mixtures, 100, 0)
    got = summary["mixtures"]["B + kNN-LM"]
    assert set(got) == {mixture_label(0.3, 1.0), mixture_label(0.3, 8.0)}
    for t in (1.0, 8.0):
        direct = np.log(0.7 * np.exp(g.log_probs["base"]) + 0.3 * np.exp(g.log_probs[knn_model_name("base", t)]))
        assert got[mixture_label(0.3, t)]["ppl"] == pytest.approx(np.exp(-direct.mean()), rel=1e-9)
    assert summary["models"]["base"]["ppl"] == pytest.approx(np.exp(-g.log_probs["base"].mean()), rel=1e-12)
