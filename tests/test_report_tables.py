"""`memdec evaluate`'s report on small synthetic log p(gold) arrays: each row's figures (λ chosen on valid, every
perplexity on test, intervals outside repeated spans) against a direct numpy computation, and the tables that
report.md prints from them; the settings' checks of `memdec evaluate` and `memdec downstream`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lightning_memdec.evaluation.intervals import RESAMPLES, SEED
from lightning_memdec.evaluation.report import (
    finite_or_none,
    general_lines,
    goal_lines,
    interval_table,
    perplexity_table,
    write_report,
)
from lightning_memdec.evaluation.report_rows import lambda_curve, report_row
from lightning_memdec.evaluation.row_figures import general_figures, row_figures
from lightning_memdec.evaluation.settings import Bootstrap, DownstreamMixing, KNNLMRows

GRID = [0.0, 0.25, 0.5, 0.75, 1.0]
OFFSETS = np.array([0, 9, 20, 27, 38, 50, 61])  # 6 documents, 60 positions
N = 60


def mix(base, other, lmbda):
    """log((1 − λ)·p_base + λ·p_other), by hand."""
    with np.errstate(divide="ignore"):
        return np.log((1 - lmbda) * np.exp(base) + lmbda * np.exp(other))


def ppl(log_probs) -> float:
    return float(np.exp(-np.mean(log_probs)))


def chosen_lambda(base, other) -> float:
    """The grid's λ of the lowest mixed perplexity (first on ties)."""
    return GRID[int(np.argmin([ppl(mix(base, other, x)) for x in GRID]))]


def direct_interval(log_probs, keep=None) -> list[float]:
    """95 % bootstrap interval over documents, by hand: per resample, the drawn documents' kept positions pooled
    (position i predicts token i + 1 and belongs to its document), the draws of the package's seed."""
    keep = np.ones(len(log_probs), bool) if keep is None else keep
    doc = np.searchsorted(OFFSETS, np.arange(1, len(log_probs) + 1), side="right") - 1
    docs = len(OFFSETS) - 1
    nll = np.array([-log_probs[(doc == d) & keep].sum() for d in range(docs)])
    count = np.array([((doc == d) & keep).sum() for d in range(docs)])
    rng = np.random.default_rng(SEED)
    blocks = [rng.integers(0, docs, size=(min(100, RESAMPLES - s), docs)) for s in range(0, RESAMPLES, 100)]
    draws = np.concatenate(blocks)  # [resamples, docs]: the documents each resample draws
    values = np.exp(nll[draws].sum(axis=1) / count[draws].sum(axis=1))
    return list(np.quantile(values, [0.025, 0.975]))


@pytest.fixture(scope="module")
def lp():
    """Valid and test splits that differ, so a figure taken from the wrong split shows."""
    rng = np.random.default_rng(0)
    out = {}
    for split in ("valid", "test"):
        base = -rng.gamma(2.0, 1.5, N)
        out[split] = {
            "base": base,
            "memdec": base + rng.normal(0.6, 0.5, N),
            "ce_only": base + rng.normal(0.1, 0.5, N),
            "knn": np.log(rng.uniform(0.01, 1, N)),
        }
    return out


class Audit:
    """An overlap audit: which test positions lie inside repeated spans."""

    def __init__(self, inside):
        self.inside = inside


INSIDE = np.zeros(N, bool)
INSIDE[12:30] = True


