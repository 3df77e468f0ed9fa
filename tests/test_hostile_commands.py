"""The second hostile audit (docs/results/hostile-audit-2.md): downstream, serve, transfer-vocab, quickstart,
fit-router, import-official and build-index-sharded as a user mistypes them. Each test failed on the code before
its fix: the user gets a clear error naming the file or setting and the fix, before any work, and nothing already
written is lost."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
from conftest import save_tiny

from lightning_memdec.cli import main
from lightning_memdec.io.artifact_dirs import ArtifactError
from lightning_memdec.io.output_lock import OutputLock

pytestmark = pytest.mark.filterwarnings("ignore:task .* multi-token verbalizers dropped")
TASK = {
    "template": "{text} It was",
    "domain_premise": " It was",
    "labels": ["negative", "positive"],
    "primary_verbalizers": [" terrible", " great"],
    "verbalizers": [[" terrible", " bad"], [" great", " good"]],
}


def task_folder(root: Path) -> Path:
    (root / "toy").mkdir(parents=True)
    (root / "tasks.json").write_text(json.dumps({"toy": TASK}))
    records = [{"id": i, "input": {"text": t}, "label": i % 2} for i, t in enumerate(["Dull.", "Warm and funny"])]
    (root / "toy" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def refused(args: list[str], capsys) -> str:
    """The CLI's one-line error for ``args`` (exit 1, no traceback)."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 1
    return capsys.readouterr().err


def no_model_loaded(monkeypatch, *modules) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was refused")

    for module in modules:
        monkeypatch.setattr(module, "load_causal_lm", no_model)


# -- every stage with an output lock: an --out that is one of its inputs ----------------------------------------------


def test_an_output_that_is_an_input_is_refused_and_the_input_kept(tmp_path, biomed_datastore, capsys):
    """`build-index --datastore ds --out ds --overwrite true` replaced the datastore by its index (keys lost);
    the same for build-index-sharded and build-targets. Refused now, whatever --overwrite says."""
    store = tmp_path / "ds"
    shutil.copytree(biomed_datastore, store)
    before = sorted(p.name for p in store.iterdir())
    for args in (
        [
            "build-index",
            "--datastore",
            str(store),
            "--out",
            str(store),
            "--plan.factory",
            "Flat",
            "--overwrite",
            "true",
        ],  # noqa: E501
        ["build-index-sharded", "--datastore", str(store), "--out", str(store), "--plan.factory", "Flat"],
        ["build-index", "--datastore", str(store / "."), "--out", str(tmp_path), "--overwrite", "true"],  # holds it
    ):
        err = refused(args, capsys)
        assert "is (or holds) the --datastore input" in err and "choose another --out" in err
    assert sorted(p.name for p in store.iterdir()) == before
    assert json.loads((store / "meta.json").read_text())["kind"] == "datastore"


# -- tokenizers: a directory without tokenizer files is no tokenizer --------------------------------------------------


def test_a_directory_named_like_a_shipped_tokenizer_does_not_give_an_empty_one(tmp_path, monkeypatch, capsys):
    """A model folder named gpt2 (no tokenizer files) in the working directory shadowed the shipped gpt2: `memdec
    tokenize --tokenizer gpt2` wrote a corpus of end-of-text tokens only (transformers' 1-token tokenizer)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text("{}")
    args = ["tokenize", "--text", "embedded:biomed/valid", "--out", "c", "--tokenizer", "gpt2", "--max_tokens", "50"]
    err = refused(args, capsys)
    assert "'gpt2' is a directory without tokenizer files" in err and "shadows the shipped tokenizer" in err
    assert not (tmp_path / "c").exists()


def test_a_directory_with_only_a_tokenizer_config_is_no_tokenizer(tmp_path, monkeypatch, capsys):
    """tokenizer_config.json alone passed the file check: transformers built its 1-token tokenizer (every text
    encodes to nothing), and `memdec tokenize` wrote a corpus of end-of-text tokens only (hostile audit 16 C)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"tokenizer_class": "GPT2Tokenizer"}')
    args = ["tokenize", "--text", "embedded:biomed/valid", "--out", "c", "--tokenizer", "tok", "--max_tokens", "50"]
    err = refused(args, capsys)
    assert "'tok' has 1 token: its directory (tokenizer_config.json) holds no vocabulary" in err
    assert not (tmp_path / "c").exists()


