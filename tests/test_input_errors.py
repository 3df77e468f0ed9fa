"""Bad inputs a user types: each refused with an error naming the file or setting, before any output is written."""

import contextlib

import numpy as np
import pytest

from lightning_memdec.io.artifact_dirs import ArtifactError, partial_dir, read_meta
from lightning_memdec.io.token_corpus import tokenize
from lightning_memdec.stages.settings import KNNTargets, TargetSearch


@pytest.mark.parametrize(
    "content,match",
    [
        (b"{not json", "is not valid UTF-8 JSON"),
        (b'{"kind": "\xff"}', "is not valid UTF-8 JSON"),
        (b"[1]", "a JSON list"),
    ],
)
def test_a_corrupt_meta_json_is_named(tmp_path, content, match):
    (tmp_path / "meta.json").write_bytes(content)
    with pytest.raises(ArtifactError, match=rf"{tmp_path / 'meta.json'} (is|holds) .*{match[-10:]}"):
        read_meta(tmp_path)


def test_a_file_given_for_a_directory_and_a_directory_for_a_file_say_so(tmp_path):
    (tmp_path / "keys.npy").write_bytes(b"x")
    with pytest.raises(ArtifactError, match=rf"{tmp_path / 'keys.npy'} is a file, but a directory is needed"):
        read_meta(tmp_path / "keys.npy")
    with pytest.raises(ArtifactError, match=rf"{tmp_path / 'absent'} does not exist"):
        read_meta(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=rf"text file {tmp_path} is a directory, but a file is needed"):
        tokenize([str(tmp_path)], tmp_path / "corpus", "gpt2")
    assert not (tmp_path / "corpus").exists() and not partial_dir(tmp_path / "corpus").exists()


def test_non_utf8_text_is_named_with_the_fix(tmp_path):
    text = tmp_path / "latin1.txt"
    text.write_bytes("café au lait\n\nsecond document\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{text} is not UTF-8 text: byte 3 \(0-based\) is 0xe9 .*iconv"):
        tokenize([str(text)], tmp_path / "corpus", "gpt2")
    assert not (tmp_path / "corpus").exists()


@pytest.mark.parametrize("form", ["txt", "xz", "dataset file"])
def test_a_bad_byte_late_in_a_file_is_refused_before_any_work_naming_its_offset(tmp_path, form):
    """It was met only after everything before it was tokenized (a .partial left, refusing the corrected rerun as
    "different settings"), its position an offset into a read buffer; through --dataset.files, a datasets traceback."""
    import lzma

    from lightning_memdec.io.settings import DatasetRows

    good = "".join(f"Document {i} has a few words in it.\n\n" for i in range(5000)).encode()
    data = good + "café".encode("latin-1") + b"\n"
    path = tmp_path / ("text.txt.xz" if form == "xz" else "text.txt")
    path.write_bytes(lzma.compress(data) if form == "xz" else data)
    where = "of its decompressed text" if form == "xz" else r"\(0-based\)"
    with pytest.raises(ValueError, match=rf"{path} is not UTF-8 text: byte {len(good) + 3:,} {where} is 0xe9"):
        if form == "dataset file":
            tokenize(None, tmp_path / "corpus", "gpt2", dataset=DatasetRows(files=[str(path)]))
        else:
            tokenize([str(path)], tmp_path / "corpus", "gpt2")
    assert not (tmp_path / "corpus").exists() and not partial_dir(tmp_path / "corpus").exists()


def test_a_byte_order_mark_is_not_text(tmp_path):
    from lightning_memdec.io.embedded import load_tokenizer
    from lightning_memdec.io.token_corpus import Corpus

    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfHello world.\n\nSecond.\n")
    corpus = Corpus(tokenize([str(tmp_path / "bom.txt")], tmp_path / "corpus", "gpt2"))
    tok = load_tokenizer("gpt2")
    want = tok("Hello world.")["input_ids"] + [tok.eos_token_id] + tok("Second.")["input_ids"] + [tok.eos_token_id]
    assert list(corpus.tokens) == want


