import json
import re
import shutil
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from lightning_memdec.hf.loading import load_causal_lm
from lightning_memdec.inference.sliding_window import corpus_gold_log_probs
from lightning_memdec.io.artifact_dirs import ArtifactError, Interrupted
from lightning_memdec.io.packaged_configs import load_config
from lightning_memdec.io.readers import Targets
from lightning_memdec.io.token_corpus import Corpus, position_windows, tokenize
from lightning_memdec.kernels.scoring import perplexity
from lightning_memdec.stages.settings import KNNTargets
from lightning_memdec.training.checkpoint_files import AtomicCheckpointIO
from lightning_memdec.training.datamodule import (
    PAD_WINDOW,
    EvenShardSampler,
    MemDecDataModule,
    WindowTargetsDataset,
    collate,
    pad_targets,
)
from lightning_memdec.training.fit import fit, lightning_cli
from lightning_memdec.training.lightning_module import (
    MemoryDecoderModule,
    lr_lambda,
    parameter_groups,
    warmup_steps,
)

REPO = Path(__file__).resolve().parents[1]
TINY_DECODER = [
    "--model.config",
    '{"model_type": "gpt2", "vocab_size": 50257, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2}',
]


def data_args(pair, window=64, batch_size=2):
    args = []
    for key, value in pair.items():
        args += [f"--data.{key}", value]
    return args + ["--data.window", str(window), "--data.batch_size", str(batch_size), "--data.max_support", "16"]


def padded(item: dict) -> dict:
    """One window's targets as the loss reads them: ``[W, support]``, padded as on the device."""
    return {k: v[0] for k, v in pad_targets(collate([item])).items()}


def test_dataset_aligns_tokens_targets_and_mask(biomed_targets_pair):
    pair = biomed_targets_pair
    ds = WindowTargetsDataset(pair["train_corpus"], pair["train_targets"], window=64, stride=48)
    corpus, targets = Corpus(pair["train_corpus"]), Targets(pair["train_targets"])
    win = position_windows(corpus.num_positions, 64, 48)
    assert len(ds) == len(win)
    for j in [0, 1, len(ds) - 1]:
        item, s = padded(ds[j]), int(win.starts[j])
        np.testing.assert_array_equal(item["input_ids"], corpus.tokens[s : s + 64])
        np.testing.assert_array_equal(item["labels"], corpus.tokens[s + 1 : s + 65])
        np.testing.assert_array_equal(item["loss_mask"], np.arange(64) >= win.score_from[j])
        for t in [0, 17, 63]:
            ids, probs = targets.row(s + t)
            n = len(ids)
            np.testing.assert_array_equal(item["target_ids"][t, :n], ids)
            np.testing.assert_allclose(item["target_probs"][t, :n], probs.astype(np.float32))
            assert float(item["target_probs"][t, n:].sum()) == 0.0
    filler = ds[PAD_WINDOW]
    assert not filler["loss_mask"].any() and int(filler["start"]) == -1


def test_support_cap_keeps_top_tokens_renormalised(biomed_targets_pair):
    pair = biomed_targets_pair
    ds = WindowTargetsDataset(pair["train_corpus"], pair["train_targets"], window=64, stride=64, max_support=2)
    csr = ds[3]
    assert csr["target_support"] == 2 and int(csr["target_counts"].max()) == 2  # only the kept entries travel
    assert csr["target_flat_ids"].numel() == int(csr["target_counts"].sum())
    item = padded(csr)
    assert item["target_ids"].shape[1] <= 2
    assert item["target_ids"].dtype == torch.int32 and item["target_probs"].dtype == torch.float16  # as stored
    # fp16 as stored: each row sums to 1 up to fp16 rounding of its (at most 2) entries
    np.testing.assert_allclose(item["target_probs"].float().sum(-1).numpy(), 1.0, atol=2e-3)
    ids, probs = Targets(pair["train_targets"]).row(3 * 64 + 5)
    assert item["target_ids"][5, 0] == ids[0]
    top2 = probs[:2].astype(np.float32)
    np.testing.assert_allclose(item["target_probs"][5, : len(top2)].float().numpy(), top2 / top2.sum(), rtol=1e-3)
    batch = pad_targets(collate([ds[0], ds[1]]))
    assert batch["target_ids"].shape[:2] == (2, 64) and batch["input_ids"].dtype == torch.long


