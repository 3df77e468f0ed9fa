"""The quickstart end to end at micro scale: the direction of the result, the report, reuse, --domain."""

import json

import pytest
from conftest import save_tiny

from lightning_memdec.artifacts import ArtifactError
from lightning_memdec.assets import read_documents, resolve_text
from lightning_memdec.quickstart import quickstart

MICRO = dict(
    general_tokens=20_000,
    domain_tokens=12_000,
    eval_tokens=2_000,
    window=64,
    small_base_steps=20,
    large_base_steps=20,
    teacher_steps=10,
    memdec_steps=20,
    k=16,
)
KEYS = {
    "base",
    "base_ppl",
    "knnlm_ppl",
    "memdec_ppl",
    "ce_only_ppl",
    "lambda",
    "general_base_ppl",
    "general_memdec_ppl",
}


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "run"
    return out, quickstart(out=out, **MICRO)


def test_micro_quickstart_lowers_domain_perplexity(micro_run):
    out, report = micro_run
    assert [r["base"] for r in report["results"]] == ["base-small", "base-large"]
    for row in report["results"]:
        assert KEYS <= set(row)
        assert row["memdec_ppl"] < row["base_ppl"], row
        assert 0 < row["lambda"] < 1
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(report["results"]))
    assert (out / "report.md").read_text().count("| base-") == 2
    assert (out / "report.png").stat().st_size > 1000
    assert list((out / "runs" / "memdec").rglob("events.out.tfevents*"))


def test_rerun_reuses_finished_stages(micro_run):
    out, report = micro_run
    stamps = {
        p: p.stat().st_mtime_ns
        for p in [
            out / "models" / "memdec" / "model.safetensors",
            out / "targets" / "train" / "probs.npy",
            out / "stores" / "teacher-train" / "keys.npy",
        ]
    }
    again = quickstart(out=out, **MICRO)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["results"] == report["results"]
    with pytest.raises(ArtifactError, match="other settings .*memdec_steps"):
        quickstart(out=out, **{**MICRO, "memdec_steps": 21})


def test_custom_domain_with_given_bases(tmp_path):
    domain = tmp_path / "contracts"
    domain.mkdir()
    docs = read_documents(resolve_text("embedded:law/valid"))
    for split, part in [("train", docs[:8]), ("valid", docs[8:11]), ("test", docs[11:14])]:
        (domain / f"{split}.txt").write_text("\n\n".join(part))
    small = save_tiny(tmp_path / "small", n_embd=32, seed=1)
    large = save_tiny(tmp_path / "large", n_embd=64, seed=2)
    settings = {**MICRO, "memdec_steps": 10}
    report = quickstart(out=tmp_path / "run", domain=str(domain), base=[str(small), str(large)], **settings)
    assert [r["base"] for r in report["results"]] == ["small", "large"]
    assert report["domain"] == str(domain)
    assert not (tmp_path / "run" / "models" / "base-small").exists()
    with pytest.raises(FileNotFoundError, match="must hold train.txt"):
        quickstart(out=tmp_path / "bad", domain=str(tmp_path / "small"), base=[str(small)], **settings)