def test_a_row_chooses_lambda_on_valid_and_reports_valid_and_alone_perplexities_from_their_splits(lp):
    """*_valid_ppl is the valid split mixed at the chosen λ; *_alone_ppl and *_ppl are the test split."""
    row = report_row("b", "ref", "base", lp, None, None, GRID)
    valid, test = lp["valid"], lp["test"]
    for key, other in (("memdec", "memdec"), ("ce_only", "ce_only"), ("knnlm", "knn")):
        lmbda = chosen_lambda(valid["base"], valid[other])
        assert row[f"{key}_lambda"] == lmbda and row[f"{key}_lambda_from"] == "valid"
        assert row[f"{key}_valid_ppl"] == pytest.approx(ppl(mix(valid["base"], valid[other], lmbda)), rel=1e-9)
        assert row[f"{key}_ppl"] == pytest.approx(ppl(mix(test["base"], test[other], lmbda)), rel=1e-9)
    for key, other in (("memdec", "memdec"), ("ce_only", "ce_only"), ("knn", "knn")):
        assert row[f"{key}_alone_ppl"] == pytest.approx(ppl(test[other]), rel=1e-9)
    assert row["base_ppl"] == pytest.approx(ppl(test["base"]), rel=1e-9)


def test_figures_outside_repeated_spans_keep_only_those_positions(lp):
    """The intervals and the paired differences outside repeated spans were computed on every position."""
    row = report_row("b", "ref", "base", lp, None, None, GRID)
    figures = row_figures(row, lp["test"], {"test": (OFFSETS, Audit(INSIDE))})
    test, keep = lp["test"], ~INSIDE
    memdec = mix(test["base"], test["memdec"], row["memdec_lambda"])
    outside = figures["outside_overlap"]
    assert outside["ppl"]["memdec_ppl"] == pytest.approx(ppl(memdec[keep]), rel=1e-9)
    assert outside["intervals"]["base_ppl"] == pytest.approx(direct_interval(test["base"], keep), rel=1e-9)
    assert outside["intervals"]["memdec_ppl"] == pytest.approx(direct_interval(memdec, keep), rel=1e-9)
    assert figures["all_positions"]["intervals"]["base_ppl"] == pytest.approx(direct_interval(test["base"]), rel=1e-9)
    diff = outside["differences"]["memdec_ppl - base_ppl"]
    assert diff["difference"] == pytest.approx(ppl(memdec[keep]) - ppl(test["base"][keep]), rel=1e-9)
    every = figures["all_positions"]["differences"]["memdec_ppl - base_ppl"]
    assert every["difference"] == pytest.approx(ppl(memdec) - ppl(test["base"]), rel=1e-9)


def test_general_figures_mix_memdec_at_the_rows_memdec_lambda(lp):
    """The general split's + MemDec was mixed at the CE-only decoder's λ."""
    test = lp["test"]
    row = {"base": "b", "memdec_lambda": 0.25, "ce_only_lambda": 0.75}
    g = general_figures(row, {"base": test["base"], "memdec": test["memdec"]}, OFFSETS)
    assert g["memdec_ppl"] == pytest.approx(ppl(mix(test["base"], test["memdec"], 0.25)), rel=1e-9)
    assert g["memdec_alone_ppl"] == pytest.approx(ppl(test["memdec"]), rel=1e-9)
    assert g["base_ppl"] == pytest.approx(ppl(test["base"]), rel=1e-9)


def test_general_lines_put_the_mixture_under_memdec_and_the_decoder_under_memdec_alone(lp):
    """At λ ≠ 1 the two columns differ: swapped, the table credited the mixture to the decoder alone."""
    test = lp["test"]
    g = general_figures({"base": "b", "memdec_lambda": 0.25}, {"base": test["base"], "memdec": test["memdec"]}, OFFSETS)
    lines = general_lines({"general": {"test": "g", "positions": N, "rows": [g]}})
    assert lines[2] == "| model | alone | + MemDec | MemDec alone |"
    cells = [c.strip() for c in lines[4].strip("|").split("|")]
    expected = [ppl(test["base"]), ppl(mix(test["base"], test["memdec"], 0.25)), ppl(test["memdec"])]
    assert cells[0] == "b"
    assert [c.split(" [")[0] for c in cells[1:]] == [f"{x:.2f}" for x in expected]


