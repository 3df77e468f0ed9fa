"""The quickstart end to end at micro scale: its report is `memdec evaluate`'s schema (rows, intervals, overlap audit)
and equals a direct computation from the per-position arrays; reuse, --domain, --base, --pretrain_bases."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import save_tiny
from test_overlap import reference_inside

from lightning_memdec.apps.quickstart import Budget, quickstart
from lightning_memdec.apps.quickstart_report import goals
from lightning_memdec.evaluation.intervals import LEVEL, RESAMPLES, SEED
from lightning_memdec.io.artifact_dirs import ArtifactError
from lightning_memdec.io.embedded import load_tokenizer, resolve_text
from lightning_memdec.io.text_sources import read_documents
from lightning_memdec.io.token_corpus import Corpus
from lightning_memdec.kernels.scoring import DEFAULT_LAMBDA_GRID as LAMBDA_GRID

# the shipped bases at a few thousand tokens: mechanics only, the numbers mean nothing
MICRO = Budget(
    domain_tokens=3_000, valid_tokens=600, test_tokens=900, window=32, batch_size=4, teacher_steps=2, memdec_steps=4,
    k=8,
)  # fmt: skip
TINY = replace(MICRO, general_tokens=4_000, small_base_steps=2, large_base_steps=2)
ROW_KEYS = {
    "base",
    "role",
    "base_ppl",
    "knnlm_ppl",
    "knnlm_lambda",
    "knnlm_temperature",
    "memdec_ppl",
    "memdec_lambda",
    "ce_only_ppl",
    "ce_only_lambda",
    "memdec_alone_ppl",
    "ce_only_alone_ppl",
    "all_positions",
    "outside_overlap",
}
GOALS = {
    "base + MemDec <= 0.7 x base",
    "base + MemDec < MemDec alone",
    "base + MemDec < base + CE-only",
    "base + MemDec <= base + kNN-LM",
    "paired 95 % interval of MemDec − CE-only below zero",
    "MemDec λ strictly inside the grid",
}
MD_SECTIONS = ["## Goals", "## General text", "## Overlap audit", "## Intervals (95 % bootstrap", "## Run"]


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "run"
    return out, quickstart(out=out, budget=MICRO)


@pytest.mark.slow
def test_micro_quickstart_reports_every_row(micro_run):
    out, report = micro_run
    bases = [r for r in report["rows"] if r["role"] == "base"]
    assert [r["base"] for r in bases] == ["base-small", "base-large"]
    assert [r["base"] for r in report["rows"] if r["role"] == "teacher"] == ["teacher"]
    assert report["run"]["decoder_start"] == "embedded:base-small"
    assert report["run"]["teacher_start"] == "embedded:base-large"
    assert report["run"]["tokenizer"] == "gpt2"
    assert report["lambda_grid"][0] == 0.0 and report["lambda_grid"][-1] == 1.0 == LAMBDA_GRID[-1]
    assert report["positions"] == {"test": 899, "valid": 599}  # test and valid have their own token budgets
    for row in bases:
        assert ROW_KEYS <= set(row)
        assert row["memdec_lambda"] in LAMBDA_GRID and row["knnlm_lambda"] in LAMBDA_GRID
        assert set(report["goals"][row["base"]]) == GOALS
        assert all(isinstance(g["met"], bool) and g["figures"] for g in report["goals"][row["base"]].values())
        assert {"memdec_ppl - knnlm_ppl", "memdec_ppl - ce_only_ppl"} <= set(row["all_positions"]["differences"])
    assert [g["base"] for g in report["general"]["rows"]] == ["base-small", "base-large"]
    assert {"valid", "test"} <= set(report["overlap"]) and report["overlap"]["against"] == [
        str(out / "corpora" / "domain-train")
    ]
    assert {"teacher fine-tune", "targets", "train memdec", "train ce-only", "score models"} <= set(
        report["run"]["seconds"]
    )
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["rows"][0]["base_ppl"] == report["rows"][0]["base_ppl"]
    md = (out / "report.md").read_text()
    assert md.startswith("# Memory Decoder evaluation")  # evaluate's writer
    for name in ("base-small", "base-large", "teacher"):
        assert f"| {name} |" in md
    for section in MD_SECTIONS:
        assert md.count(section) == 1, section
    assert (out / "lambda_curve.png").stat().st_size > 1000
    assert list((out / "runs" / "memdec").rglob("events.out.tfevents*"))
    assert not list((out / "runs").glob("*/checkpoints"))  # removed once each model is exported
    assert not (out / "models" / "base-small").exists()  # the shipped bases are used, never retrained


@pytest.mark.slow
def test_rerun_reuses_finished_stages(micro_run):
    out, report = micro_run
    stamps = {
        p: p.stat().st_mtime_ns
        for p in [
            out / "models" / "memdec" / "model.safetensors",
            out / "models" / "teacher" / "model.safetensors",
            out / "targets" / "train" / "probs.npy",
            out / "stores" / "teacher-train" / "keys.npy",
            out / "scores" / "base-large-domain-test-keys.npy",
        ]
    }
    again = quickstart(out=out, budget=MICRO)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.dumps(again["rows"]) == json.dumps(report["rows"])  # NaN bounds (kNN alone: p = 0) compare equal
    with pytest.raises(ArtifactError, match="other settings .*memdec_steps"):
        quickstart(out=out, budget=replace(MICRO, memdec_steps=5))


def goal_report(**changes) -> dict:
    """A report in the shared schema whose base row meets every goal, with ``changes`` applied to that row."""
    diff = {"memdec_ppl - ce_only_ppl": {"difference": -10.0, "interval": changes.pop("interval", [-15.0, -0.5])}}
    row = {
        "base": "b", "role": "base", "base_ppl": 100.0, "memdec_ppl": 60.0, "memdec_alone_ppl": 80.0,
        "ce_only_ppl": 70.0, "knnlm_ppl": 60.0, "memdec_lambda": 0.4, "memdec_lambda_at_edge": False,
        "all_positions": {"differences": diff},
    }  # fmt: skip
    teacher = {"base": "teacher", "role": "teacher", "base_ppl": 50.0, "knnlm_ppl": 40.0, "memdec_ppl": None}
    return {"rows": [row | changes, teacher], "lambda_grid": [0.0, 0.5, 1.0]}


@pytest.mark.parametrize(
    "changes, missed",
    [
        ({}, None),
        ({"base_ppl": 85.0}, "base + MemDec <= 0.7 x base"),  # 60 > 0.7 × 85
        ({"memdec_alone_ppl": 60.0}, "base + MemDec < MemDec alone"),  # strictly below
        ({"ce_only_ppl": 60.0}, "base + MemDec < base + CE-only"),
        ({"knnlm_ppl": 59.9}, "base + MemDec <= base + kNN-LM"),
        ({"interval": [-15.0, 0.0]}, "paired 95 % interval of MemDec − CE-only below zero"),
        ({"interval": [float("nan"), float("nan")]}, "paired 95 % interval of MemDec − CE-only below zero"),
        ({"memdec_lambda": 1.0, "memdec_lambda_at_edge": True}, "MemDec λ strictly inside the grid"),
        ({"memdec_ppl": float("inf")}, None),  # checked below: an infinite figure meets nothing it enters
    ],
)
def test_goals_read_the_shared_schema_each_with_its_figures(changes, missed):
    checked = goals(goal_report(**changes))
    assert set(checked) == {"b"} and set(checked["b"]) == GOALS  # the teacher row has no goals
    if changes.get("memdec_ppl") == float("inf"):
        assert not any(g["met"] for name, g in checked["b"].items() if "memdec_ppl" in g["figures"])
        return
    assert {name for name, g in checked["b"].items() if not g["met"]} == ({missed} if missed else set())
    assert checked["b"]["base + MemDec <= base + kNN-LM"]["figures"] == {
        "memdec_ppl": 60.0,
        "knnlm_ppl": changes.get("knnlm_ppl", 60.0),
    }


def test_mismatched_base_tokenizers_are_refused_before_any_work(tmp_path):
    neox = save_tiny(tmp_path / "neox", arch="gpt_neox", vocab=50277, tokenizer="gpt-neox-20b")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="share one tokenizer"):
        quickstart(out=out, base=["embedded:base-small", str(neox)], budget=MICRO)
    with pytest.raises(ValueError, match="share one tokenizer"):
        quickstart(out=out, teacher=str(neox), budget=MICRO)
    with pytest.raises(ValueError, match="share one tokenizer"):
        quickstart(out=out, tokenizer="gpt-neox-20b", budget=MICRO)
    assert not out.exists()


def mixed(base: np.ndarray, other: np.ndarray, lam: float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.logaddexp(np.log(1 - lam) + base, np.log(lam) + other)


def ppl(log_probs: np.ndarray) -> float:
    return float(np.exp(-np.mean(log_probs)))


def bootstrap(arrays: list[np.ndarray], offsets: np.ndarray) -> np.ndarray:
    """[len(arrays), RESAMPLES] perplexities: documents drawn with replacement (the same draws for every array)."""
    doc = np.searchsorted(offsets, np.arange(1, len(arrays[0]) + 1), side="right") - 1  # position i → token i + 1
    docs = len(offsets) - 1
    draws = np.random.default_rng(SEED).integers(0, docs, size=(RESAMPLES, docs))
    out = np.zeros((len(arrays), RESAMPLES))
    for i, lp in enumerate(arrays):
        nll = np.array([-lp[doc == d].sum() for d in range(docs)])
        n = np.array([(doc == d).sum() for d in range(docs)])
        out[i] = [np.exp(nll[row].sum() / n[row].sum()) for row in draws]
    return out


def quantiles(values: np.ndarray) -> list[float]:
    return list(np.quantile(values, [(1 - LEVEL) / 2, (1 + LEVEL) / 2]))


@pytest.fixture(scope="module")
def planted_domain_run(tmp_path_factory):
    """Tiny given bases on a biomedical domain whose test split holds one train abstract verbatim (planted)."""
    tmp = tmp_path_factory.mktemp("planted")
    domain = tmp / "abstracts"
    domain.mkdir()
    docs = read_documents(resolve_text("embedded:biomed/valid"))
    for split, part in [("train", docs[:20]), ("valid", docs[20:24]), ("test", [docs[30], docs[1], docs[31]])]:
        (domain / f"{split}.txt").write_text("\n\n".join(part))
    small = save_tiny(tmp / "small", n_embd=32, seed=1)
    large = save_tiny(tmp / "large", n_embd=64, seed=2)
    # listed largest first: the decoder still starts from the smallest, the teacher from the largest
    report = quickstart(out=tmp / "run", domain=str(domain), base=[str(large), str(small)], budget=MICRO)
    return tmp, domain, report


@pytest.mark.slow
def test_custom_domain_with_given_bases(planted_domain_run):
    tmp, domain, report = planted_domain_run
    assert [r["base"] for r in report["rows"]] == ["large", "small", "teacher"]
    assert report["run"]["decoder_start"] == str(tmp / "small") and report["run"]["teacher_start"] == str(tmp / "large")
    assert report["run"]["domain"] == str(domain)
    assert (tmp / "run" / "corpora" / "domain-train").is_dir()
    with pytest.raises(FileNotFoundError, match="must hold train.txt"):
        quickstart(out=tmp / "bad", domain=str(tmp / "small"), base=[str(tmp / "small")], budget=MICRO)
    assert not (tmp / "bad").exists()


@pytest.mark.slow
def test_report_equals_a_direct_computation_from_the_arrays(planted_domain_run):
    """Rows, λ, overlap counts, perplexities outside repeated spans and bootstrap intervals (alone and paired),
    recomputed here from the cached per-position arrays and the tokens, without the package's evaluation code."""
    tmp, _, report = planted_domain_run
    run = tmp / "run"
    lp = {f"{name}-{s}": np.load(run / "scores" / f"{name}-domain-{s}.npy")
          for name in ("large", "small", "memdec", "ce-only") for s in ("valid", "test")}  # fmt: skip
    test, train = Corpus(run / "corpora" / "domain-test"), Corpus(run / "corpora" / "domain-train")
    tokens = np.asarray(test.tokens, dtype=np.int64)
    offsets = np.asarray(test.doc_offsets)  # [documents + 1], the last = len(tokens)
    inside = reference_inside(tokens, [np.asarray(train.tokens, dtype=np.int64)], 32)
    audit = report["overlap"]["test"]
    assert (audit["documents"], audit["documents_verbatim"]) == (3, 1)  # the planted abstract
    assert audit["positions_inside"] == inside.sum() > 0 and audit["warning"]
    for name in ("large", "small"):
        row = next(r for r in report["rows"] if r["base"] == name)
        figures = {"base_ppl": lp[f"{name}-test"]}
        for key, decoder in (("memdec", "memdec"), ("ce_only", "ce-only")):
            valid = [ppl(mixed(lp[f"{name}-valid"], lp[f"{decoder}-valid"], x)) for x in LAMBDA_GRID]
            lam = LAMBDA_GRID[int(np.argmin(valid))]
            assert row[f"{key}_lambda"] == lam
            figures[f"{key}_ppl"] = mixed(lp[f"{name}-test"], lp[f"{decoder}-test"], lam)
        for key, values in figures.items():
            assert row[key] == pytest.approx(ppl(values), rel=1e-9)
            assert row["outside_overlap"]["ppl"][key] == pytest.approx(ppl(values[~inside]), rel=1e-9)
        draws = bootstrap([figures["memdec_ppl"], figures["ce_only_ppl"], figures["base_ppl"]], offsets)
        intervals = row["all_positions"]["intervals"]
        assert intervals["memdec_ppl"] == pytest.approx(quantiles(draws[0]), rel=1e-9)
        assert intervals["base_ppl"] == pytest.approx(quantiles(draws[2]), rel=1e-9)
        paired = row["all_positions"]["differences"]["memdec_ppl - ce_only_ppl"]
        assert paired["interval"] == pytest.approx(quantiles(draws[0] - draws[1]), rel=1e-9)
        assert paired["difference"] == pytest.approx(ppl(figures["memdec_ppl"]) - ppl(figures["ce_only_ppl"]))
        goal = report["goals"][name]["paired 95 % interval of MemDec − CE-only below zero"]
        assert goal["met"] == (paired["interval"][1] < 0) and goal["figures"]["interval"] == paired["interval"]
    md = (run / "report.md").read_text()
    assert "⚠ more than 1 % of positions repeat training text" in md


