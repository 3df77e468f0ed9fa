"""`memdec fit` under FSDP2 (``hardware/fsdp2.yaml``) on 2 CPU processes (gloo) against 1 process: the same windows,
weights and losses, the decoder sharded (each rank holds half of every sharded weight), and an exact resume.

The runs and their tolerance are tests/test_training_ddp.py's: a rank's batch is half the one process's, so the two
runs see the same windows each step and differ only by the order of fp32 sums.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_training_ddp import BATCH, REPO, STEPS, WEIGHT_ATOL, fit, fit_args, records, small_pair, weights

from lightning_memdec.cli import main
from lightning_memdec.training.lightning_module import MemoryDecoderModule

__all__ = ["small_pair"]  # the module-scoped fixture, imported from the DDP tests
ON_CPU = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.devices", "2"]


def fsdp2_fit(pair: dict, root: Path, ckpt_path: Path | None = None) -> Path:
    """The DDP tests' run (batch BATCH a rank: 2 × BATCH windows a step) on 2 FSDP2 ranks."""
    args = ["fit", "--config", "hardware/fsdp2.yaml", *fit_args(pair, root, BATCH), *ON_CPU]
    args += [f"--ckpt_path={ckpt_path}"] if ckpt_path else []
    args += ["--trainer.callbacks+=recording.RecordShards", f"--trainer.callbacks.init_args.path={root / 'shards'}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "lightning_memdec", *args], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_pair) -> dict[str, Path]:
    """The same training on 1 process (batch 2 × BATCH) and on 2 FSDP2 processes (batch BATCH each)."""
    root = tmp_path_factory.mktemp("fsdp2")
    return {"one": fit(small_pair, root / "one", 1), "fsdp2": fsdp2_fit(small_pair, root / "fsdp2")}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_fsdp2_processes_train_the_weights_and_losses_of_one_process(runs):
    w1, w2 = weights(runs["one"]), weights(runs["fsdp2"])
    assert w1.keys() == w2.keys()
    # the same tensors on disk: the tied embedding saved once (the gathered state held it under both names)
    saved = [safe_open(runs[run] / "hf" / "model.safetensors", "pt").keys() for run in ("one", "fsdp2")]
    assert saved[1] == saved[0] and "lm_head.weight" not in saved[1]
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    print(f"max |Δw| 1 process vs 2 FSDP2 processes: {diff:.3g}")
    assert diff < WEIGHT_ATOL
    (one,), (rank0, rank1) = records(runs["one"], 1), records(runs["fsdp2"], 2)
    two = [sorted(s for r in (rank0, rank1) for s in r["starts"][step] if s != -1) for step in range(STEPS)]
    assert [sorted(step) for step in one["starts"]] == two
    for key in ("train/loss", "train/kl", "train/ce"):
        losses = [np.array([step[key] for step in r["train"]]) for r in (one, rank0, rank1)]
        np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5, err_msg=f"{key}: the loss of all windows")
        np.testing.assert_array_equal(losses[2], losses[1], err_msg=f"{key}: both ranks log the same value")
    for key in ("val/loss", "val/ppl"):
        np.testing.assert_allclose([v[key] for v in rank0["val"]], [v[key] for v in one["val"]], rtol=1e-5)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_each_fsdp2_rank_holds_half_of_every_weight(runs):
    """Every parameter of the decoder is sharded over the 2 ranks (dim 0, padded when odd): each rank holds about
    half, together all of it; the unsharded run would hold all of every weight on each rank."""
    shards = [json.loads((runs["fsdp2"] / "shards" / f"shards{r}.json").read_text()) for r in (0, 1)]
    whole = shards[0]["whole"]
    assert whole and all(name.startswith("decoder.") for name in whole)
    for name, numel in whole.items():
        held = [s["local"][name] for s in shards]
        assert sum(held) == numel and max(held) < numel, (name, held, numel)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp2_resumes_mid_epoch_to_the_weights_of_the_straight_run(runs, small_pair, tmp_path):
    """Resumed from the FSDP2 run's full checkpoint after step 1 (rank 0's file, loaded into the shards): the rest
    of the straight run's windows, and its weights."""
    fsdp2_fit(small_pair, tmp_path, ckpt_path=runs["fsdp2"] / "ckpt" / "step1.ckpt")
    rest, straight = [r["starts"] for r in records(tmp_path, 2)], [r["starts"] for r in records(runs["fsdp2"], 2)]
    assert rest == [r[1:] for r in straight]
    resumed, w2 = weights(tmp_path), weights(runs["fsdp2"])
    for name in w2:
        torch.testing.assert_close(resumed[name], w2[name], rtol=0, atol=0, msg=name)


def test_without_a_device_mesh_the_decoder_is_not_sharded():
    """Under DDP or one device ``configure_model`` leaves the decoder's parameters plain tensors."""
    module = MemoryDecoderModule(
        config={"model_type": "gpt2", "vocab_size": 64, "n_embd": 8, "n_layer": 1, "n_head": 2}
    )
    module.configure_model()
    assert not any(hasattr(p, "to_local") for p in module.parameters())


@pytest.mark.parametrize(
    "hardware, says",
    [
        (["--config", "hardware/fsdp.yaml", "--trainer.accelerator", "cpu"], "The strategy `fsdp` requires a GPU"),
        (["--config", "hardware/fsdp2.yaml"], "No supported gpu backend found"),  # accelerator: gpu, on a CPU machine
    ],
)
def test_a_strategy_this_machine_cannot_run_is_one_error_line(hardware, says, capsys, monkeypatch):
    """Lightning's refusal of the trainer settings reaches the user as `memdec fit: error: …`, no traceback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = json.dumps({"model_type": "gpt2", "vocab_size": 64, "n_embd": 8, "n_layer": 1, "n_head": 2})
    with pytest.raises(SystemExit) as stop:
        main(["fit", *hardware, f"--model.config={model}", "--data.train_corpus=c", "--trainer.devices=1"])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("memdec fit: error: the trainer settings (--trainer.*, the hardware config) do not run here")
    assert says in err and "Traceback" not in err