def test_chunk_size_zero_is_refused_before_any_work(tmp_path, biomed_datastore, biomed_index):
    from lightning_memdec.stages.targets import build_targets

    with pytest.raises(ValueError, match="--search.chunk_size must be positive .* got 0"):
        build_targets(
            biomed_datastore, biomed_index, tmp_path / "t", knn=KNNTargets(k=8), search=TargetSearch(chunk_size=0)
        )
    assert not partial_dir(tmp_path / "t").exists()


def test_out_naming_an_existing_file_is_refused_even_with_overwrite(tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("my notes")
    with pytest.raises(ArtifactError, match=rf"output {out} is a file, but a directory is needed"):
        tokenize(["embedded:biomed/valid"], out, "gpt2", max_tokens=100, overwrite=True)
    assert out.read_text() == "my notes" and not partial_dir(out).exists()


@pytest.mark.parametrize("path", [("num_entries",), ("kind",), ("tokenizer", "fingerprint")])
def test_a_meta_json_missing_a_key_names_the_file_the_key_and_the_fix(tmp_path, biomed_datastore, path):
    import json
    import shutil

    from lightning_memdec.stages.targets import build_targets

    store = shutil.copytree(biomed_datastore, tmp_path / "ds")
    meta = json.loads((store / "meta.json").read_text())
    *parents, key = path
    fields = meta
    for parent in parents:
        fields = fields[parent]
    del fields[key]
    (store / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=rf"{store / 'meta.json'} has no '{key}' entry: .*rebuild it"):
        build_targets(store, None, tmp_path / "t", knn=KNNTargets(k=8), search=TargetSearch(backend="exact"))
    assert not partial_dir(tmp_path / "t").exists() and not (tmp_path / "t").exists()


def test_the_cli_prints_a_users_mistake_without_a_traceback_and_a_bug_with_one(tmp_path, capsys, monkeypatch):
    import lightning_memdec.cli as cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["build-index", "--datastore", str(tmp_path / "absent"), "--out", str(tmp_path / "i")])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert f"memdec build-index: error: artefact directory {tmp_path / 'absent'} does not exist" in err
    assert "Traceback" not in err and not (tmp_path / "i").exists()

    def buggy(out: str = "x"):
        """A stage with a bug."""
        return {}["missing"] if out else int("not a number")

    monkeypatch.setattr(cli, "stage_functions", lambda *commands: {"buggy": buggy})
    with pytest.raises(KeyError):
        cli.main(["buggy"])
    with pytest.raises(ValueError, match="invalid literal"):  # a ValueError from outside the package's checks
        cli.main(["buggy", "--out", ""])


