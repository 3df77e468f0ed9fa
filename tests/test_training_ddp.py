"""`memdec fit|test` on 2 CPU processes (DDP, gloo) against 1 process: same windows, weights, losses and metrics.

A run on R ranks with ``data.batch_size`` b must train like one process with batch R·b: EvenShardSampler deals
the shuffled permutation round-robin (rank r takes its entries r, r + R, ...), so the R per-rank batches of step k
are together entries [k·R·b, (k+1)·R·b) of the permutation — the 1-process batch of step k. The splits are chosen
so that ranks get unequal work: the training split has 5 windows (the last scores only 22 of its 32 positions),
so with b = 2 the second step of every epoch gives rank 0 one window and rank 1 only a filler; the validation split
is one window, so rank 1 validates on filler alone; the test split (the training corpus) gives the ranks 86 and
64 scored positions.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_memdec.io.token_corpus import Corpus, position_windows, tokenize
from lightning_memdec.stages.settings import Hardware, KNNTargets, Windows
from lightning_memdec.training.datamodule import MemDecDataModule
from lightning_memdec.training.fit import lightning_cli
from lightning_memdec.training.lightning_module import MemoryDecoderModule

REPO = Path(__file__).resolve().parents[1]
WINDOW, BATCH, STEPS = 32, 2, 4  # 5 windows / (2 ranks × 2) = 2 steps per epoch: 4 steps are 2 epochs
DECODER = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 2}
DECODER.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: both runs compute the same function
#: Max |Δ| of a weight after 4 AdamW steps (lr 3e-3) between 1 and 2 processes. The runs add the same per-position
#: gradients in another order (two partial sums, then gloo's all-reduce, with other thread counts), so gradients
#: differ by fp32 rounding δ (~1e-7 relative); Adam's update lr·m / (sqrt(v) + eps) turns that into about
#: lr·δ / max(|g|, eps), large only for the few gradients near zero. Measured: 4e-6 in a handful of elements (the
#: weights moved 9e-3 over steps 2-4); 6.4e-5 on the de-duplicated biomed corpus, whose windows differ; averaging
#: the ranks' means instead of weighing positions gave 1.8e-2, so 2e-4 still separates the bug by ~100x.
WEIGHT_ATOL = 2e-4


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory, biomed_datastore, tiny_gpt2) -> dict:
    """A 5-window training split and a 1-window validation split, with kNN targets from the biomed datastore."""
    from lightning_memdec.stages.datastore import build_datastore
    from lightning_memdec.stages.targets import build_targets

    root = tmp_path_factory.mktemp("small")
    pair = {}
    for split, text, tokens in [("train", "embedded:biomed/test", 151), ("val", "embedded:law/valid", 33)]:
        corpus = tokenize([text], root / f"corpus-{split}", "gpt2", max_tokens=tokens)
        ds = build_datastore(
            corpus,
            str(tiny_gpt2),
            root / f"ds-{split}",
            windows=Windows(window=32, stride=32),
            hardware=Hardware(accelerator="cpu"),
        )
        targets = build_targets(
            biomed_datastore, out=root / f"t-{split}", queries=ds, knn=KNNTargets(k=32, temperature=4.0)
        )
        pair |= {f"{split}_corpus": str(corpus), f"{split}_targets": str(targets)}
    assert len(position_windows(Corpus(pair["train_corpus"]).num_positions, WINDOW, WINDOW).starts) == 5
    assert len(position_windows(Corpus(pair["val_corpus"]).num_positions, WINDOW, WINDOW).starts) == 1
    return pair


def memdec(subcommand: str, args: list[str], devices: int) -> None:
    """`memdec <subcommand>` on the ddp_cpu hardware: in this process for 1 device, else as DDP subprocesses."""
    args = [subcommand, "--config", str(REPO / "conf/hardware/ddp_cpu.yaml"), *args]
    if devices == 1:
        lightning_cli([*args, "--trainer.devices", "1", "--trainer.strategy", "auto"])
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "lightning_memdec", *args, "--trainer.devices", str(devices)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def fit(pair: dict, root: Path, devices: int, ckpt_path: Path | None = None) -> Path:
    """Train with `devices` ranks × batch BATCH·2/devices (2 × BATCH windows per step either way)."""
    args = fit_args(pair, root, BATCH * 2 // devices)
    memdec("fit", args + ([f"--ckpt_path={ckpt_path}"] if ckpt_path else []), devices)
    return root


def fit_args(pair: dict, root: Path, batch_size: int) -> list[str]:
    """`memdec fit` arguments of the runs compared here (also by tests/test_cluster.py), minus the hardware."""
    data = [f"--data.{k}={v}" for k, v in pair.items()]
    data += [f"--data.window={WINDOW}", f"--data.batch_size={batch_size}", "--data.max_support=16"]
    return [
        f"--model.config={json.dumps(DECODER)}", "--model.learning_rate=3e-3", "--model.lr_schedule=constant",
        "--model.warmup_steps=0", *data, "--seed_everything=7", f"--trainer.max_steps={STEPS}",
        "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}",
        f"--checkpoint.dirpath={root / 'ckpt'}", "--checkpoint.every_n_train_steps=1",
        "--checkpoint.save_top_k=-1", f"--export.dirpath={root / 'hf'}",
        "--trainer.callbacks+=recording.RecordWindows", f"--trainer.callbacks.init_args.path={root / 'record'}",
    ]  # fmt: skip


def records(root: Path, devices: int) -> list[dict]:
    return [json.loads((root / "record" / f"rank{r}.json").read_text()) for r in range(devices)]


def weights(root: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(root / "hf").state_dict()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_pair) -> dict[int, Path]:
    """The same training on 1 process (batch 4) and on 2 DDP processes (batch 2 each)."""
    root = tmp_path_factory.mktemp("runs")
    return {devices: fit(small_pair, root / f"devices{devices}", devices) for devices in (1, 2)}


def test_a_split_smaller_than_ranks_times_batch_leaves_no_rank_without_batches(small_pair):
    """One window, 2 ranks × batch 4: each rank still gets one batch (a rank without batches would leave the others
    waiting in DDP's all-reduce), rank 1's is a filler window that carries no loss: zero loss and gradient."""
    corpus, targets = small_pair["val_corpus"], small_pair["val_targets"]
    batches = []
    for rank in (0, 1):
        dm = MemDecDataModule(corpus, targets, corpus, targets, window=WINDOW, batch_size=4)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, accelerator=None)
        dm.setup("fit")
        for loader in (dm.train_dataloader(), dm.val_dataloader()):
            assert len(loader) == 1
            batches.append(next(iter(loader)))
    assert [b["start"].tolist() for b in batches] == [[0], [0], [-1], [-1]]
    assert batches[0]["loss_mask"].all() and not batches[2]["loss_mask"].any()
    module = MemoryDecoderModule(config=DECODER)
    module.configure_model()
    module.log_dict = lambda *args, **kwargs: None  # no Trainer to log to
    loss = module.training_step(batches[2], 0)
    loss.backward()
    assert loss.item() == 0.0 and all(float(p.grad.abs().max()) == 0.0 for p in module.parameters())


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_train_on_the_windows_of_one_process_with_twice_the_batch(runs, small_pair):
    (one,), ranks = records(runs[1], 1), records(runs[2], 2)
    one = one["starts"]
    two = [sorted(s for r in ranks for s in r["starts"][step] if s != -1) for step in range(STEPS)]
    assert len(one) == len(ranks[0]["starts"]) == len(ranks[1]["starts"]) == STEPS
    assert [sorted(step) for step in one] == two
    starts = position_windows(Corpus(small_pair["train_corpus"]).num_positions, WINDOW, WINDOW).starts.tolist()
    assert sorted(two[0] + two[1]) == sorted(two[2] + two[3]) == starts, "each epoch trains each window once"
    assert two[0] != two[2] and len(two[1]) == len(two[3]) == 1, "the epochs are shuffled and end on one window"
    assert ranks[1]["starts"][1] == ranks[1]["starts"][3] == [-1], "rank 1 gets no window at the end of an epoch"


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_give_the_weights_and_losses_of_one_process(runs):
    w1, w2 = weights(runs[1]), weights(runs[2])
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    print(f"max |Δw| 1 vs 2 processes: {diff:.3g}")
    assert diff < WEIGHT_ATOL
    (one,), (rank0, rank1) = records(runs[1], 1), records(runs[2], 2)
    for key in ("train/loss", "train/kl", "train/ce"):
        losses = [np.array([step[key] for step in r["train"]]) for r in (one, rank0, rank1)]
        print(key, "1 process:", losses[0], "max |Δ| 2 processes:", np.abs(losses[1] - losses[0]).max())
        np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5, err_msg=f"{key}: the loss of all windows")
        np.testing.assert_array_equal(losses[2], losses[1], err_msg=f"{key}: both ranks log the same value")
    assert len(one["val"]) == 2  # after each epoch
    for key in ("val/loss", "val/ce", "val/ppl"):
        np.testing.assert_allclose([v[key] for v in rank0["val"]], [v[key] for v in one["val"]], rtol=1e-5)
        np.testing.assert_array_equal([v[key] for v in rank1["val"]], [v[key] for v in rank0["val"]])


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("with_targets", [True, False])
def test_test_metrics_of_two_processes_are_those_of_one(runs, small_pair, tmp_path, with_targets):
    """`memdec test` on the training split: ranks get 86 and 64 positions; the metrics weigh positions, not ranks.
    Without test targets (no KL term: no test/loss) every rank still takes part in every metric's reduction."""
    pair = {"train_corpus": small_pair["train_corpus"], "train_targets": small_pair["train_targets"]}
    pair |= {"test_corpus": small_pair["train_corpus"]}
    pair |= {"test_targets": small_pair["train_targets"]} if with_targets else {}
    got = []
    for devices in (1, 2):
        root = tmp_path / f"devices{devices}"
        args = [f"--model.model={runs[1] / 'hf'}", *[f"--data.{k}={v}" for k, v in pair.items()]]
        args += [f"--data.window={WINDOW}", "--data.batch_size=2", "--data.max_support=16"]
        args += ["--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}"]
        args += ["--trainer.callbacks+=recording.RecordWindows", f"--trainer.callbacks.init_args.path={root}"]
        memdec("test", args, devices)
        got.append([json.loads((root / f"rank{r}.json").read_text())["test"][0] for r in range(devices)])
    (one,), (rank0, rank1) = got
    assert set(one) == {"test/loss", "test/kl", "test/ce", "test/ppl"} - (
        set() if with_targets else {"test/loss", "test/kl"}
    )
    for key in one:
        assert rank0[key] == pytest.approx(one[key], rel=1e-6) and rank1[key] == rank0[key], key


@pytest.mark.multiprocess
@pytest.mark.slow
def test_mid_epoch_resume_on_two_processes_is_exact(runs, small_pair, tmp_path):
    """Resumed from the 2-rank run's checkpoint after step 1 (mid-epoch; what a run killed then leaves): the rest of
    the straight run's windows, and bit-identical weights."""
    fit(small_pair, tmp_path, devices=2, ckpt_path=runs[2] / "ckpt" / "step1.ckpt")
    rest, straight = [r["starts"] for r in records(tmp_path, 2)], [r["starts"] for r in records(runs[2], 2)]
    assert rest == [r[1:] for r in straight]
    w_resumed, w_straight = weights(tmp_path), weights(runs[2])
    for name, value in w_straight.items():
        torch.testing.assert_close(w_resumed[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_checkpoint_the_final_step_between_validations(small_pair, tmp_path):
    """3 steps, a validation every 2, no per-step checkpoints: the final step's save is a collective on both ranks."""
    args = [a for a in fit_args(small_pair, tmp_path, BATCH) if a != "--checkpoint.every_n_train_steps=1"]
    memdec("fit", [*args, "--trainer.max_steps=3", "--trainer.val_check_interval=2"], devices=2)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == 3
    for name, value in weights(tmp_path).items():
        torch.testing.assert_close(last["state_dict"][f"decoder.{name}"], value, rtol=0, atol=0, msg=name)