def test_even_shard_sampler_covers_each_window_once():
    dataset = list(range(11))
    shards = [list(EvenShardSampler(dataset, num_replicas=3, rank=r, seed=1)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    real = sorted(i for s in shards for i in s if i != PAD_WINDOW)
    assert real == list(range(11))
    sampler = EvenShardSampler(dataset, num_replicas=1, rank=0, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    assert sorted(list(sampler)) == sorted(first) and list(sampler) != first


def test_padded_last_batches_have_one_shape_and_every_window_once(biomed_targets_pair):
    """data.pad_last_batch: each rank's share filled up to whole batches with masked fillers (one batch shape for a
    compiled decoder); every real window still once per epoch, across ranks; validation batches are not padded."""
    dataset = list(range(11))
    for ranks in (1, 3):
        shards = [list(EvenShardSampler(dataset, ranks, r, seed=1, batch_size=4)) for r in range(ranks)]
        assert {len(s) for s in shards} == {4 if ranks == 3 else 12}  # 11 → 12 = 3 batches; 11 → 3 ranks × 1 batch
        assert sorted(i for s in shards for i in s if i != PAD_WINDOW) == list(range(11))
    pair = biomed_targets_pair
    data = MemDecDataModule(pair["train_corpus"], pair["train_targets"], pair["val_corpus"], pair["val_targets"],
                            window=64, batch_size=3, pad_last_batch=True)  # fmt: skip
    data.setup("fit")
    assert len(data.train) % 3 and len(data.val) % 3  # both end on a partial batch unless padded
    batches = list(data.train_dataloader())
    assert {len(b["input_ids"]) for b in batches} == {3} and len(batches) == -(-len(data.train) // 3)
    starts = torch.cat([b["start"] for b in batches])
    masks = torch.cat([b["loss_mask"] for b in batches])
    assert int((starts >= 0).sum()) == len(data.train) and not masks[starts < 0].any()  # fillers train nothing
    assert len(list(data.val_dataloader())[-1]["input_ids"]) == len(data.val) % 3


def test_compile_without_padded_batches_is_warned(tmp_path, biomed_targets_pair):
    pair = biomed_targets_pair
    config = load_config(
        "hardware/cpu.yaml",
        {
            "model": {"config": TINY_CONFIG, "compile": True},
            "data": {"train_corpus": pair["train_corpus"], "train_targets": pair["train_targets"], "window": 64},
            "trainer": {"max_steps": 0, "limit_val_batches": 0, "default_root_dir": str(tmp_path)},
            "checkpoint": {"save_top_k": 0, "save_last": False},
        },
    )
    with pytest.warns(UserWarning, match="set data.pad_last_batch true"):
        fit(config)
    config["data"]["pad_last_batch"] = True
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*pad_last_batch")
        fit(config)


def test_mismatched_targets_are_refused(tmp_path, biomed_targets_pair):
    other = tokenize(["embedded:law/valid"], tmp_path / "law", "gpt2", max_tokens=3000)
    with pytest.raises(ArtifactError, match="targets .* were built for a corpus"):
        WindowTargetsDataset(other, biomed_targets_pair["train_targets"], window=64, stride=64)


def test_without_targets_windows_carry_no_support(biomed_targets_pair):
    ds = WindowTargetsDataset(biomed_targets_pair["train_corpus"], None, window=64, stride=64)
    item = padded(ds[1])
    assert float(item["target_probs"].sum()) == 0.0 and item["loss_mask"].all()
    np.testing.assert_array_equal(item["labels"][:-1], item["input_ids"][1:])


def test_lr_schedule_shapes():
    f = lr_lambda(total=100, warmup=10, schedule="cosine", min_ratio=0.1)
    assert f(0) < f(5) < f(9) <= 1.0
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    g = lr_lambda(total=100, warmup=0, schedule="linear", min_ratio=0.0)
    assert g(50) == pytest.approx(0.5)
    warm = lr_lambda(total=100, warmup=4, schedule="constant", min_ratio=0.0)
    assert [warm(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # the first step already trains
    for schedule in ("cosine", "linear"):  # past the planned steps (an estimate outlived) the rate stays at its floor
        h = lr_lambda(total=100, warmup=10, schedule=schedule, min_ratio=0.1)
        assert [h(s) for s in (100, 150, 200)] == pytest.approx([0.1, 0.1, 0.1])
    assert (warmup_steps(1, 100), warmup_steps(0.05, 100), warmup_steps(0, 100), warmup_steps(30, 100)) == (1, 5, 0, 30)


def test_weight_decay_spares_biases_and_norms():
    decoder = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1, n_head=2))
    decay, no_decay = parameter_groups(decoder, 0.1)
    named = {id(p): n for n, p in decoder.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    spared, decayed = ({named[id(p)] for p in group["params"]} for group in (no_decay, decay))
    assert {"transformer.h.0.ln_1.weight", "transformer.h.0.attn.c_attn.bias", "transformer.ln_f.bias"} <= spared
    assert all(n.endswith(".bias") or ".ln_" in n for n in spared)
    assert {"transformer.wte.weight", "transformer.h.0.mlp.c_fc.weight"} <= decayed and not spared & decayed
    assert len(spared | decayed) == len(named)


@pytest.mark.parametrize("speed", [[], ["--model.pad_vocab_multiple", "64", "--model.fused_adamw", "true"]])
def test_fast_dev_run_fit_and_export(tmp_path, biomed_targets_pair, speed):
    """Also with the speed options a config can set: the export is the tokenizer's 50,257 ids, not the 50,304."""
    root = tmp_path / "run"
    cli = lightning_cli(
        [
            "fit",
            *TINY_DECODER,
            *speed,
            *data_args(biomed_targets_pair),
            "--trainer.accelerator",
            "cpu",
            "--trainer.max_steps",
            "3",
            "--trainer.limit_val_batches",
            "2",
            "--trainer.val_check_interval",
            "3",
            "--trainer.default_root_dir",
            str(root),
            "--trainer.enable_progress_bar",
            "false",
            "--export.dirpath",
            str(root / "hf"),
        ]
    )
    metrics = cli.trainer.callback_metrics
    for name in ["train/loss", "train/kl", "train/ce", "val/loss", "val/kl", "val/ppl"]:
        assert name in metrics and torch.isfinite(metrics[name])
    assert float(metrics["val/ppl"]) == pytest.approx(float(torch.exp(metrics["val/ce"])), rel=1e-5)
    beta = cli.model.hparams.beta  # the logged parts add up to the objective, in validation as in training
    want = beta * float(metrics["val/kl"]) + (1 - beta) * float(metrics["val/ce"])
    assert float(metrics["val/loss"]) == pytest.approx(want, rel=1e-5)
    exported = AutoModelForCausalLM.from_pretrained(root / "hf")
    assert exported.config.vocab_size == exported.get_output_embeddings().weight.shape[0] == 50257
    meta = json.loads((root / "hf" / "meta.json").read_text())
    assert meta["global_step"] == 3 and meta["k"] == 32 and meta["tokenizer"]["name"] == "gpt2"
    assert (root / "hf" / "tokenizer.json").is_file()
    ids = torch.as_tensor(Corpus(biomed_targets_pair["val_corpus"]).window_ids(0, 32))[None]
    module = cli.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, module(ids))
    events = list(root.rglob("events.out.tfevents*"))
    assert events, "TensorBoard logs are written by default"


def test_resume_continues_step_count(tmp_path, biomed_targets_pair):
    root = tmp_path / "run"
    common = [
        *TINY_DECODER,
        *data_args(biomed_targets_pair),
        "--trainer.accelerator",
        "cpu",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.limit_val_batches",
        "0",
        "--checkpoint.dirpath",
        str(root / "ckpt"),
    ]
    lightning_cli(["fit", *common, "--trainer.max_steps", "2"])
    assert (root / "ckpt" / "last.ckpt").is_file()
    cli = lightning_cli(["fit", *common, "--trainer.max_steps", "4", "--ckpt_path", "last"])
    assert cli.trainer.global_step == 4
    ckpt = torch.load(root / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 4


def test_nan_loss_fails_fast_with_batch_position(biomed_targets_pair):
    module = MemoryDecoderModule(
        config={"model_type": "gpt2", "vocab_size": 50257, "n_positions": 64, "n_embd": 32, "n_layer": 1, "n_head": 2}
    )
    module.configure_model()
    with torch.no_grad():
        module.decoder.lm_head.weight.fill_(float("nan"))
    ds = WindowTargetsDataset(biomed_targets_pair["train_corpus"], biomed_targets_pair["train_targets"], 64, 64)
    batch = collate([ds[2], ds[5]])
    with pytest.raises(FloatingPointError, match=r"positions \[128, 320\]"):
        module.training_step(batch, 7)


def test_module_argument_errors():
    with pytest.raises(ValueError, match="exactly one of model"):
        MemoryDecoderModule()
    with pytest.raises(ValueError, match="beta must be in"):
        MemoryDecoderModule(model="gpt2", beta=1.5)
    with pytest.raises(ValueError, match="targets for both train and validation"):
        MemDecDataModule("a", "b", val_corpus="c")


@pytest.mark.parametrize("config", sorted(str(p.relative_to(REPO)) for p in (REPO / "conf").rglob("*.yaml")))
def test_every_config_parses(config, capsys, biomed_targets_pair):
    args = ["--config", str(REPO / config)]
    if "/model/" not in config and "/experiments/" not in config:
        args += TINY_DECODER
    if "/data/" not in config and "/experiments/" not in config:
        args += data_args(biomed_targets_pair)
    with pytest.raises(SystemExit) as exit_:
        lightning_cli(args + ["--print_config"], run=False)
    assert exit_.value.code in (0, None)
    assert "trainer:" in capsys.readouterr().out


def test_repeatable_list_flags():
    from lightning_memdec.cli import repeatable

    assert repeatable(["quickstart", "--base", "a", "--base", "b", "--budget.k", "3"]) == [
        "quickstart",
        "--base+",
        "a",
        "--base+",
        "b",
        "--budget.k",
        "3",
    ]
    assert repeatable(["evaluate", "--bases", "[a,b]"]) == ["evaluate", "--bases", "[a,b]"]
    assert repeatable(["evaluate", "--knn.datastore", "d"]) == ["evaluate", "--knn.datastore+", "d"]
    # several values after one flag; the next flag ends them
    assert repeatable(["tokenize", "--dataset.files", "a.parquet", "b.jsonl", "--out", "c", "--text", "t"]) == [
        "tokenize",
        "--dataset.files+",
        "a.parquet",
        "--dataset.files+",
        "b.jsonl",
        "--out",
        "c",
        "--text+",
        "t",
    ]
    assert repeatable(["build-targets", "--datastore", "d", "--index", "i"]) == [  # paths there, not lists
        "build-targets",
        "--datastore",
        "d",
        "--index",
        "i",
    ]


TINY_CONFIG = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 64, "n_embd": 32, "n_layer": 1, "n_head": 2}


def test_fit_from_python_and_separate_test_metrics(tmp_path, biomed_targets_pair):
    """train.fit(config) trains and exports; `memdec test` scores data.test_corpus as a direct computation does."""
    pair = biomed_targets_pair
    data = {"train_corpus": pair["train_corpus"], "val_corpus": pair["val_corpus"], "window": 64, "batch_size": 2}
    config = load_config(
        "hardware/cpu.yaml",
        "schedule/short.yaml",
        {
            "model": {"config": TINY_CONFIG, "beta": 0.0},
            "data": data,
            "trainer": {"max_steps": 2, "val_check_interval": 2, "limit_val_batches": 2, "enable_progress_bar": False},
            "export": {"dirpath": str(tmp_path / "hf")},
        },
        {"trainer": {"default_root_dir": str(tmp_path / "run"), "log_every_n_steps": 1}},
    )
    export = fit(config)
    assert export == tmp_path / "hf" and json.loads((export / "meta.json").read_text())["global_step"] == 2
    # trained on next tokens alone (no data.train_targets): no KL was computed, so none is logged (a 0 would read
    # as perfect imitation)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (tmp_path / "run").rglob("events.out.tfevents*")
    tags = set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert {"train/loss", "train/ce", "val/ce", "val/loss"} <= tags and not {"train/kl", "val/kl"} & tags

    test_args = ["test", "--model.model", str(export), "--model.beta", "0", "--data.train_corpus", pair["train_corpus"]]
    test_args += ["--data.window", "64", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
    test_args += ["--trainer.default_root_dir", str(tmp_path / "test")]
    with pytest.raises(ValueError, match="needs data.test_corpus"):
        lightning_cli(test_args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = lightning_cli([*test_args, "--data.test_corpus", pair["val_corpus"]])
    assert not [w for w in caught if "without --ckpt_path" in str(w.message)]  # an export fit wrote: as intended
    metrics = cli.trainer.callback_metrics
    assert not any(name.startswith("val/") for name in metrics) and "test/kl" not in metrics
    # reference: non-overlapping 64-token windows of the test corpus, every position scored once
    want = perplexity(corpus_gold_log_probs(load_causal_lm(export), Path(pair["val_corpus"]), 64, stride=64))
    assert float(metrics["test/ppl"]) == pytest.approx(want, rel=1e-4)
    assert float(metrics["test/loss"]) == pytest.approx(float(metrics["test/ce"]), rel=1e-6)
    # β > 0 without data.test_targets: no KL term, so no test/loss (it would be (1 − β)·CE); ce and ppl as before
    half = [*test_args, "--data.test_corpus", pair["val_corpus"], "--model.beta", "0.5"]
    half = lightning_cli([*half, "--data.train_targets", pair["train_targets"]])  # β > 0 trains on targets
    assert set(half.trainer.callback_metrics) == {"test/ce", "test/ppl"}
    assert float(half.trainer.callback_metrics["test/ppl"]) == pytest.approx(want, rel=1e-4)

    # a plain Hugging Face model (no meta.json of fit's export) is a run's starting point: scoring it says so
    plain = shutil.copytree(export, tmp_path / "plain")
    (plain / "meta.json").unlink()
    plain_args = [a if a != str(export) else str(plain) for a in test_args]
    with pytest.warns(UserWarning, match="memdec test without --ckpt_path scores the decoder as model.model"):
        lightning_cli([*plain_args, "--data.test_corpus", pair["val_corpus"]])


def test_fit_without_a_logger_trains_and_exports(tmp_path, biomed_targets_pair):
    """`--trainer.logger false`: the learning-rate monitor every fit carries stays idle (Lightning's raised
    "Cannot use LearningRateMonitor callback with Trainer that has no logger" before the first step)."""
    pair = biomed_targets_pair
    data = {"train_corpus": pair["train_corpus"], "train_targets": pair["train_targets"], "window": 64, "batch_size": 2}
    trainer = {"max_steps": 2, "limit_val_batches": 0, "enable_progress_bar": False, "logger": False}
    config = load_config(
        "hardware/cpu.yaml",
        "schedule/short.yaml",
        {"model": {"config": TINY_CONFIG}, "data": data, "trainer": trainer},
        {"export": {"dirpath": str(tmp_path / "hf")}},
        {"trainer": {"default_root_dir": str(tmp_path / "run")}},
    )
    assert json.loads((fit(config) / "meta.json").read_text())["global_step"] == 2
    assert not (tmp_path / "run" / "lightning_logs").exists()


@pytest.mark.parametrize(
    "extra, batch, stop",
    [
        ([], 2, "mid first epoch"),
        (["--trainer.max_epochs", "3"], 2, "mid first epoch"),
        (["--data.num_workers", "2"], 8, "mid second epoch"),
        (["--data.num_workers", "2"], 8, "end of first epoch"),
    ],
)
def test_a_resume_sees_exactly_the_windows_of_an_uninterrupted_run(tmp_path, biomed_targets_pair, extra, batch, stop):
    """Killed (checkpoint every step) and resumed: the same windows, in order. With ``max_epochs``, the LR schedule's
    length was estimated by building Lightning's train loader before the resume restored its state, and with loader
    workers the first iterator was made before the sampler knew the resumed epoch: either way the resumed epoch
    started the first epoch's window order again."""
    pair = biomed_targets_pair

    def run(root: Path, steps: int, resume: bool = False) -> list[int]:
        args = [
            "fit", *TINY_DECODER, *data_args(pair, window=32, batch_size=batch), "--data.stride", "32", *extra,
            "--trainer.accelerator", "cpu", "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
            "--checkpoint.dirpath", str(root / "ckpt"), "--checkpoint.every_n_train_steps", "1",
            "--trainer.callbacks+=recording.RecordWindows", f"--trainer.callbacks.init_args.path={root / 'seen'}",
        ]  # fmt: skip
        lightning_cli(args + (["--ckpt_path", "last"] if resume else []))
        return json.loads((root / "seen" / "rank0.json").read_text())["starts"]

    epoch = -(-len(WindowTargetsDataset(pair["train_corpus"], pair["train_targets"], 32, 32)) // batch)
    assert epoch > 6, "the test needs a resume point inside the first epoch"
    killed_at = {"mid first epoch": 3, "mid second epoch": epoch + 2, "end of first epoch": epoch}[stop]
    straight = run(tmp_path / "straight", killed_at + 3)
    first = run(tmp_path / "killed", killed_at)
    rest = run(tmp_path / "killed", killed_at + 3, resume=True)
    assert first + rest == straight and len(straight) == killed_at + 3


@pytest.mark.parametrize(
    "trainer",
    [
        {"max_epochs": 2},
        {"max_epochs": 3, "limit_train_batches": 0.5, "accumulate_grad_batches": 3},
        {"max_epochs": 3, "max_steps": 5, "limit_train_batches": 4},
        {"max_steps": 7},
    ],
)
def test_the_schedules_step_count_is_lightnings_estimate(tmp_path, biomed_targets_pair, trainer):
    """The count the LR schedule is built with, without Lightning's train loader, against Lightning's own estimate
    read once that loader exists (at the start of training)."""

    class Counted(Exception):
        pass

    class Compare(L.Callback):
        def on_train_start(self, trainer, pl_module):
            raise Counted(trainer.datamodule.stepping_batches(), trainer.estimated_stepping_batches)

    config = {
        "model": {"config": json.loads(TINY_DECODER[1])},
        "data": {**{k: biomed_targets_pair[k] for k in ("train_corpus", "train_targets")}, "window": 32,
                 "batch_size": 3, "pad_last_batch": True},
        "trainer": {"accelerator": "cpu", "limit_val_batches": 0, "enable_progress_bar": False, "max_steps": -1,
                    "max_epochs": -1, "default_root_dir": str(tmp_path / "run"), **trainer},
    }  # fmt: skip
    with pytest.raises(Counted) as counted:  # no need to train
        fit(config, callbacks=[Compare()])
    ours, lightnings = counted.value.args
    assert ours == lightnings


def resume_args(pair: dict, root: Path, targets: str | None = None) -> list[str]:
    """A fit as the README writes it: no checkpoint.dirpath, checkpoints in <root>/checkpoints; dropout on."""
    pair = {**pair, "train_targets": targets or pair["train_targets"]}
    return [
        "fit", *TINY_DECODER, *data_args(pair, window=32, batch_size=2), "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "6", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
        "--checkpoint.every_n_train_steps", "1",
    ]  # fmt: skip


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 6
    return ckpt["state_dict"]


def assert_resume_ends_as(straight: Path, pair: dict, stopped: Path, extra: list[str]) -> None:
    """``memdec fit ... --ckpt_path last`` on the stopped run ends at step 6 with the uninterrupted run's exact
    weights."""
    cli = lightning_cli([*resume_args(pair, stopped), *extra, "--ckpt_path", "last"])
    assert cli.trainer.global_step == 6
    want, got = final_weights(straight), final_weights(stopped)
    assert want.keys() == got.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)


def test_readme_resume_is_bit_identical_to_an_uninterrupted_run_with_dropout(tmp_path, biomed_targets_pair):
    """`memdec fit ... --ckpt_path last` after a kill at step 3 ends with the uninterrupted run's exact weights."""
    pair = biomed_targets_pair
    assert json.loads(TINY_DECODER[1]).get("resid_pdrop", 0.1) > 0  # GPT-2's default dropout is on
    straight = tmp_path / "straight"
    lightning_cli(resume_args(pair, straight))
    killed = tmp_path / "killed"
    with pytest.raises(RuntimeError, match="killed at step 3"):
        lightning_cli(
            [*resume_args(pair, killed), "--trainer.callbacks+=recording.KillAtStep", "--trainer.callbacks.step=3"]
        )
    assert (killed / "checkpoints" / "last.ckpt").is_file(), "checkpoints go where the README says"
    assert_resume_ends_as(straight, pair, killed, [])


def test_sigterm_saves_the_step_in_hand_exits_143_and_the_resume_is_bit_identical(tmp_path, biomed_targets_pair,
                                                                                   capsys):  # fmt: skip
    """A scheduler's SIGTERM during step 3 (of 0..5): Lightning's own stop exited 0 with the steps since the last
    checkpoint lost. Here the step is saved, the exit is 143 with the resume named, and the resume ends as an
    uninterrupted run does, weight for weight. No regular save comes between: every_n_train_steps is past the end."""
    pair, rare = biomed_targets_pair, ["--checkpoint.every_n_train_steps", "100"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    lightning_cli([*resume_args(pair, straight), *rare])
    sigterm = ["--trainer.callbacks+=recording.SigtermAtStep", "--trainer.callbacks.step=3"]
    with pytest.raises(Interrupted) as interrupted:
        lightning_cli([*resume_args(pair, stopped), *rare, *sigterm])
    assert interrupted.value.code == 143
    said = "training interrupted (SIGTERM) at step 4; step 4 is saved in"
    assert said in str(interrupted.value) and said in capsys.readouterr().err
    assert torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert_resume_ends_as(straight, pair, stopped, rare)


def test_a_sigterm_inside_an_accumulation_window_saves_no_half_step(tmp_path, biomed_targets_pair):
    """Two batches a step: SIGTERM as step 4's first batch starts stops the run after that batch, its gradients
    accumulated but no optimizer step taken. A save there would record step 3 with the loader one batch into the
    window and its gradients lost, and a resume would step on the second batch alone. Nothing is saved: the resume
    starts from the step-2 checkpoint and ends with an uninterrupted run's exact weights."""
    pair = biomed_targets_pair
    extra = ["--trainer.accumulate_grad_batches", "2", "--checkpoint.every_n_train_steps", "2"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    lightning_cli([*resume_args(pair, straight), *extra])
    sigterm = ["--trainer.callbacks+=recording.SigtermAtStep", "--trainer.callbacks.step=3"]
    with pytest.raises(Interrupted) as interrupted:
        lightning_cli([*resume_args(pair, stopped), *extra, *sigterm])
    assert interrupted.value.code == 143 and "the newest checkpoint is" in str(interrupted.value)
    assert torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert_resume_ends_as(straight, pair, stopped, extra)


def test_resume_last_without_a_checkpoint_is_an_error(tmp_path, biomed_targets_pair):
    with pytest.raises(FileNotFoundError, match="no last.ckpt in .*checkpoints"):
        lightning_cli([*resume_args(biomed_targets_pair, tmp_path / "never-run"), "--ckpt_path", "last"])
    config = {"model": {"config": json.loads(TINY_DECODER[1])}, "data": {"train_corpus": "x"}}
    config["trainer"] = {"default_root_dir": str(tmp_path / "never-run")}
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        fit(config, ckpt_path="last")


def test_a_missing_checkpoint_file_is_an_error_before_any_work(tmp_path, biomed_targets_pair):
    root = tmp_path / "typo"
    with pytest.raises(FileNotFoundError, match=r"--ckpt_path .*lst.ckpt: no such file"):
        lightning_cli([*resume_args(biomed_targets_pair, root), "--ckpt_path", str(tmp_path / "lst.ckpt")])
    assert not root.exists()  # nothing loaded, no lightning_logs/version_0 left behind


def test_the_final_step_is_checkpointed_between_validations(tmp_path, biomed_targets_pair):
    """5 steps, a validation every 2: the checkpoints of steps 2 and 4, then the final step's, which last.ckpt holds
    (the decoder fit exports), so `memdec test --ckpt_path last` scores the trained weights."""
    args = resume_args(biomed_targets_pair, tmp_path)
    every = args.index("--checkpoint.every_n_train_steps")
    args = [*args[:every], *args[every + 2 :], "--trainer.max_steps", "5"]  # checkpoints at validations only
    cli = lightning_cli([*args, "--export.dirpath", str(tmp_path / "hf")])
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == 5 and (tmp_path / "checkpoints" / "step5.ckpt").is_file()
    exported = load_causal_lm(tmp_path / "hf").state_dict()
    for name, value in cli.model.decoder.state_dict().items():
        torch.testing.assert_close(last["state_dict"][f"decoder.{name}"], value, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(exported[name], value, rtol=0, atol=0, msg=name)


def test_a_monitored_top_k_ranks_validated_steps_only_and_the_final_step_goes_to_last_ckpt(
    tmp_path, biomed_targets_pair
):
    """checkpoint.monitor val/loss, every checkpoint kept (save_top_k -1), 5 steps, a validation every 2: the ranked
    step files are the validated steps' (2 and 4), each with its own validation's score. The final step 5 has no
    score of its own (val/loss is still step 4's): it is saved as last.ckpt only, never ranked by a stale score."""
    args = resume_args(biomed_targets_pair, tmp_path)
    every = args.index("--checkpoint.every_n_train_steps")
    # without the subcommand (run=False) and every_n_train_steps: checkpoints at validations only
    args = [*args[1:every], *args[every + 2 :], "--trainer.max_steps", "5"]
    scores = {}  # the validated steps' checkpoint names: their val/loss

    class ValLoss(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                scores[f"step{trainer.global_step}.ckpt"] = float(trainer.callback_metrics["val/loss"])

    cli = lightning_cli([*args, "--checkpoint.monitor", "val/loss", "--checkpoint.save_top_k", "-1"], run=False)
    cli.trainer.callbacks.append(ValLoss())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert sorted(scores) == ["step2.ckpt", "step4.ckpt"]  # the validated steps
    files = {p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")}
    assert files == {*scores, "last.ckpt"}
    ranked = {Path(path).name: float(score) for path, score in cli.trainer.checkpoint_callback.best_k_models.items()}
    assert ranked == pytest.approx(scores)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == 5


def test_resume_with_other_targets_is_refused(tmp_path, biomed_targets_pair, biomed_datastore, biomed_index):
    from lightning_memdec.stages.targets import build_targets

    pair = biomed_targets_pair
    other = build_targets(biomed_datastore, biomed_index, tmp_path / "t-other", knn=KNNTargets(k=8, temperature=1.0))
    root = tmp_path / "run"
    lightning_cli([*resume_args(pair, root), "--trainer.max_steps", "2"])
    with pytest.raises(ValueError, match="resume with the run's own data"):
        lightning_cli([*resume_args(pair, root, targets=str(other)), "--ckpt_path", "last"])


@pytest.mark.parametrize(
    ("changed", "named"),
    [
        (["--data.seed", "1"], "seed: 0 there, 1 here"),
        (["--data.window", "24"], "window: 32 there, 24 here"),
        (["--data.stride", "16"], "stride: 32 there, 16 here"),
        (["--data.max_support", "2"], "max_support: 16 there, 2 here"),
        (["--model.beta", "0.9"], "model.beta: 0.5 there, 0.9 here"),
        (["--model.learning_rate", "0.05"], "model.learning_rate: 0.0005 there, 0.05 here"),
        (["--model.lr_schedule", "linear"], "model.lr_schedule: 'cosine' there, 'linear' here"),
        (["--model.betas", "[0.9, 0.99]"], "model.betas: "),
    ],
)
def test_a_resume_with_other_data_or_training_settings_is_refused_naming_them(tmp_path, biomed_targets_pair, changed,
                                                                             named):  # fmt: skip
    """Another seed or window trained some windows of the epoch twice and others never, other pruning other targets;
    another β trains on with another objective, and a learning rate changed there is not applied (the optimiser's
    state comes back) while the export would record it. Each was accepted."""
    root = tmp_path / "run"
    lightning_cli([*resume_args(biomed_targets_pair, root), "--trainer.max_steps", "2"])
    with pytest.raises(ValueError, match=re.escape(named)):
        lightning_cli([*resume_args(biomed_targets_pair, root), *changed, "--ckpt_path", "last"])


def test_validating_a_checkpoint_may_use_other_windows_and_settings(tmp_path, biomed_targets_pair):
    """Only a resumed fit continues the checkpoint's run: `memdec validate --ckpt_path` at another window or β
    evaluates the weights as asked."""
    root = tmp_path / "run"
    lightning_cli([*resume_args(biomed_targets_pair, root), "--trainer.max_steps", "2"])
    args = ["validate", *resume_args(biomed_targets_pair, root)[1:]]
    cli = lightning_cli([*args, "--data.window", "24", "--model.beta", "0.9", "--ckpt_path", "last"])
    assert cli.datamodule.hparams.window == 24 and cli.model.hparams.beta == 0.9


def test_a_resume_may_change_what_the_steps_do_not_depend_on(tmp_path, biomed_targets_pair):
    """The loss kernel and fused AdamW give the same steps: a resume with them changed goes on."""
    root = tmp_path / "run"
    lightning_cli([*resume_args(biomed_targets_pair, root), "--trainer.max_steps", "2"])
    cli = lightning_cli([*resume_args(biomed_targets_pair, root), "--trainer.max_steps", "3", "--model.loss_kernel",
                         "rows", "--model.fused_adamw", "false", "--ckpt_path", "last"])  # fmt: skip
    assert cli.trainer.global_step == 3


def test_fit_refuses_a_decoder_of_another_tokenizer(tmp_path, biomed_targets_pair):
    """A decoder saved with GPT-NeoX's tokenizer has enough output ids for GPT-2 data, but other ids: refused."""
    from conftest import save_tiny

    decoder = save_tiny(tmp_path / "neox-decoder", vocab=50304, tokenizer="gpt-neox-20b")
    args = resume_args(biomed_targets_pair, tmp_path / "run")
    args = [a for a in args if a not in TINY_DECODER] + ["--model.model", str(decoder), "--trainer.max_steps", "1"]
    with pytest.raises(ArtifactError, match=rf"decoder {decoder} uses tokenizer .*uses gpt2"):
        lightning_cli(args)
    assert not (tmp_path / "run" / "checkpoints").exists()


def logged_steps(version_dir: Path, tag: str = "train/loss") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for events in sorted(version_dir.glob("events.out.tfevents*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        steps += [event.step for event in accumulator.Scalars(tag)] if tag in accumulator.Tags()["scalars"] else []
    return sorted(steps)


def test_resume_past_a_truncated_last_checkpoint_logs_on_into_the_same_version(tmp_path, biomed_targets_pair, caplog):
    """A kill while last.ckpt was being written: `--ckpt_path last` resumes from the newest whole checkpoint (the
    same step here), ends with the uninterrupted run's weights, and its curves continue in version_0."""
    pair = biomed_targets_pair
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    lightning_cli([*resume_args(pair, straight), "--trainer.log_every_n_steps", "1"])
    with pytest.raises(RuntimeError, match="killed at step 3"):
        kill = ["--trainer.callbacks+=recording.KillAtStep", "--trainer.callbacks.step=3"]
        lightning_cli([*resume_args(pair, killed), "--trainer.log_every_n_steps", "1", *kill])
    last = killed / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with caplog.at_level("WARNING"):
        cli = lightning_cli([*resume_args(pair, killed), "--trainer.log_every_n_steps", "1", "--ckpt_path", "last"])
    assert f"{last} is not a whole checkpoint" in caplog.text
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO), "checkpoints are saved atomically"
    assert cli.trainer.global_step == 6
    want, got = final_weights(straight), final_weights(killed)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)
    logs = killed / "lightning_logs"
    assert sorted(p.name for p in logs.iterdir()) == ["version_0"], "the resume logs into the killed run's version"
    assert logged_steps(logs / "version_0")[-1] == logged_steps(straight / "lightning_logs" / "version_0")[-1] == 5


def test_resume_from_no_whole_checkpoint_is_an_error_before_any_work(tmp_path, biomed_targets_pair):
    root = tmp_path / "run"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ValueError, match=r"no checkpoint in .*checkpoints is whole \(last.ckpt: not a whole"):
        lightning_cli([*resume_args(biomed_targets_pair, root), "--ckpt_path", "last"])
    assert not (root / "lightning_logs").exists()
    with pytest.raises(ValueError, match=r"--ckpt_path .*last.ckpt is not a whole checkpoint"):
        lightning_cli([*resume_args(biomed_targets_pair, root), "--ckpt_path", str(root / "checkpoints" / "last.ckpt")])


def test_packaged_groups_run_on_a_small_corpus_from_the_working_directory(tmp_path, biomed_targets_pair, monkeypatch):
    """logger/tensorboard.yaml without a schedule (its save_dir interpolates trainer.default_root_dir, '.' unless
    set), and schedule/short.yaml (a validation every 50 steps) on a corpus of fewer batches than that."""
    monkeypatch.chdir(tmp_path)
    pair = biomed_targets_pair
    base = ["fit", *TINY_DECODER, *data_args(pair), "--config", "hardware/cpu.yaml", "--trainer.limit_val_batches", "1"]
    base += ["--trainer.enable_progress_bar", "false"]
    lightning_cli([*base, "--config", "logger/tensorboard.yaml", "--trainer.max_steps", "2"])
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and list(
        tmp_path.glob("lightning_logs/version_0/events*")
    )
    epoch = len(WindowTargetsDataset(pair["train_corpus"], pair["train_targets"], 64, 64)) // 2
    assert epoch < 50, "the test needs an epoch shorter than short.yaml's validation interval"
    cli = lightning_cli([*base, "--config", "schedule/short.yaml", "--trainer.max_steps", str(epoch + 2)])
    assert cli.trainer.global_step == epoch + 2 and cli.trainer.current_epoch >= 1  # into the second epoch


def test_a_callback_monitoring_validation_without_validation_data_is_refused_before_training(
    tmp_path, biomed_targets_pair
):
    pair = {k: v for k, v in biomed_targets_pair.items() if k in ("train_corpus", "train_targets")}
    args = ["fit", *TINY_DECODER, *data_args(pair), "--trainer.accelerator", "cpu", "--trainer.max_steps", "2"]
    args += ["--config", "callbacks/early_stopping.yaml", "--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(ValueError, match=r"EarlyStopping monitors val/ce, but this run has no validation data"):
        lightning_cli(args)
    assert not (tmp_path / "checkpoints").exists()


def test_a_checkpoint_monitoring_val_loss_in_a_run_that_never_validates_is_refused_before_training(
    tmp_path, biomed_targets_pair
):
    """Validation data given but trainer.limit_val_batches 0: no validation runs, so val/loss is never logged and a
    checkpoint ranked by it would fail after the first epoch; refused before any work, as without validation data."""
    args = ["fit", *TINY_DECODER, *data_args(biomed_targets_pair), "--trainer.accelerator", "cpu"]
    args += ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--checkpoint.monitor", "val/loss"]
    args += ["--checkpoint.save_top_k", "1", "--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(ValueError, match=r"RunCheckpoint monitors val/loss, but this run has no validation data"):
        lightning_cli(args)
    assert not (tmp_path / "checkpoints").exists()
