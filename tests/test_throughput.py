"""TrainingThroughput: the steady state's tokens/s and MFU, checked against a count of the batches' tokens over a
clock the test controls (never wall-clock time)."""

import itertools

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_training import TINY_CONFIG

from lightning_memdec.io.packaged_configs import load_config
from lightning_memdec.training.fit import lightning_cli
from lightning_memdec.training.throughput import TrainingThroughput, training_flops_per_token


class Ticks:
    """A clock that moves 0.5 s a read, recording the reads."""

    def __init__(self):
        self.reads = itertools.count(0.0, 0.5)
        self.times = []

    def __call__(self) -> float:
        self.times.append(next(self.reads))
        return self.times[-1]


def tiny_fit(tmp_path, pair, meter, steps: int, batch_size: int = 2, window: int = 32):
    config = load_config(
        "hardware/cpu.yaml",
        {
            "model": {"config": {**TINY_CONFIG, "n_positions": window}},
            "data": {"train_corpus": pair["train_corpus"], "train_targets": pair["train_targets"], "window": window,
                     "batch_size": batch_size},
            "trainer": {"max_steps": steps, "limit_val_batches": 0, "enable_progress_bar": False,
                        "default_root_dir": str(tmp_path / "run"), "log_every_n_steps": 1},
            "export": {"dirpath": str(tmp_path / "hf")},
            "checkpoint": {"save_top_k": 0, "save_last": False},
        },
    )  # fmt: skip
    cli = lightning_cli(config, run=False)  # what fit(config, callbacks=[meter]) runs, with the Trainer kept
    cli.trainer.callbacks.append(meter)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.trainer


def test_the_steady_state_rate_counts_the_tokens_after_the_warm_up_over_their_span(tmp_path, biomed_targets_pair):
    clock = Ticks()
    meter = TrainingThroughput(warmup_steps=2, log_every_n_steps=100, peak_flops=1e9, clock=clock)
    tiny_fit(tmp_path, biomed_targets_pair, meter, steps=6)
    # timed: steps 3..6, 2 windows of 32 tokens each; the clock read where timing starts and at the end only
    assert clock.times == [0.0, 0.5]
    assert meter.tokens_per_s == pytest.approx(4 * 2 * 32 / 0.5)
    params = (
        50257 * 32
        + 32 * 32
        + sum(  # wte, wpe, one block, ln_f (the LM head is tied to wte)
            [2 * 32, 32 * 96 + 96, 32 * 32 + 32, 2 * 32, 32 * 128 + 128, 128 * 32 + 32, 2 * 32]  # ... ln_f
        )
    )
    want_flops = 6 * params + 12 * 1 * 32 * 32
    assert training_flops_per_token(params, 1, 32, 32) == want_flops
    assert meter.mfu == pytest.approx(meter.tokens_per_s * want_flops / 1e9)


