"""A stage stopped inside its last step, the rename that publishes its output: the same command finishes the job,
and an old output set aside for an --overwrite is never lost (audit 8 killed builds at each rename)."""

from __future__ import annotations

import os

import pytest

from lightning_memdec.io.artifact_dirs import ArtifactError, partial_dir
from lightning_memdec.io.readers import INDEX
from lightning_memdec.retrieval.faiss_index import build_index
from lightning_memdec.retrieval.settings import IndexSettings

FLAT = IndexSettings(factory="Flat")


KILLED_AT = """
import os, signal, sys
import lightning_memdec.io.artifact_dirs as artifact_dirs
from lightning_memdec.retrieval.faiss_index import build_index
from lightning_memdec.retrieval.settings import IndexSettings

real = os.replace

def replace(src, dst):  # SIGKILL at the rename named by argv[3]: the work dir into place, or the old output aside
    if str(src).endswith(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)

artifact_dirs.os.replace = replace
build_index(sys.argv[1], sys.argv[2], plan=IndexSettings(factory="Flat"), recall_queries=0, overwrite=True)
"""


def killed_at_rename(datastore, out, source_suffix: str) -> None:
    """Run build_index in a process killed (SIGKILL) at the rename of the path ending in ``source_suffix``."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", KILLED_AT, str(datastore), str(out), source_suffix])
    assert done.returncode == -9


def test_a_build_stopped_at_its_rename_is_published_by_the_same_command(tmp_path, biomed_datastore):
    out = tmp_path / "index"
    killed_at_rename(biomed_datastore, out, ".partial")
    assert not out.exists() and (partial_dir(out) / "meta.json").is_file()
    assert build_index(biomed_datastore, out, plan=FLAT, recall_queries=0) == out  # was: "different settings"
    assert (out / INDEX).is_file() and not partial_dir(out).exists()


def test_an_overwrite_stopped_between_its_renames_loses_nothing(tmp_path, biomed_datastore):
    out = tmp_path / "index"
    build_index(biomed_datastore, out, plan=FLAT, recall_queries=0)
    old = (out / INDEX).read_bytes()
    killed_at_rename(biomed_datastore, out, ".partial")  # the old output moved aside, the new one not in place
    assert not out.exists() and out.with_name("index.old").is_dir()
    assert build_index(biomed_datastore, out, plan=FLAT, recall_queries=0) == out
    assert (out / INDEX).read_bytes() == old and not out.with_name("index.old").exists()


def test_an_old_output_set_aside_comes_back_when_nothing_replaces_it(tmp_path, biomed_datastore):
    out = tmp_path / "index"
    build_index(biomed_datastore, out, plan=FLAT, recall_queries=0)
    os.replace(out, out.with_name("index.old"))  # as a kill between the renames leaves it, the work dir then lost
    with pytest.raises(ArtifactError, match="already exists; pass --overwrite"):
        build_index(biomed_datastore, out, plan=FLAT, recall_queries=0)
    assert (out / INDEX).is_file() and not out.with_name("index.old").exists()


def test_an_output_under_a_file_is_a_clear_error(tmp_path, biomed_datastore):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ArtifactError, match="--out .*afile/index cannot be written: .*afile is not a writable dir"):
        build_index(biomed_datastore, tmp_path / "afile" / "index", plan=FLAT)


def test_an_overwrite_after_a_stop_at_the_rename_builds_what_it_is_asked(tmp_path, biomed_datastore):
    """The finished work of the stopped run is published, then --overwrite with other settings replaces it."""
    from lightning_memdec.io.artifact_dirs import read_meta

    out = tmp_path / "index"
    killed_at_rename(biomed_datastore, out, ".partial")
    build_index(biomed_datastore, out, plan=IndexSettings(factory="IVF4,Flat"), recall_queries=0, overwrite=True)
    assert read_meta(out)["factory"] == "IVF4,Flat" and not partial_dir(out).exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([INDEX, "meta.json"])  # the run's settings stay behind


def test_a_run_of_other_settings_after_a_stop_at_the_rename_is_refused_not_called_done(tmp_path, biomed_datastore):
    """The stopped run's finished work is put in place, but it is not this command's: without --overwrite it is
    refused as any existing output is (it was reported done, with the other run's index); the same command is done."""
    from lightning_memdec.io.artifact_dirs import RUN_CONFIG, read_meta

    out = tmp_path / "index"
    killed_at_rename(biomed_datastore, out, ".partial")
    with pytest.raises(ArtifactError, match="already exists; pass --overwrite"):
        build_index(biomed_datastore, out, plan=IndexSettings(factory="IVF4,Flat"), recall_queries=0)
    assert read_meta(out)["factory"] == "Flat" and not partial_dir(out).exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([INDEX, "meta.json"])  # its run's settings not published
    assert not (out / RUN_CONFIG).exists()


@pytest.mark.parametrize("rerun", [{"plan": IndexSettings(factory="Flat", nprobe=8)}, {"recall_queries": 16}])
def test_a_rerun_after_a_stop_at_the_rename_that_differs_in_what_meta_records_is_refused(
    tmp_path, biomed_datastore, rerun
):
    """nprobe and the recall measurement are in the published meta.json (nprobe is applied on load): a rerun that
    differs only there is not the stopped run, and was called done with the stopped run's nprobe."""
    from lightning_memdec.io.artifact_dirs import read_meta

    out = tmp_path / "index"
    killed_at_rename(biomed_datastore, out, ".partial")  # nprobe 32, no recall measured
    with pytest.raises(ArtifactError, match="already exists; pass --overwrite"):
        build_index(biomed_datastore, out, **({"plan": FLAT, "recall_queries": 0} | rerun))
    assert read_meta(out)["nprobe"] == 32 and read_meta(out)["recall"] is None


def test_an_unfinished_run_of_other_settings_is_refused_naming_what_differs(tmp_path):
    """The refusal names each setting that differs, the recorded value and this run's, so a user can resume with
    the recorded ones rather than discard the progress."""
    from lightning_memdec.io.artifact_dirs import RUN_CONFIG, start_work_dir

    out = tmp_path / "out"
    work = start_work_dir(out, {"window": 64, "seed": 0, "nprobe": 32, "store": {"n": 5}}, overwrite=False)
    with pytest.raises(ArtifactError) as refused:
        start_work_dir(out, {"window": 64, "seed": 0, "nprobe": 8, "store": {"n": 6}, "new": True}, overwrite=False)
    differences = 'new: not set there, true here; nprobe: 32 there, 8 here; store: {"n": 5} there, {"n": 6} here'
    assert f"different settings ({differences}); rerun with its settings to resume it (a setting not set there" in str(
        refused.value
    )
    with pytest.raises(ArtifactError) as refused:  # every setting recorded: nothing said of earlier versions
        start_work_dir(out, {"window": 64, "seed": 0, "nprobe": 8, "store": {"n": 5}}, overwrite=False)
    assert str(refused.value).endswith("(nprobe: 32 there, 8 here); rerun with its settings to resume it, or pass "
                                       "--overwrite to discard it.")  # fmt: skip
    (work / RUN_CONFIG).unlink()
    with pytest.raises(ArtifactError, match=r"different settings \(its settings are not recorded\)"):
        start_work_dir(out, {"window": 64}, overwrite=False)


def test_an_unfinished_run_of_an_earlier_version_resumes_unless_it_lacks_a_setting(tmp_path):
    """A setting an earlier version recorded and this one does not (build-datastore's model path beside its
    weights' hash) is not compared: the run resumes, where its progress was lost to --overwrite. One it did not
    record is: refused, saying only that version can resume it."""
    from lightning_memdec.io.artifact_dirs import RUN_CONFIG, start_work_dir

    out = tmp_path / "out"
    work = start_work_dir(out, {"model": "m", "model_sha256": "abc", "window": 64}, overwrite=False)
    (work / "progress").mkdir()
    assert start_work_dir(out, {"model_sha256": "abc", "window": 64}, overwrite=False) == work
    assert (work / "progress").is_dir()
    with pytest.raises(ArtifactError, match=r"different settings \(model_sha256: \"abc\" there, \"def\" here\)"):
        start_work_dir(out, {"model_sha256": "def", "window": 64}, overwrite=False)
    (work / RUN_CONFIG).write_text('{"window": 64}')  # recorded before the weights' hash was
    with pytest.raises(ArtifactError, match="not set there, .* which alone can resume it"):
        start_work_dir(out, {"model_sha256": "abc", "window": 64}, overwrite=False)


def test_an_overwrite_with_other_settings_discards_the_unfinished_run(tmp_path):
    """--overwrite over an unfinished run of other settings starts afresh: its progress is gone, only the new
    settings are recorded (a rerun must not resume chunks computed under the old ones)."""
    import json

    from lightning_memdec.io.artifact_dirs import RUN_CONFIG, start_work_dir

    out = tmp_path / "out"
    work = start_work_dir(out, {"window": 64}, overwrite=False)
    (work / "progress").mkdir()
    (work / "progress" / "000000000").write_text("chunk")
    assert start_work_dir(out, {"window": 128}, overwrite=True) == work
    assert [p.name for p in work.iterdir()] == [RUN_CONFIG]
    assert json.loads((work / RUN_CONFIG).read_text()) == {"window": 128}


def test_a_stale_set_aside_output_is_removed(tmp_path, biomed_datastore):
    import shutil

    out = tmp_path / "index"
    build_index(biomed_datastore, out, plan=FLAT, recall_queries=0)
    shutil.copytree(out, out.with_name("index.old"))  # a kill after the new output was in place, before the cleanup
    build_index(biomed_datastore, out, plan=FLAT, recall_queries=0, overwrite=True)
    assert not out.with_name("index.old").exists()


@pytest.mark.parametrize("state", ["publishing", "published", "unfinished", "absent"])
def test_a_secondary_rank_never_starts_beside_a_publication_rank_0_completes(tmp_path, monkeypatch, state):
    """Under torchrun rank 0 alone finished a stopped publication; rank 1 went on into the ranks' set-up and waited
    there for a rank 0 that had exited (a hang), or, a moment later, failed with "already exists"."""
    from lightning_memdec.io.artifact_dirs import META, AlreadyPublished, start_work_dir

    out, work = tmp_path / "idx", partial_dir(tmp_path / "idx")
    if state != "absent":
        (out if state == "published" else work).mkdir()
    if state == "publishing":
        (work / META).write_text("{}")  # finished, not yet renamed
    monkeypatch.setenv("RANK", "1")
    if state in ("publishing", "published"):
        with pytest.raises(AlreadyPublished, match="rank 0 says"):
            start_work_dir(out, {"k": 1}, overwrite=False)
        assert start_work_dir(out, {"k": 1}, overwrite=True) == work  # --overwrite: every rank rebuilds
    else:
        assert start_work_dir(out, {"k": 1}, overwrite=False) == work
    assert not out.exists() or state == "published"  # a secondary rank moves nothing