@pytest.mark.slow
def test_pretrain_bases_flag_trains_tiny_bases_from_scratch(tmp_path):
    report = quickstart(out=tmp_path / "run", pretrain_bases=True, budget=TINY)
    assert [r["base"] for r in report["rows"]] == ["base-small", "base-large", "teacher"]
    assert (tmp_path / "run" / "models" / "base-small" / "model.safetensors").is_file()
    assert report["run"]["teacher_start"].endswith("base-large")
    with pytest.raises(ValueError, match="either --base or --pretrain_bases"):
        quickstart(out=tmp_path / "x", pretrain_bases=True, base=["embedded:base-small"], budget=TINY)


def test_domain_names_a_directory_or_a_shipped_corpus(tmp_path, monkeypatch):
    from lightning_memdec.apps.quickstart_stages import split_path

    monkeypatch.chdir(tmp_path)
    assert [split_path(d, "test") for d in (None, "general", "embedded:law")] == [
        "embedded:biomed/test", "embedded:general/test", "embedded:law/test",
    ]  # fmt: skip
    (tmp_path / "law").mkdir()  # a local directory of that name wins, and must hold the splits
    with pytest.raises(FileNotFoundError, match=r"--domain law must hold train.txt.*or name a shipped corpus"):
        split_path("law", "train")
    (tmp_path / "law" / "train.txt").write_text("a\n")
    assert split_path("law", "train") == "law/train.txt"
    with pytest.raises(FileNotFoundError, match="the shipped corpora are general, biomed, law"):
        split_path("embedded:finance", "train")