# -- downstream -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def neox_base(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("neox") / "neox", arch="gpt_neox", vocab=50304, tokenizer="gpt-neox-20b")


def test_downstream_refuses_mistakes_before_loading_a_model(
    tmp_path, monkeypatch, capsys, tiny_gpt2, neox_base, biomed_datastore, biomed_index
):
    """Each used to fail after the models were loaded and every prompt scored (--out a file: a FileExistsError
    traceback at the very end), or to run silently with another setting (--max_length 0: the model's context)."""
    import lightning_memdec.evaluation.downstream as ds

    no_model_loaded(monkeypatch, ds)
    tasks, afile = task_folder(tmp_path / "tasks"), tmp_path / "afile"
    afile.write_text("mine")
    run = ["downstream", "--tasks", str(tasks), "--prompts.device", "cpu"]
    gpt2 = ["--bases", str(tiny_gpt2)]
    knn = ["--knn.datastore", str(biomed_datastore), "--knn.index", str(biomed_index)]
    for args, message in (
        (gpt2 + ["--out", str(afile)], f"--out {afile} is a file, but a directory is needed"),
        (gpt2 + ["--out", str(tmp_path / "o"), "--prompts.max_length", "0"], "--prompts.max_length must be positive"),
        (gpt2 + ["--out", str(tmp_path / "o"), "--prompts.batch_size", "-1"], "--prompts.batch_size must be positive"),
        (gpt2 + knn + ["--out", str(tmp_path / "o"), "--knn.k", "0"], "--knn.k must be positive"),
        (["--bases", str(tmp_path / "gpt2-typo"), "--out", str(tmp_path / "o")], "gpt2-typo"),
        (gpt2 + ["--memdec", str(tmp_path / "memdec-typo"), "--out", str(tmp_path / "o")], "--memdec"),
        (["--bases", str(neox_base)] + knn + ["--out", str(tmp_path / "o")], "give the datastore built with this"),
    ):
        err = refused(run + args, capsys)
        assert message in err, (args, err)
    assert afile.read_text() == "mine" and not (tmp_path / "o").exists()


@pytest.mark.parametrize("form", ["json", "yaml", "list"])
def test_downstream_names_a_task_file_that_does_not_parse(tmp_path, monkeypatch, capsys, tiny_gpt2, form):
    """A malformed tasks.json (or YAML task file) gave the parser's traceback, naming neither file nor fix."""
    import lightning_memdec.evaluation.downstream as ds

    no_model_loaded(monkeypatch, ds)
    spec = task_folder(tmp_path / "tasks")
    broken = spec / "tasks.json"
    if form == "yaml":
        spec = broken = tmp_path / "tasks.yaml"
    broken.write_text({"json": '{"toy": {"template": 3}', "yaml": "toy: [a\n  b: c", "list": "[1, 2]"}[form])
    err = refused(["downstream", "--tasks", str(spec), "--bases", str(tiny_gpt2), "--out", str(tmp_path / "o")], capsys)
    assert str(broken) in err
    assert ("expected a mapping" if form == "list" else f"is not valid {form.upper()}") in err


def test_two_downstream_runs_into_one_output_are_refused(tmp_path, monkeypatch, tiny_gpt2):
    """downstream took no output lock: two runs into one --out wrote the same predictions.jsonl.tmp at once."""
    import lightning_memdec.evaluation.downstream as ds

    no_model_loaded(monkeypatch, ds)
    out = tmp_path / "out"
    with OutputLock(out):
        with pytest.raises(ArtifactError, match="is being written by another process"):
            ds.downstream(
                [str(task_folder(tmp_path / "tasks"))], [str(tiny_gpt2)], out, prompts=ds.Prompts(device="cpu")
            )


