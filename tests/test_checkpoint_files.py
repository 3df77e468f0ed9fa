"""Checkpoints a resume can trust: saved atomically, a damaged last.ckpt skipped for the newest whole one, or an error
naming the files; never a traceback from deep in the restore, never a silent restart."""

import errno
import os

import pytest
import torch

import lightning_memdec.training.checkpoint_files as checkpoint_files
from lightning_memdec.training.checkpoint_files import (
    AtomicCheckpointIO,
    CheckpointDiskFull,
    check_checkpoint,
    checkpoint_problem,
    resumable_checkpoint,
)


def save(path, value: float) -> None:
    torch.save({"state_dict": {"w": torch.full((64,), value)}, "global_step": int(value)}, path)


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_failed_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(8)}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_files.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(8)}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["global_step"] == 1 and torch.equal(loaded["w"], torch.ones(8))
    assert sorted(os.listdir(path.parent)) == ["last.ckpt"], "no temporary file is left behind"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])  # a full disk, or the user's quota (clusters)
def test_a_save_out_of_space_or_quota_is_the_one_line_disk_full_error(tmp_path, monkeypatch, code):
    def out_of_space(obj, f, *args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpoint_files.torch, "save", out_of_space)
    with pytest.raises(CheckpointDiskFull, match="no space left on the device while saving checkpoint") as err:
        AtomicCheckpointIO().save_checkpoint({"global_step": 1}, tmp_path / "last.ckpt")
    assert isinstance(err.value, ValueError) and err.value.errno == code
    assert os.listdir(tmp_path) == []


def test_a_disk_filling_up_inside_torch_s_zip_writer_is_the_disk_full_error(tmp_path, monkeypatch):
    """The disk fills up mid-save: the file's write raises ENOSPC after 4 KiB, inside torch.save's zip writer, which
    re-raises it as a RuntimeError (the OSError its context, not its cause). The user still gets CheckpointDiskFull
    (errno ENOSPC), the earlier checkpoint whole and no temporary file left."""
    import builtins
    import io

    class FillsUp(io.FileIO):
        def write(self, data):
            if self.tell() + len(data) > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(data)

    checkpoint = {"global_step": 2, "w": torch.randn(10_000)}
    with FillsUp(tmp_path / "raw.pt", "wb") as f, pytest.raises(RuntimeError) as raw:  # the guard: torch wraps
        torch.save(checkpoint, f)  # the OSError, as on a real full disk
    assert not isinstance(raw.value, OSError) and raw.value.__cause__ is None
    (tmp_path / "raw.pt").unlink()
    path = tmp_path / "ckpt" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, path)

    def fills_up(file, mode="r", *args, **kwargs):
        return FillsUp(file, mode) if "w" in mode else builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint_files, "open", fills_up, raising=False)
    with pytest.raises(CheckpointDiskFull, match="no space left on the device while saving checkpoint") as err:
        AtomicCheckpointIO().save_checkpoint(checkpoint, path)
    assert err.value.errno == errno.ENOSPC
    assert os.listdir(path.parent) == ["last.ckpt"] and torch.load(path, weights_only=True) == {"global_step": 1}


def test_checkpoint_problem_finds_truncated_and_flipped_bytes(tmp_path):
    whole, cut, flipped = tmp_path / "a.ckpt", tmp_path / "b.ckpt", tmp_path / "c.ckpt"
    for path in (whole, cut, flipped):
        save(path, 3.0)
    truncate(cut)
    data = bytearray(flipped.read_bytes())
    at = data.index(torch.full((64,), 3.0).numpy().tobytes())  # inside the tensor's bytes
    data[at + 5] ^= 0xFF
    flipped.write_bytes(bytes(data))
    assert checkpoint_problem(whole) is None
    assert "not a whole checkpoint" in checkpoint_problem(cut)
    assert "fails its CRC check" in checkpoint_problem(flipped)
    with pytest.raises(ValueError, match=rf"--ckpt_path {cut} is not a whole checkpoint.*--ckpt_path last"):
        check_checkpoint(cut)


