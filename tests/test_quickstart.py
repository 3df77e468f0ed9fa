"""The quickstart end to end at micro scale: the report's rows, reuse, --domain, --base, --pretrain_bases."""

import json

import pytest
from conftest import save_tiny

from lightning_memdec.apps.quickstart import quickstart
from lightning_memdec.io.artifact_dirs import ArtifactError
from lightning_memdec.io.embedded import resolve_text
from lightning_memdec.io.text_sources import read_documents
from lightning_memdec.kernels.scoring import DEFAULT_LAMBDA_GRID as LAMBDA_GRID

# the shipped bases at a few thousand tokens: mechanics only, the numbers mean nothing
MICRO = dict(domain_tokens=3_000, eval_tokens=600, window=32, batch_size=4, teacher_steps=2, memdec_steps=4, k=8)
TINY = dict(general_tokens=4_000, small_base_steps=2, large_base_steps=2, **MICRO)
BASE_KEYS = {
    "base",
    "base_ppl",
    "knnlm_ppl",
    "knnlm_lambda",
    "knnlm_temperature",
    "memdec_ppl",
    "lambda",
    "ce_only_ppl",
    "ce_only_lambda",
    "general_base_ppl",
    "general_memdec_ppl",
}
MD_ROWS = [
    "+ kNN-LM (own datastore) |",
    "+ MemDec |",
    "+ CE-only decoder |",
]
MD_ONCE = ["| teacher (", "| teacher + kNN-LM (teacher datastore", "| MemDec alone |", "| CE-only decoder alone |"]


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "run"
    return out, quickstart(out=out, **MICRO)


@pytest.mark.slow
def test_micro_quickstart_reports_every_row(micro_run):
    out, report = micro_run
    assert [r["base"] for r in report["results"]] == ["base-small", "base-large"]
    assert report["decoder_start"] == "embedded:base-small"
    assert report["teacher"]["start"] == "embedded:base-large"
    assert report["tokenizer"] == "gpt2"
    assert report["lambda_grid"][0] == 0.0 and report["lambda_grid"][-1] == 1.0 == LAMBDA_GRID[-1]
    for row in report["results"]:
        assert BASE_KEYS <= set(row)
        assert row["lambda"] in LAMBDA_GRID and row["knnlm_lambda"] in LAMBDA_GRID
        assert set(report["goals"][row["base"]]) and all(
            isinstance(v, bool) for v in report["goals"][row["base"]].values()
        )
    assert {"ppl", "knnlm_ppl", "knnlm_lambda", "knnlm_temperature"} <= set(report["teacher"])
    assert report["memdec_alone_ppl"] > 0 and report["ce_only_alone_ppl"] > 0
    assert {"teacher fine-tune", "targets", "train memdec", "train ce-only", "score models"} <= set(report["seconds"])
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(report["results"]))
    md = (out / "report.md").read_text()
    for name in ("base-small", "base-large"):
        assert f"| {name} |" in md
        for row in MD_ROWS:
            assert f"| {name} {row}" in md, row
    for row in MD_ONCE:
        assert md.count(row) == 1, row
    assert "Seconds per stage" in md and "goals for base-small" in md
    assert (out / "report.png").stat().st_size > 1000
    assert list((out / "runs" / "memdec").rglob("events.out.tfevents*"))
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
            out / "stores" / "base-large-test" / "keys.npy",
        ]
    }
    again = quickstart(out=out, **MICRO)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["results"] == report["results"]
    with pytest.raises(ArtifactError, match="other settings .*memdec_steps"):
        quickstart(out=out, **{**MICRO, "memdec_steps": 5})


def test_mismatched_base_tokenizers_are_refused_before_any_work(tmp_path):
    neox = save_tiny(tmp_path / "neox", arch="gpt_neox", vocab=50277, tokenizer="gpt-neox-20b")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="share one tokenizer"):
        quickstart(out=out, base=["embedded:base-small", str(neox)], **MICRO)
    with pytest.raises(ValueError, match="share one tokenizer"):
        quickstart(out=out, teacher=str(neox), **MICRO)
    with pytest.raises(ValueError, match="share one tokenizer"):
        quickstart(out=out, tokenizer="gpt-neox-20b", **MICRO)
    assert not out.exists()


@pytest.mark.slow
def test_custom_domain_with_given_bases(tmp_path):
    domain = tmp_path / "contracts"
    domain.mkdir()
    docs = read_documents(resolve_text("embedded:law/valid"))
    for split, part in [("train", docs[:8]), ("valid", docs[8:11]), ("test", docs[11:14])]:
        (domain / f"{split}.txt").write_text("\n\n".join(part))
    small = save_tiny(tmp_path / "small", n_embd=32, seed=1)
    large = save_tiny(tmp_path / "large", n_embd=64, seed=2)
    # listed largest first: the decoder still starts from the smallest, the teacher from the largest
    report = quickstart(out=tmp_path / "run", domain=str(domain), base=[str(large), str(small)], **MICRO)
    assert [r["base"] for r in report["results"]] == ["large", "small"]
    assert report["decoder_start"] == str(small) and report["teacher"]["start"] == str(large)
    assert report["domain"] == str(domain)
    assert (tmp_path / "run" / "corpora" / "domain-train").is_dir()
    with pytest.raises(FileNotFoundError, match="must hold train.txt"):
        quickstart(out=tmp_path / "bad", domain=str(tmp_path / "small"), base=[str(small)], **MICRO)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_pretrain_bases_flag_trains_tiny_bases_from_scratch(tmp_path):
    report = quickstart(out=tmp_path / "run", pretrain_bases=True, **TINY)
    assert [r["base"] for r in report["results"]] == ["base-small", "base-large"]
    assert (tmp_path / "run" / "models" / "base-small" / "model.safetensors").is_file()
    assert report["teacher"]["start"].endswith("base-large")
    with pytest.raises(ValueError, match="either --base or --pretrain_bases"):
        quickstart(out=tmp_path / "x", pretrain_bases=True, base=["embedded:base-small"], **TINY)