def test_a_training_stage_killed_before_its_export_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    from lightning_memdec.apps import quickstart_stages

    calls = []

    def recorded_fit(config, ckpt_path=None):
        calls.append(ckpt_path)
        Path(config["export"]["dirpath"]).mkdir(parents=True)

    monkeypatch.setattr(quickstart_stages, "fit", recorded_fit)
    checkpoints = tmp_path / "runs" / "memdec" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").write_bytes(b"a killed run's")
    stage = ("memdec", tmp_path, tmp_path / "train", tmp_path / "valid", MICRO, 4, "embedded:base-small", 0.5)
    assert quickstart_stages.train_model(*stage) == tmp_path / "models" / "memdec"
    assert calls == ["last"] and not checkpoints.exists()


class Started(Exception):
    """Raised where quickstart's first stage would start: its settings checks have all run."""


@pytest.fixture
def stop_at_the_first_stage(monkeypatch):
    import lightning_memdec.apps.quickstart as quickstart_module

    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr(quickstart_module, "tokenized_corpora", started)


def test_a_rerun_after_the_domain_text_changed_is_refused_before_any_work(tmp_path, stop_at_the_first_stage):
    """Every finished stage was reused and the report scored the old text, though --domain's files had changed."""
    domain = tmp_path / "domain"
    domain.mkdir()
    for split in ("train", "valid", "test"):
        (domain / f"{split}.txt").write_text(f"The {split} text.\n")
    with pytest.raises(Started):
        quickstart(out=tmp_path / "run", domain=str(domain), budget=MICRO)
    with pytest.raises(Started):  # the same text: the run goes on
        quickstart(out=tmp_path / "run", domain=str(domain), budget=MICRO)
    (domain / "test.txt").write_text("Other text.\n")
    with pytest.raises(ArtifactError, match=r"other settings \(the text of test.txt differ\)"):
        quickstart(out=tmp_path / "run", domain=str(domain), budget=MICRO)
    settings = json.loads((tmp_path / "run" / "quickstart_settings.json").read_text())
    del settings["texts"]  # a run of an earlier version: its text was not recorded, and is not compared
    (tmp_path / "run" / "quickstart_settings.json").write_text(json.dumps(settings))
    with pytest.raises(Started):
        quickstart(out=tmp_path / "run", domain=str(domain), budget=MICRO)