def two_rows(lp):
    """A base row with every mixture (λ of kNN-LM given) and a teacher row with no CE-only decoder."""
    base = report_row("b", "ref", "base", lp, None, 0.25, GRID)
    teacher_lp = {s: {"base": lp[s]["base"] - 0.1, "knn": lp[s]["knn"]} for s in lp}
    return base, teacher_lp


def test_the_table_keeps_the_ce_only_columns_when_the_teacher_row_has_none(lp):
    """With a teacher (no CE-only figure) the quickstart's table lost its + CE-only and λ CE-only columns."""
    base, teacher_lp = two_rows(lp)
    teacher = report_row("big", "t", "teacher", teacher_lp, None, None, GRID)
    lines = perplexity_table({"rows": [base, teacher]})
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == ["model", "alone", "+ kNN-LM", "+ MemDec", "+ CE-only", "λ MemDec", "λ CE-only", "λ kNN-LM"]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:4]}
    lmbda = chosen_lambda(lp["valid"]["base"], lp["valid"]["ce_only"])
    ce_ppl = ppl(mix(lp["test"]["base"], lp["test"]["ce_only"], lmbda))
    assert cells["b"][head.index("+ CE-only")] == f"{ce_ppl:.2f}"
    assert cells["big (teacher)"][head.index("+ CE-only")] == "—"
    assert cells["big (teacher)"][head.index("λ CE-only")] == "—"


def test_a_teacher_named_teacher_is_not_labelled_twice(lp):
    """The quickstart's teacher is called "teacher": its row read "teacher (teacher)"."""
    _, teacher_lp = two_rows(lp)
    teacher = report_row("teacher", "t", "teacher", teacher_lp, None, None, GRID)
    other = report_row("gpt2-large", "t", "teacher", teacher_lp, None, None, GRID)
    names = [line.split("|")[1].strip() for line in perplexity_table({"rows": [teacher, other]})[2:4]]
    assert names == ["teacher", "gpt2-large (teacher)"]


def test_a_lambda_chosen_at_the_grid_edge_is_flagged_and_a_given_one_is_not(lp):
    """λ = 1 chosen on valid is an end of the grid: its cell says so; a given λ has no edge to be at."""
    strong = {s: dict(lp[s], memdec=lp[s]["base"] + 3.0) for s in lp}  # the decoder alone is best on valid
    assert chosen_lambda(strong["valid"]["base"], strong["valid"]["memdec"]) == 1.0
    row = report_row("b", "ref", "base", strong, None, 0.25, GRID)
    lines = perplexity_table({"rows": [row]})
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[head.index("λ MemDec")] == "1 (valid) ⚠ edge"
    assert cells[head.index("λ kNN-LM")] == "0.25 (given)"
    assert lines[-1].startswith("⚠ edge: the λ chosen on valid is an end of the grid")


def test_the_outside_column_shows_the_interval_outside_repeated_spans():
    """The outside-spans column printed the all-positions interval beside the outside perplexity."""
    row = {
        "base": "b",
        "base_ppl": 10.0,
        "all_positions": {"intervals": {"base_ppl": [9.0, 11.0]}, "differences": {}},
        "outside_overlap": {"ppl": {"base_ppl": 12.0}, "intervals": {"base_ppl": [10.5, 13.5]}, "differences": {}},
    }
    lines = interval_table({"rows": [row]})
    assert "| b | alone | 10.00 [9.00, 11.00] | 12.00 [10.50, 13.50] |" in lines


def test_a_row_with_one_key_difference_gets_a_differences_table():
    """A table of exactly one difference (a base, MemDec, nothing else) was dropped."""
    row = {
        "base": "b",
        "base_ppl": 10.0,
        "memdec_ppl": 8.0,
        "all_positions": {
            "intervals": {"base_ppl": [9.0, 11.0], "memdec_ppl": [7.0, 9.0]},
            "differences": {"memdec_ppl - base_ppl": {"difference": -2.0, "interval": [-3.0, -1.0]}},
        },
    }
    lines = interval_table({"rows": [row]})
    assert "| model | difference | all positions | outside repeated spans |" in lines
    assert "| b | memdec_ppl - base_ppl | -2.00 [-3.00, -1.00] | — |" in lines
    assert not any("difference" in line for line in interval_table({"rows": [dict(row, all_positions={
        "intervals": row["all_positions"]["intervals"], "differences": {}})]}))  # fmt: skip


