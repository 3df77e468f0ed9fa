"""What `memdec fit` writes outside its checkpoints, and what it refuses: an export dir of another run or under a file
(before training), a full disk at a checkpoint and a resume with a model of another size (one error line naming the
fix), and an export replaced by one rename, so a kill during it leaves the previous export whole."""

import errno
import json

import pytest
import torch
from safetensors.torch import load_file
from test_training import TINY_DECODER, resume_args

import lightning_memdec.training.callbacks as callbacks
import lightning_memdec.training.checkpoint_files as checkpoint_files
from lightning_memdec.cli import main
from lightning_memdec.io.artifact_dirs import ArtifactError, partial_dir
from lightning_memdec.training.checkpoint_files import checkpoint_problem
from lightning_memdec.training.fit import MemDecCLI, lightning_cli


def fit_args(pair, root, export=None, steps=2, *extra):
    args = [*resume_args(pair, root), "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0"]
    return [*args, *(["--export.dirpath", str(export)] if export else []), *extra]


def exported(export) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((export / "meta.json").read_text()), load_file(export / "model.safetensors")


def checkpoint_weights(root) -> dict[str, torch.Tensor]:
    state = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    return {k.removeprefix("decoder."): v for k, v in state.items() if k.startswith("decoder.")}


def test_an_export_of_another_run_is_refused_before_training_and_replaced_only_with_overwrite(
    tmp_path, biomed_targets_pair, monkeypatch
):
    pair, export = biomed_targets_pair, tmp_path / "decoder"
    lightning_cli(fit_args(pair, tmp_path / "a", export, 2))
    lightning_cli([*fit_args(pair, tmp_path / "a", export, 3), "--ckpt_path", "last"])  # the same run: replaced
    meta, weights = exported(export)
    assert meta["global_step"] == 3 and meta["run_root"] == str((tmp_path / "a").resolve())
    torch.testing.assert_close(weights["transformer.h.0.attn.c_attn.weight"],
                               checkpoint_weights(tmp_path / "a")["transformer.h.0.attn.c_attn.weight"])  # fmt: skip

    with pytest.raises(ArtifactError, match=r"exported by another run .*--export.overwrite true"):
        lightning_cli(fit_args(pair, tmp_path / "b", export, 1))
    assert not (tmp_path / "b" / "checkpoints").exists(), "refused before the first step"
    assert exported(export)[0] == meta
    with monkeypatch.context() as patched:  # and before any model loads: `memdec fit` checks before building classes
        patched.setattr(MemDecCLI, "instantiate_classes", lambda cli: pytest.fail("models built before the check"))
        with pytest.raises(ArtifactError, match=r"exported by another run"):
            lightning_cli(fit_args(pair, tmp_path / "b", export, 1))
    lightning_cli(fit_args(pair, tmp_path / "b", export, 1, "--export.overwrite", "true"))
    assert exported(export)[0]["run_root"] == str((tmp_path / "b").resolve())
    assert exported(export)[0]["global_step"] == 1


def test_an_export_counts_the_tokens_of_accumulated_batches(tmp_path, biomed_targets_pair):
    """tokens_seen in meta.json: every window of every optimiser step, accumulated batches included (2 steps of 2
    batches of 2 windows of 32 tokens)."""
    export = tmp_path / "decoder"
    lightning_cli(fit_args(biomed_targets_pair, tmp_path / "a", export, 2, "--trainer.accumulate_grad_batches", "2"))
    meta, _ = exported(export)
    assert (meta["global_step"], meta["tokens_seen"]) == (2, 2 * 2 * 2 * 32)


def test_a_failure_during_the_export_leaves_the_previous_export_whole(tmp_path, biomed_targets_pair, monkeypatch):
    pair, root, export = biomed_targets_pair, tmp_path / "run", tmp_path / "decoder"
    lightning_cli(fit_args(pair, root, export, 2))
    before = {p.name: p.read_bytes() for p in export.iterdir()}

    class Killed:  # the weights are written; the process dies before the tokenizer and meta.json
        def save_pretrained(self, out):
            raise RuntimeError("killed during the export")

    monkeypatch.setattr(callbacks, "load_tokenizer", lambda name: Killed())
    with pytest.raises(RuntimeError, match="killed during the export"):
        lightning_cli([*fit_args(pair, root, export, 4), "--ckpt_path", "last"])
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before, "weights and meta.json of one run"

    monkeypatch.undo()
    lightning_cli([*fit_args(pair, root, export, 4), "--ckpt_path", "last"])  # the same command again
    meta, weights = exported(export)
    assert meta["global_step"] == 4 and not partial_dir(export).exists()
    torch.testing.assert_close(weights["transformer.wte.weight"], checkpoint_weights(root)["transformer.wte.weight"])