def test_a_shipped_corpus_is_the_same_domain_however_it_is_spelled(tmp_path, monkeypatch, stop_at_the_first_stage):
    """A run made with the default domain refused `--domain embedded:biomed` (the same corpus) as "domain differ"."""
    monkeypatch.chdir(tmp_path)  # no folder named biomed here: the name is the shipped corpus
    for domain in (None, "embedded:biomed", "biomed"):
        with pytest.raises(Started):
            quickstart(out=tmp_path / "run", domain=domain, budget=MICRO)
    with pytest.raises(ArtifactError, match=r"other settings \(domain differ\)"):
        quickstart(out=tmp_path / "run", domain="law", budget=MICRO)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_the_ends_of_beta_are_accepted_and_beyond_them_refused(tmp_path, beta):
    """β = 0 is the CE-only decoder (the paper's control), β = 1 KL only: both valid; outside [0, 1] refused."""
    from lightning_memdec.apps.quickstart_checks import check_quickstart_inputs

    check_quickstart_inputs(tmp_path / "out", beta, 32, [])
    with pytest.raises(ValueError, match=r"--beta .* must be in \[0, 1\]"):
        check_quickstart_inputs(tmp_path / "out", beta + (0.01 if beta else -0.01), 32, [])


def test_each_base_has_its_own_name_apart_from_the_quickstart_s_models():
    """Two exports in folders of one name were one base (the first dropped); a base in a folder named teacher was
    scored as the fine-tuned teacher (the caches go by name). Parent folders tell them apart, only where needed."""
    from lightning_memdec.apps.quickstart_stages import base_names

    assert base_names(["embedded:base-small", "embedded:base-large"]) == {
        "base-small": "embedded:base-small", "base-large": "embedded:base-large"
    }  # fmt: skip
    assert base_names(["/r/small/model", "/r/large/model", "/r/big"]) == {
        "small-model": "/r/small/model", "large-model": "/r/large/model", "big": "/r/big"
    }  # fmt: skip
    assert base_names(["/model", "/data/model"]) == {"model": "/model", "data-model": "/data/model"}  # no "/-model"
    assert base_names(["org1/model", "org2/model"]) == {"org1-model": "org1/model", "org2-model": "org2/model"}
    for reserved in ("teacher", "memdec", "ce-only"):
        assert base_names(["embedded:base-small", f"/x/{reserved}"]) == {
            "base-small": "embedded:base-small", f"x-{reserved}": f"/x/{reserved}"
        }  # fmt: skip
        with pytest.raises(ValueError, match="give each base once"):
            base_names([reserved])