def test_resume_falls_back_to_the_newest_whole_checkpoint(tmp_path, caplog):
    for step in (1, 2, 3):
        save(tmp_path / f"step{step}.ckpt", float(step))
        os.utime(tmp_path / f"step{step}.ckpt", ns=(step * 10**9, step * 10**9))
    save(tmp_path / "last.ckpt", 3.0)
    os.utime(tmp_path / "last.ckpt", ns=(4 * 10**9, 4 * 10**9))
    assert resumable_checkpoint(tmp_path) == tmp_path / "last.ckpt"
    truncate(tmp_path / "last.ckpt")
    truncate(tmp_path / "step3.ckpt", keep=0.9)
    with caplog.at_level("WARNING"):
        assert resumable_checkpoint(tmp_path) == tmp_path / "step2.ckpt"
    assert f"{tmp_path / 'last.ckpt'} is not a whole checkpoint" in caplog.text and "step2.ckpt" in caplog.text
    for step in (1, 2):
        truncate(tmp_path / f"step{step}.ckpt")
    with pytest.raises(ValueError, match=r"no checkpoint in .* is whole \(.*; the saves were cut short") as err:
        resumable_checkpoint(tmp_path)
    for name in ("last.ckpt", "step1.ckpt", "step2.ckpt"):
        assert f"{name}: not a whole checkpoint" in str(err.value)


def test_step_files_without_a_last_ckpt_are_not_resumed_silently(tmp_path):
    """checkpoint.save_last false leaves step files only: --ckpt_path last is then the documented error (no last.ckpt,
    nothing to resume), never a silent pick of a step file, however whole it is."""
    save(tmp_path / "step1.ckpt", 1.0)
    assert checkpoint_problem(tmp_path / "step1.ckpt") is None  # a whole checkpoint a fallback could have taken
    with pytest.raises(FileNotFoundError, match="there is no last.ckpt in .*nothing to resume"):
        resumable_checkpoint(tmp_path)


def test_last_ckpt_wins_a_tie_of_modification_times(tmp_path):
    """A file system with 1 s (or 2 s) timestamps, or two saves in one tick: last.ckpt (step 5) is still preferred
    over the step file saved before it (step 4)."""
    save(tmp_path / "step4.ckpt", 4.0)
    save(tmp_path / "last.ckpt", 5.0)
    for name in ("step4.ckpt", "last.ckpt"):
        os.utime(tmp_path / name, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))
    assert resumable_checkpoint(tmp_path) == tmp_path / "last.ckpt"


def test_a_kill_between_a_step_file_and_last_ckpt_resumes_from_the_step_file(tmp_path, caplog):
    """Killed after step6.ckpt was written and before last.ckpt was (still step 5): the later step resumes, with a
    warning that says why last.ckpt was passed over (this raised a KeyError)."""
    for step, name in [(5, "step5.ckpt"), (5, "last.ckpt"), (6, "step6.ckpt")]:
        save(tmp_path / name, float(step))
        os.utime(tmp_path / name, ns=(step * 10**9 + len(name), step * 10**9 + len(name)))
    with caplog.at_level("WARNING"):
        assert resumable_checkpoint(tmp_path) == tmp_path / "step6.ckpt"
    assert f"{tmp_path / 'last.ckpt'} is whole but older than step6.ckpt; resuming from" in caplog.text


def test_a_resume_pins_the_logger_to_the_checkpointed_version(tmp_path):
    from jsonargparse import Namespace

    from lightning_memdec.training.resume_state import LOGGER_KEY, resumed_logger

    tensorboard = "lightning.pytorch.loggers.tensorboard.TensorBoardLogger"
    path = tmp_path / "last.ckpt"
    torch.save({"global_step": 3, LOGGER_KEY: {"class_path": tensorboard, "version": 2}}, path)
    for default in (None, True):
        pinned = resumed_logger(default, path, str(tmp_path))
        assert pinned.class_path == tensorboard and pinned.init_args == Namespace(save_dir=str(tmp_path), version=2)
    assert resumed_logger(False, path, None) is False
    given = Namespace(class_path=tensorboard, init_args=Namespace(save_dir="logs", version=None))
    assert resumed_logger(given, path, None).init_args.version == 2
    # as logger/tensorboard.yaml and logger/csv.yaml name them: the package's re-export of the same class
    short = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger", init_args=Namespace(version=None))
    assert resumed_logger(short, path, None).init_args.version == 2
    chosen = Namespace(class_path=tensorboard, init_args=Namespace(save_dir="logs", version=7))
    assert resumed_logger(chosen, path, None).init_args.version == 7, "a version the user gives wins"
    other = Namespace(class_path="lightning.pytorch.loggers.csv_logs.CSVLogger", init_args=Namespace(version=None))
    assert resumed_logger(other, path, None).init_args.version is None
    torch.save({"global_step": 3}, path)  # a checkpoint of an older version
    assert resumed_logger(None, path, None) is None