def test_an_output_under_a_file_or_into_other_files_is_refused_before_training(tmp_path, biomed_targets_pair):
    pair, afile = biomed_targets_pair, tmp_path / "afile"
    afile.write_text("not a directory")
    with pytest.raises(ArtifactError, match=r"--export.dirpath .*afile/hf cannot be written: .*afile is not a"):
        lightning_cli(fit_args(pair, tmp_path / "run", afile / "hf"))
    with pytest.raises(ArtifactError, match=r"--trainer.default_root_dir .*afile/root cannot be written"):
        lightning_cli(fit_args(pair, afile / "root"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ArtifactError, match=r"notes holds files that are not a decoder"):
        lightning_cli(fit_args(pair, tmp_path / "run", tmp_path / "notes", 2, "--export.overwrite", "true"))
    assert not (tmp_path / "run" / "checkpoints").exists() and (tmp_path / "notes" / "todo.txt").read_text() == "mine"


class FillingFile:
    """A file on a disk that is full after ``room`` bytes: its writes then fail with ENOSPC, as a real disk's."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_a_full_disk_at_a_checkpoint_is_one_error_line_and_keeps_the_saved_checkpoints(
    tmp_path, biomed_targets_pair, monkeypatch, capsys
):
    saves = []

    def open_on_a_filling_disk(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        saves.append(path)
        return file if len(saves) <= 2 else FillingFile(file, room=4096)  # step 1's step1.ckpt and last.ckpt fit

    monkeypatch.setattr(checkpoint_files, "open", open_on_a_filling_disk, raising=False)
    root = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        main(fit_args(biomed_targets_pair, root, None, 3))
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("memdec fit: error: no space left on the device while saving checkpoint ")
    assert "(`memdec fit`: the same arguments and --ckpt_path last; `memdec quickstart` and" in err
    checkpoints = root / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step1.ckpt"]  # no .tmp left
    assert checkpoint_problem(checkpoints / "last.ckpt") is None
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 1


def test_a_resume_with_a_model_of_another_width_names_the_shapes_and_the_fix(tmp_path, biomed_targets_pair):
    root = tmp_path / "run"
    lightning_cli(fit_args(biomed_targets_pair, root, None, 1))
    wider = [TINY_DECODER[0], TINY_DECODER[1].replace('"n_embd": 32', '"n_embd": 64')]
    args = [*fit_args(biomed_targets_pair, root, None, 2), *wider, "--ckpt_path", "last"]
    with pytest.raises(ValueError, match=r"last.ckpt holds a decoder of another shape") as refused:
        lightning_cli(args)
    message = str(refused.value)
    assert "decoder.transformer.wte.weight: checkpoint [50257, 32], model [50257, 64]" in message
    assert "resume with the model settings the run was started with" in message
    assert "--trainer.default_root_dir" in message


def test_an_export_of_an_earlier_version_is_not_taken_for_this_runs_own(tmp_path):
    """An export without run_root (written before exports recorded their run) belongs to no known run: refused, the
    files untouched; with overwrite it may be replaced."""
    out = tmp_path / "hf"
    out.mkdir()
    meta = {"kind": "memory_decoder", "global_step": 7}
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="unknown \\(an export of an earlier lightning_memdec\\), global step 7"):
        callbacks.check_export_dir(out, str(tmp_path / "root"), overwrite=False)
    assert json.loads((out / "meta.json").read_text()) == meta
    callbacks.check_export_dir(out, str(tmp_path / "root"), overwrite=True)


def test_an_export_stopped_at_its_rename_is_finished_before_the_next_run_checks_it(tmp_path):
    """A kill between the renames left the finished export in <dir>.partial and the old one as <dir>.old: the next
    run's setup puts the finished one in place (then finds it its own) instead of refusing or losing it."""
    out, root = tmp_path / "hf", str(tmp_path / "root")
    work = partial_dir(out)
    work.mkdir()
    (work / "meta.json").write_text(json.dumps({"kind": "memory_decoder", "global_step": 9, "run_root": root}))
    out.with_name("hf.old").mkdir()
    export = callbacks.ExportHuggingFace(dirpath=str(out))
    assert export.prepare(out, root) is None
    export.release()
    assert json.loads((out / "meta.json").read_text())["global_step"] == 9
    assert not work.exists() and not out.with_name("hf.old").exists()


def test_a_float16_export_keeps_tied_weights_one_tensor_saved_once(tmp_path):
    """export.dtype casts the decoder's weights; GPT-2's LM head is tied to its embedding (one tensor, two names):
    the cast keeps them one tensor, so the export holds the embedding once, as the float32 save does, and not a
    second 50k-row copy."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=500, n_positions=32))
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()  # tied: the case
    cast = callbacks.cast_state_dict(state, torch.float16)
    assert cast["lm_head.weight"] is cast["transformer.wte.weight"]
    for name, tensor in state.items():
        assert torch.equal(cast[name], tensor.to(torch.float16) if tensor.is_floating_point() else tensor), name
    model.save_pretrained(tmp_path / "fp32")
    model.save_pretrained(tmp_path / "fp16", state_dict=cast)
    saved = {name: load_file(tmp_path / name / "model.safetensors") for name in ("fp32", "fp16")}
    assert saved["fp16"].keys() == saved["fp32"].keys()
    assert {t.dtype for t in saved["fp16"].values() if t.is_floating_point()} == {torch.float16}