def test_relative_folders_are_named_by_their_place(tmp_path, monkeypatch):
    """`--base a/hf_model b/hf_model` from the working directory, or `./base-small` beside the shipped base-small."""
    from lightning_memdec.apps.quickstart_stages import base_names

    monkeypatch.chdir(tmp_path)
    for folder in ("a/hf_model", "b/hf_model", "base-small"):
        (tmp_path / folder).mkdir(parents=True)
    assert base_names(["a/hf_model", "b/hf_model"]) == {"a-hf_model": "a/hf_model", "b-hf_model": "b/hf_model"}
    named = base_names(["embedded:base-small", "./base-small"])
    assert named["base-small"] == "embedded:base-small" and named[f"{tmp_path.name}-base-small"] == "./base-small"


def test_a_rerun_after_a_base_was_retrained_in_its_folder_is_refused(tmp_path, stop_at_the_first_stage):
    """Every stage was reused and the report scored the old weights under the retrained base's name."""
    small, large = save_tiny(tmp_path / "small", seed=0), save_tiny(tmp_path / "large", n_embd=64, seed=1)
    bases = [str(small), str(large)]
    for _ in range(2):  # the same bases: the run goes on
        with pytest.raises(Started):
            quickstart(out=tmp_path / "run", base=bases, budget=MICRO)
    with pytest.raises(ArtifactError, match=r"other settings \(beta differ\)"):  # the decoder's loss, too
        quickstart(out=tmp_path / "run", base=bases, budget=MICRO, beta=0.3)
    save_tiny(large, n_embd=64, seed=2)
    with pytest.raises(ArtifactError, match=rf"other settings \(the files of {large} differ\)"):
        quickstart(out=tmp_path / "run", base=bases, budget=MICRO)
    save_tiny(large, n_embd=64, seed=1)  # the base back as it was
    teacher = save_tiny(tmp_path / "teacher-model", n_embd=64, seed=5)
    with pytest.raises(Started):
        quickstart(out=tmp_path / "run3", base=bases, teacher=str(teacher), budget=MICRO)
    save_tiny(teacher, n_embd=64, seed=6)  # the teacher retrained in its folder
    with pytest.raises(ArtifactError, match=rf"other settings \(the files of {teacher} differ\)"):
        quickstart(out=tmp_path / "run3", base=bases, teacher=str(teacher), budget=MICRO)
    tokenizer = tmp_path / "tok"
    load_tokenizer("gpt2").save_pretrained(tokenizer)
    with pytest.raises(Started):  # bases pretrained with a tokenizer of one's choice: that tokenizer's corpora
        quickstart(out=tmp_path / "run2", pretrain_bases=True, tokenizer=str(tokenizer), budget=TINY)
    load_tokenizer("gpt-neox-20b").save_pretrained(tokenizer)  # another tokenizer saved at the path
    with pytest.raises(ArtifactError, match=rf"the files of tokenizer {tokenizer} differ"):
        quickstart(out=tmp_path / "run2", pretrain_bases=True, tokenizer=str(tokenizer), budget=TINY)
    settings = json.loads((tmp_path / "run" / "quickstart_settings.json").read_text())
    del settings["fingerprints"]  # a run of an earlier version: not recorded, not compared
    (tmp_path / "run" / "quickstart_settings.json").write_text(json.dumps(settings))
    with pytest.raises(Started):
        quickstart(out=tmp_path / "run", base=bases, budget=MICRO)