def test_a_full_disk_is_said_in_one_line_with_what_to_do(capsys, monkeypatch):
    """A disk that fills mid-stage (a chunk's write, on the writer thread or not) ended in Python's traceback."""
    import errno

    import lightning_memdec.cli as cli

    def full(out: str = "x"):
        """A stage whose disk fills."""
        raise OSError(errno.ENOSPC, "No space left on device", f"{out}.partial/chunk_00003/keys.npy")

    monkeypatch.setattr(cli, "stage_functions", lambda *commands: {"full": full})
    with pytest.raises(SystemExit) as exit_:
        cli.main(["full", "--out", "store"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err
    assert (
        "memdec full: error: no space left on the device writing store.partial/chunk_00003/keys.npy. Free space" in err
    )

    def too_large(out: str = "x"):
        """A stage under `ulimit -f`: numpy's write raised EFBIG, a raw traceback naming no file and no fix."""
        raise OSError(errno.EFBIG, "File too large", f"{out}.partial/keys.npy")

    monkeypatch.setattr(cli, "stage_functions", lambda *commands: {"big": too_large})
    with pytest.raises(SystemExit):
        cli.main(["big", "--out", "store"])
    err = capsys.readouterr().err
    assert "memdec big: error: a file would exceed the largest file size allowed (`ulimit -f`" in err
    assert "writing store.partial/keys.npy" in err and "Traceback" not in err

    def other(out: str = "x"):
        """A stage with another OS error."""
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(cli, "stage_functions", lambda *commands: {"other": other})
    with pytest.raises(OSError, match="Input/output error"):  # not a user's mistake: the whole traceback
        cli.main(["other"])


def test_check_positive_is_the_one_rule_for_counts_and_sizes():
    import numpy as np

    from lightning_memdec.io.settings import check_positive

    for value in (1, np.int64(3), 2**40):
        check_positive("--x", value, whole=True)
    for value in (0.5, 7, np.float32(1e-3)):
        check_positive("--x", value)
    check_positive("--x", None, whole=True, omitted="the default")
    refused = [(0, True), (-1, True), (True, True), (2.0, True), (None, True), (0.0, False), (float("nan"), False),
               (float("inf"), False), (True, False), ("3", False), (None, False)]  # fmt: skip
    for value, whole in refused:
        with pytest.raises(ValueError, match=r"^--x must be positive \(a (whole|finite) number\), got"):
            check_positive("--x", value, whole=whole)
    with pytest.raises(ValueError, match=r"or omitted for the default\), got -2"):
        check_positive("--x", -2, whole=True, omitted="the default")


@pytest.mark.parametrize("compressed", [False, True])
def test_a_corpus_records_its_text_files_hashes_from_the_utf8_check(tmp_path, compressed):
    """The UTF-8 check hashes a plain file in the same pass (it was read twice before tokenizing): the recorded
    sha256 is still that of the file's bytes as stored."""
    import hashlib
    import lzma

    data = "".join(f"Document {i}, café.\n\n" for i in range(30_000)).encode()  # > 1 MiB: several reads
    path = tmp_path / ("text.txt.xz" if compressed else "text.txt")
    path.write_bytes(lzma.compress(data) if compressed else data)
    meta = read_meta(tokenize([str(path)], tmp_path / "corpus", "gpt2"))
    assert meta["sources"] == [{"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]


def test_the_disk_checks_ask_for_what_the_stages_write(tmp_path, biomed_datastore, monkeypatch):
    """build-datastore's check asks for its keys and values files' bytes; build-targets' for twice the CSR it
    publishes (the chunk files are all still on disk when the merge writes them again), measured on real outputs."""
    from types import SimpleNamespace

    from lightning_memdec.io.capacity import ResourceError
    from lightning_memdec.io.readers import Datastore, Targets
    from lightning_memdec.stages import datastore as datastore_stage
    from lightning_memdec.stages import targets as targets_stage
    from lightning_memdec.stages.settings import KNNTargets
    from lightning_memdec.stages.targets_disk import targets_disk_bytes

    def data_bytes(path) -> int:  # a .npy file without its header
        return np.load(path, mmap_mode="r").nbytes

    store = Datastore(biomed_datastore)
    written = sum(data_bytes(biomed_datastore / name) for name in ("keys.npy", "values.npy"))
    config = SimpleNamespace(hidden_size=store.dim)
    for free, fits in ((written, True), (written - 1, False)):
        monkeypatch.setattr(datastore_stage, "free_disk", lambda out, free=free: free)
        with contextlib.nullcontext() if fits else pytest.raises(ResourceError, match="keys fp16 \\+ values int32"):
            datastore_stage.check_disk(tmp_path / "ds", len(store), config)
    support = 4  # every position has at least 4 neighbour tokens among its 16: each row holds exactly 4
    out = targets_stage.build_targets(biomed_datastore, out=tmp_path / "t", knn=KNNTargets(k=16, max_support=support))
    assert (np.diff(Targets(out).offsets) == support).all()
    published = sum(data_bytes(out / name) for name in ("ids.npy", "probs.npy", "offsets.npy"))
    assert targets_disk_bytes(len(store), support) == 2 * published


def test_a_bad_byte_after_a_character_split_across_reads_is_named_at_its_offset(tmp_path):
    """The check reads 1 MiB at a time; a character whose bytes straddle two reads must not shift the offset named."""
    from lightning_memdec.io.text_sources import check_utf8

    head = b"a" * ((1 << 20) - 1) + "é".encode()  # é's two bytes: the last of the first read, the first of the next
    data = head + b" ok " + b"\xe9" + b"\n"
    path = tmp_path / "split.txt"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=rf"byte {len(head) + 4:,} \(0-based\) is 0xe9"):
        check_utf8(path)