@pytest.mark.parametrize("tied", [True, False])
def test_model_flops_leave_out_a_padded_vocabulary_s_rows(tied):
    """pad_vocab_multiple's rows are computed but used by no token: MFU counts the model the tokenizer needs, the
    parameters of the same decoder unpadded (the export's), tied or not."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_memdec.training.throughput import model_params

    config = GPT2Config(vocab_size=1000, n_positions=32, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=tied)
    unpadded = sum(p.numel() for p in GPT2LMHeadModel(config).parameters())
    padded = GPT2LMHeadModel(config)
    padded.resize_token_embeddings(1024)
    assert sum(p.numel() for p in padded.parameters()) == unpadded + 24 * 16 * (1 if tied else 2)
    assert model_params(padded, 1000) == unpadded
    assert model_params(padded) == model_params(padded, 1024) == unpadded + 24 * 16 * (1 if tied else 2)


def test_spans_are_logged_every_n_steps(tmp_path, biomed_targets_pair):
    clock = Ticks()
    meter = TrainingThroughput(warmup_steps=1, log_every_n_steps=2, peak_flops=1e9, clock=clock)
    tiny_fit(tmp_path, biomed_targets_pair, meter, steps=5)
    # reads: start after step 1, a span ending at step 3 and one at step 5, the end of fit
    assert clock.times == [0.0, 0.5, 1.0, 1.5]
    assert meter.tokens_per_s == pytest.approx(4 * 2 * 32 / 1.5)
    # logged at the spans' ends only (steps 3 and 5), not again at the trainer's every-step logging in between,
    # each at the x of its batch's train/loss (Lightning's: the batches stepped before it, 0 for step 1's);
    # the last span: steps 4 and 5 (2 × 2 × 32 tokens) over 0.5 s
    (events,) = (tmp_path / "run").rglob("events.out.tfevents.*")
    scalars = EventAccumulator(str(events)).Reload()
    loss_steps = [e.step for e in scalars.Scalars("train/loss")]
    assert len(loss_steps) == 5  # one a step (log_every_n_steps 1): the i-th is global step i + 1's
    for tag, per_token in (("train/tokens_per_s", 1.0), ("train/mfu", meter.mfu / meter.tokens_per_s)):
        logged = [(e.step, e.value) for e in scalars.Scalars(tag)]
        assert [step for step, _ in logged] == [loss_steps[3 - 1], loss_steps[5 - 1]], tag
        assert logged[-1][1] == pytest.approx(2 * 2 * 32 / 0.5 * per_token, rel=1e-6), tag
    assert meter.logged["train/tokens_per_s"] == pytest.approx(2 * 2 * 32 / 0.5)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="warmup_steps and log_every_n_steps must be ≥ 1"):
        TrainingThroughput(warmup_steps=0)
    with pytest.raises(ValueError, match="peak_flops must be positive"):
        TrainingThroughput(peak_flops=0)


def test_filler_windows_are_not_counted_and_a_resumed_run_warms_up_again():
    """A padded last batch (data.pad_last_batch) holds masked fillers, start −1: computed, but no training tokens."""
    from types import SimpleNamespace

    import torch

    clock = Ticks()
    meter = TrainingThroughput(warmup_steps=1, log_every_n_steps=100, clock=clock)
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=50, loggers=[])
    decoder = torch.nn.Linear(2, 2)
    decoder.config = SimpleNamespace(num_hidden_layers=1, hidden_size=2)
    module = SimpleNamespace(device=torch.device("cpu"), decoder=decoder)
    batch = {"input_ids": torch.zeros(4, 8, dtype=torch.long), "start": torch.tensor([0, 8, -1, -1])}
    for first in (0, 100):  # a fresh run, then one resumed at step 100: its warm-up counts from there
        clock.times.clear()
        trainer.global_step = first
        meter.on_train_start(trainer, module)
        for step in (1, 2, 3):  # step 1 ends the warm-up; steps 2 and 3 are timed, 2 real windows of 8 tokens each
            trainer.global_step = first + step
            meter.on_train_batch_end(trainer, module, None, batch, step - 1)
        meter.on_train_end(trainer, module)
        assert len(clock.times) == 2 and meter.tokens_per_s == pytest.approx(2 * 2 * 8 / 0.5)


def test_validation_inside_fit_is_not_training_time():
    """Validation every few steps took 10 s a run: it must not count against the tokens trained (a fit validating
    every 5 steps was reported at 158.9 tokens/s where it trained 512)."""
    from types import SimpleNamespace

    import torch

    now = [0.0]
    meter = TrainingThroughput(warmup_steps=1, log_every_n_steps=2, clock=lambda: now[0])
    logged = {}
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.update(metrics))
    fit_loop = SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=0))
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=50, sanity_checking=False, loggers=[logger],
                              fit_loop=fit_loop)  # fmt: skip
    decoder = torch.nn.Linear(2, 2)
    decoder.config = SimpleNamespace(num_hidden_layers=1, hidden_size=2)
    module = SimpleNamespace(device=torch.device("cpu"), decoder=decoder)
    batch = {"input_ids": torch.zeros(2, 8, dtype=torch.long)}
    meter.on_validation_start(trainer, module)  # before timing starts: nothing to leave out
    now[0] += 10.0
    meter.on_validation_end(trainer, module)
    meter.on_train_start(trainer, module)
    for step in range(1, 6):  # 1 s of training a step; step 1 ends the warm-up, steps 2–5 are timed
        now[0] += 1.0
        trainer.global_step = step
        meter.on_train_batch_end(trainer, module, None, batch, step - 1)
        if step in (2, 4):  # a validation run inside the span of steps 2–3 and of steps 4–5
            meter.on_validation_start(trainer, module)
            now[0] += 10.0
            meter.on_validation_end(trainer, module)
    meter.on_train_end(trainer, module)
    assert meter.tokens_per_s == pytest.approx(4 * 16 / 4.0)
    assert logged["train/tokens_per_s"] == pytest.approx(2 * 16 / 2.0)


def test_the_packaged_config_adds_it_and_takes_a_peak_from_the_command_line(tmp_path, biomed_targets_pair):
    from test_training import TINY_DECODER, data_args

    args = [*TINY_DECODER, *data_args(biomed_targets_pair), "--trainer.accelerator", "cpu"]  # run=False: no subcommand
    args += ["--trainer.default_root_dir", str(tmp_path), "--config", "callbacks/throughput.yaml"]
    cli = lightning_cli([*args, "--trainer.callbacks.init_args.peak_flops", "989e12"], run=False)
    (meter,) = [c for c in cli.trainer.callbacks if isinstance(c, TrainingThroughput)]
    assert meter.warmup_steps == 10 and meter.peak_flops == 989e12


def stub_run(meter: TrainingThroughput, first: int, seconds: list[float], now: list[float]) -> None:
    """Drive ``meter`` as a Trainer does over ``len(seconds)`` steps from global step ``first`` (a resumed run:
    first > 0), step i taking ``seconds[i]`` on the clock ``now``, each batch 4 windows of 8 tokens."""
    from types import SimpleNamespace

    import torch

    trainer = SimpleNamespace(global_step=first, log_every_n_steps=50, loggers=[])
    decoder = torch.nn.Linear(2, 2)
    decoder.config = SimpleNamespace(num_hidden_layers=1, hidden_size=2)
    module = SimpleNamespace(device=torch.device("cpu"), decoder=decoder)
    meter.on_train_start(trainer, module)
    for step, spent in enumerate(seconds, 1):
        now[0] += spent
        trainer.global_step = first + step
        meter.on_train_batch_end(trainer, module, None, {"input_ids": torch.zeros(4, 8, dtype=torch.long)}, step - 1)
    now[0] += 0.1  # the end of fit, after the last step
    meter.on_train_end(trainer, module)


def test_a_run_resumed_at_step_100_leaves_out_its_own_first_warmup_steps():
    """A resumed run compiles again: its warm-up counts from the step it resumed at, not from step 0 (then it would
    be over at once and the 5 s compiling steps would be timed). Steps 1-3 of 10 take 5 s, the rest 0.5 s: timed
    from the end of step 3, 7 steps of 32 tokens over 7 × 0.5 s (+ the 0.1 s to the end of fit)."""
    now = [0.0]
    meter = TrainingThroughput(warmup_steps=3, log_every_n_steps=100, clock=lambda: now[0])
    stub_run(meter, 100, [5.0] * 3 + [0.5] * 7, now)
    assert meter.tokens_per_s == pytest.approx(7 * 32 / (7 * 0.5 + 0.1))


def test_a_fit_no_longer_than_its_warm_up_times_nothing():
    """A fit of exactly warmup_steps steps has no timed step: tokens_per_s and mfu stay None (as documented), not a
    rate of 0 tokens over the time to the end of fit."""
    now = [0.0]
    meter = TrainingThroughput(warmup_steps=3, log_every_n_steps=100, clock=lambda: now[0])
    stub_run(meter, 0, [1.0] * 3, now)
    assert meter.tokens_per_s is None and meter.mfu is None
    stub_run(meter, 0, [1.0] * 4, now)  # one step more is timed: the guard that the set-up can time at all
    assert meter.tokens_per_s == pytest.approx(32 / (1.0 + 0.1))  # step 4 and the time to the end of fit