def test_the_given_teacher_is_the_one_fine_tuned(tmp_path, monkeypatch):
    import lightning_memdec.apps.quickstart as quickstart_module

    small, large = save_tiny(tmp_path / "small", seed=0), save_tiny(tmp_path / "large", n_embd=64, seed=1)
    teacher = save_tiny(tmp_path / "teacher-model", n_embd=16, seed=3)  # the smallest: not the default choice
    monkeypatch.setattr(quickstart_module, "tokenized_corpora", lambda *a: {"domain-train": "t", "domain-valid": "v"})
    started = []

    def first_training(name, out, train, valid, budget, steps, start, *args, **kwargs):
        started.append((name, start))
        raise Started

    monkeypatch.setattr(quickstart_module, "train_model", first_training)
    with pytest.raises(Started):
        quickstart(out=tmp_path / "run", base=[str(small), str(large)], teacher=str(teacher), budget=MICRO)
    assert started == [("teacher", str(teacher))]


def test_two_bases_in_folders_of_one_name_are_both_run(tmp_path, monkeypatch):
    """`memdec fit` exports into folders of one name (hf_model): two such bases were one, the first dropped."""
    import lightning_memdec.apps.quickstart as quickstart_module

    small, large = save_tiny(tmp_path / "a" / "hf_model", seed=0), save_tiny(tmp_path / "b" / "hf_model", seed=1)
    monkeypatch.setattr(quickstart_module, "tokenized_corpora", lambda *a: {"domain-train": "t", "domain-valid": "v"})
    sized = []
    monkeypatch.setattr(quickstart_module, "parameters", lambda ref: sized.append(ref) or len(sized))
    monkeypatch.setattr(quickstart_module, "train_model", lambda *a, **k: (_ for _ in ()).throw(Started))
    with pytest.raises(Started):
        quickstart(out=tmp_path / "run", base=[str(small), str(large)], budget=MICRO)
    assert sized == [str(small), str(large)]