def test_a_second_report_into_one_output_keeps_the_first(tmp_path, tiny_gpt2):
    """downstream and evaluate wrote their report into an --out holding an earlier run's report, replacing its
    figures without a word (hostile audit 2, "Remaining"). A rerun stays allowed (evaluate reuses the datastores
    it built there), but the earlier files move to out/earlier/<time>/ byte for byte before the new ones land."""
    import lightning_memdec.evaluation.downstream as ds
    from lightning_memdec.evaluation.evaluate import evaluate
    from lightning_memdec.evaluation.settings import EvaluateMixing, Scoring

    tasks = str(task_folder(tmp_path / "tasks"))
    runs = {
        "downstream": lambda out: ds.downstream([tasks], [str(tiny_gpt2)], out, prompts=ds.Prompts(device="cpu")),
        "evaluate": lambda out: evaluate([str(tiny_gpt2)], "embedded:biomed/test", out, mix=EvaluateMixing(lmbda=0.3),
                                         scoring=Scoring(batch_size=4, window=32, stride=16, max_tokens=100)),
    }  # fmt: skip
    for name, run in runs.items():
        out = tmp_path / name
        run(out)
        first = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        assert "report.json" in first
        with pytest.warns(UserWarning, match="held an earlier report: kept in"):
            run(out)
        (kept,) = (out / "earlier").iterdir()
        assert {p.name: p.read_bytes() for p in kept.iterdir()} == first, name
        assert (out / "report.json").is_file() and (out / "report.md").is_file()


# -- serve ------------------------------------------------------------------------------------------------------------


def test_serve_refuses_a_bad_port_a_busy_port_and_a_decoder_of_another_tokenizer(
    monkeypatch, capsys, tiny_gpt2, neox_base
):
    """--port 70000 gave LitServe's traceback; a busy port stopped the server only after the models were loaded;
    a decoder of another tokenizer stopped it with "One or more workers failed to start", naming nothing."""
    pytest.importorskip("litserve")
    import lightning_memdec.apps.serve_worker as worker

    def no_server(*args, **kwargs):
        raise AssertionError("the server was started before the mistake was refused")

    monkeypatch.setattr(worker, "MixtureAPI", no_server)
    base = ["serve", "--base", str(tiny_gpt2), "--device", "cpu"]
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        for args, message in (
            (["--port", "70000"], "--port must be an integer from 1024 to 65535"),
            (["--port", str(busy)], f"cannot listen on --host 127.0.0.1 --port {busy}"),
            (["--memdec", str(neox_base), "--port", "0"], "--port must be"),
        ):
            assert message in refused(base + args, capsys)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    err = refused(base + ["--memdec", str(neox_base), "--port", str(port)], capsys)
    assert f"--memdec {neox_base} uses" in err and "trained with the base's tokenizer" in err


# -- quickstart -------------------------------------------------------------------------------------------------------


def no_quickstart_work(monkeypatch) -> None:
    import lightning_memdec.apps.quickstart as qs

    def no_work(*args, **kwargs):
        raise AssertionError("quickstart started tokenizing before the mistake was refused")

    monkeypatch.setattr(qs, "tokenized_corpora", no_work)


def test_quickstart_refuses_bad_settings_before_any_work(tmp_path, monkeypatch, capsys, tiny_gpt2):
    """--out a file gave a FileExistsError traceback; --k 0 an AssertionError after the teacher was trained;
    --batch_size 0 a DataLoader traceback; --window past the base's context a corpus-size error mid-run."""
    no_quickstart_work(monkeypatch)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    run = ["quickstart", "--base", str(tiny_gpt2), "--budget.window", "32"]
    for args, message in (
        (["--out", str(afile)], f"--out {afile} is a file"),
        (["--out", str(tmp_path / "q"), "--budget.k", "0"], "--budget.k must be positive"),
        (["--out", str(tmp_path / "q"), "--budget.batch_size", "0"], "--budget.batch_size must be positive"),
        (["--out", str(tmp_path / "q"), "--budget.decoder_lr", "-1"], "--budget.decoder_lr must be positive"),
        (["--out", str(tmp_path / "q"), "--budget.window", "100000"], "exceeds the context of"),
    ):
        assert message in refused(run + args, capsys)
    assert afile.read_text() == "mine" and not (tmp_path / "q").exists()