def test_a_failed_goal_reads_not_met():
    """A goal whose figures miss it printed "✓ met" (its figures are never empty)."""
    figures = {"memdec_ppl": 9.5, "knnlm_ppl": 9.0}
    met = figures["memdec_ppl"] < figures["knnlm_ppl"]
    lines = goal_lines({"goals": {"b": {"MemDec beats kNN-LM": {"met": met, "figures": figures}}}})
    assert lines[2] == "- b: ✗ not met: MemDec beats kNN-LM (memdec_ppl 9.50, knnlm_ppl 9.00)"
    lines = goal_lines({"goals": {"b": {"MemDec beats kNN-LM": {"met": not met, "figures": figures}}}})
    assert lines[2].startswith("- b: ✓ met:")


def test_infinite_values_inside_lists_are_written_as_null():
    """An interval [x, ∞] is a list: json wrote it as Infinity, which strict JSON readers refuse."""
    assert finite_or_none({"a": [math.inf, 1.0], "b": {"c": [[-math.inf]]}, "d": math.nan}) == {
        "a": [None, 1.0], "b": {"c": [[None]]}, "d": None}  # fmt: skip


def strict(text: str):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_write_report_names_the_test_positions_and_writes_strict_json(lp, tmp_path):
    """The header showed valid's position count for the test split; an infinite interval bound broke report.json."""
    zero = {s: dict(lp[s], knn=np.where(np.arange(N) == 3, -np.inf, lp[s]["knn"])) for s in lp}  # p_kNN(gold) = 0
    row = report_row("b", "ref", "base", zero, None, None, GRID)
    row |= row_figures(row, zero["test"], {"test": (OFFSETS, None)})
    assert math.isinf(row["all_positions"]["intervals"]["knn_alone_ppl"][1])
    report = {
        "test": "t.txt", "valid": "v.txt", "positions": {"test": N, "valid": N - 17}, "memdec": "mem", "k": 8,
        "temperature": 1.0, "window": 32, "stride": 16, "rows": [row], "curves": {"b": lambda_curve(zero, GRID)},
    }  # fmt: skip
    write_report(report, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert f"- test: `t.txt` ({N} positions), valid: `v.txt`" in markdown
    saved = strict((tmp_path / "report.json").read_text())
    assert saved["rows"][0]["all_positions"]["intervals"]["knn_alone_ppl"][1] is None
    assert saved["positions"] == {"test": N, "valid": N - 17}


def test_knn_rows_need_one_index_per_datastore():
    """Two datastores and one index were accepted; the second datastore then had no index."""
    with pytest.raises(ValueError, match="one --knn.index per --knn.datastore"):
        KNNLMRows(datastore=["a", "b"], index=["i"])
    with pytest.raises(ValueError, match="one --knn.index per --knn.datastore"):
        KNNLMRows(datastore=["a"])
    assert KNNLMRows(datastore=["a", "b"], index=["i", "j"]).index == ["i", "j"]


def test_zero_resamples_is_allowed_and_negative_is_refused():
    """--bootstrap.resamples 0 (no intervals) is documented as valid."""
    assert Bootstrap(resamples=0).resamples == 0
    with pytest.raises(ValueError, match="0 or more"):
        Bootstrap(resamples=-1)


def test_downstream_fallback_lambda_is_knn_prompts():
    """A task without a dev split is mixed at kNN-Prompt's fixed λ = 0.3."""
    assert DownstreamMixing().fallback_lmbda == 0.3