def test_every_model_s_window_is_checked_before_any_work(tmp_path):
    from lightning_memdec.apps.quickstart_checks import check_quickstart_inputs

    fits = save_tiny(tmp_path / "fits")
    short = tmp_path / "short"
    save_tiny(short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps(config | {"n_positions": 16}))
    check_quickstart_inputs(tmp_path / "out", 0.5, 32, [str(fits)])
    with pytest.raises(ValueError, match="short"):
        check_quickstart_inputs(tmp_path / "out", 0.5, 32, [str(fits), str(short)])


def test_an_out_under_a_file_is_refused_before_any_work(tmp_path):
    from lightning_memdec.apps.quickstart_checks import check_quickstart_inputs

    (tmp_path / "afile").write_text("x")
    with pytest.raises(ArtifactError, match="--out .*afile/run cannot be written"):
        check_quickstart_inputs(tmp_path / "afile" / "run", 0.5, 32, [])


def test_a_stage_run_twice_is_timed_as_both(monkeypatch):
    """The scoring stage runs once per model: its time is the sum, not the last call's."""
    from types import SimpleNamespace

    import lightning_memdec.apps.quickstart_stages as stages

    ticks = iter([0.0, 1.5, 10.0, 12.0])  # start, end of the first; start, end of the second
    monkeypatch.setattr(stages, "time", SimpleNamespace(perf_counter=lambda: next(ticks), process_time=lambda: 0.0))
    clock = stages.StageClock()
    for _ in range(2):
        with clock("score models"):
            pass
    assert clock.seconds == {"score models": 3.5}


def test_a_budget_of_a_fraction_of_a_step_is_refused():
    with pytest.raises(ValueError, match="memdec_steps"):
        Budget(memdec_steps=2.5)


def test_each_neighbour_is_matched_against_its_query_s_next_token(biomed_corpus, biomed_datastore, biomed_index):
    """The store's own keys as queries: each position's nearest neighbour is itself, whose value is its next token."""
    from lightning_memdec.apps.quickstart_stages import knn_gold_probs
    from lightning_memdec.io.readers import Datastore

    keys = np.asarray(Datastore(biomed_datastore).keys, dtype=np.float32)
    dist, match = knn_gold_probs(biomed_datastore, biomed_index, keys, biomed_corpus, 8)
    assert match.shape == (len(keys), 8) and (dist[:, 0] == 0).all() and match[:, 0].all()


def test_an_ivf_index_of_the_quickstart_probes_its_lists(tmp_path, biomed_datastore):
    """Above the flat size the quickstart's IVF index records the nprobe it plans with (the library's default
    would be searched otherwise)."""
    from numpy.lib.format import open_memmap

    from lightning_memdec.apps.quickstart_stages import INDEX_NPROBE, INDEX_RULE, build_or_reuse_index
    from lightning_memdec.io.artifact_dirs import read_meta

    n, meta = INDEX_RULE.flat_below + 1000, read_meta(biomed_datastore)
    store = tmp_path / "store"
    store.mkdir()
    (store / "meta.json").write_text(json.dumps(meta | {"num_entries": n}))
    rng = np.random.default_rng(0)
    open_memmap(store / "keys.npy", "w+", np.float16, (n, meta["dim"]))[:] = rng.standard_normal((n, meta["dim"]))
    open_memmap(store / "values.npy", "w+", np.int32, (n,))[:] = rng.integers(0, 50257, n)
    index = read_meta(build_or_reuse_index(store, tmp_path / "index"))
    assert index["factory"].startswith("IVF") and index["nprobe"] == INDEX_NPROBE