def test_two_quickstarts_into_one_run_directory_are_refused(tmp_path, monkeypatch, tiny_gpt2):
    """quickstart took no lock: a second run into the same --out (or the default runs/quickstart) rebuilt the
    stages the first was writing, both with overwrite."""
    from lightning_memdec.apps.quickstart import quickstart
    from lightning_memdec.apps.quickstart_stages import Budget

    no_quickstart_work(monkeypatch)
    monkeypatch.chdir(tmp_path)
    for given in ({"out": tmp_path / "q"}, {}):
        with OutputLock(given.get("out", Path("runs/quickstart"))):
            with pytest.raises(ArtifactError, match="is being written by another process"):
                quickstart(base=[str(tiny_gpt2)], budget=Budget(window=32), **given)
    assert not (tmp_path / "q").exists() and not (tmp_path / "runs" / "quickstart").exists()


# -- build-index-sharded (and build-index) ----------------------------------------------------------------------------


def test_index_settings_that_cannot_work_are_refused_before_the_build(tmp_path, capsys, biomed_datastore):
    """--train_size under the IVF's list count failed inside FAISS's clustering (a C++ traceback), and
    --recall_k 0 with an AssertionError once the whole index was built; both left a .partial behind."""
    for command in ("build-index", "build-index-sharded"):
        run = [command, "--datastore", str(biomed_datastore), "--out", str(tmp_path / command)]
        err = refused(run + ["--plan.factory", "IVF4,Flat", "--plan.train_size", "1"], capsys)
        assert "--plan.train_size gives 1 training keys, fewer than the 4 lists" in err
        assert "--recall_k must be 1 or more" in refused(run + ["--plan.factory", "Flat", "--recall_k", "0"], capsys)
    assert sorted(tmp_path.iterdir()) == []


# -- fit-router -------------------------------------------------------------------------------------------------------


def test_fit_router_refuses_a_window_under_two_before_loading_a_model(tmp_path, monkeypatch, capsys, tiny_gpt2):
    """--window 0 was refused only after both models were loaded and the texts tokenized; --window 1 published a
    router fitted on one-token windows."""
    import lightning_memdec.apps.fit_router as fr

    no_model_loaded(monkeypatch, fr)
    for window in ("0", "1"):
        args = ["fit-router", "--base", str(tiny_gpt2), "--memdec", str(tiny_gpt2), "--domain", "embedded:biomed/valid",
                "--general", "embedded:general/valid", "--out", str(tmp_path / "r"), "--window", window]  # fmt: skip
        assert f"--window must be 2 or more tokens, got {window}" in refused(args, capsys)
    assert not (tmp_path / "r").exists()


def test_fit_router_names_the_threshold_it_refuses(tmp_path, monkeypatch, capsys, tiny_gpt2):
    """--routing.threshold 1.5 was refused as "lmbda must be in [0, 1]", a setting fit-router does not have."""
    import lightning_memdec.apps.fit_router as fr

    no_model_loaded(monkeypatch, fr)
    args = ["fit-router", "--base", str(tiny_gpt2), "--memdec", str(tiny_gpt2), "--domain", "embedded:biomed/valid",
            "--general", "embedded:general/valid", "--out", str(tmp_path / "r")]  # fmt: skip
    for threshold in ("1.5", "1"):  # 1: a router that skips the decoder at every token (audit 3), no warning
        message = refused([*args, "--routing.threshold", threshold], capsys)
        assert "threshold" in message and "lmbda" not in message and f"got {float(threshold)}" in message
    assert not (tmp_path / "r").exists()
