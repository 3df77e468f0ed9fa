"""The learned per-token λ: the mixture it gives, generation with the decoder skipped, its artefact and its training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import save_tiny

from lightning_memdec.apps.router_training import (
    DOMAIN_WEIGHTS,
    HELD_OUT,
    RouterData,
    check_general_tolerance,
    fit_within_general_budget,
    held_out_ppls,
    train_router,
)
from lightning_memdec.evaluation.settings import EvaluateMixing, Scoring
from lightning_memdec.inference.interpolated_lm import InterpolatedLM
from lightning_memdec.inference.router import Router, router_scorer
from lightning_memdec.inference.router_artifact import load_router, router_meta, save_router_weights
from lightning_memdec.io.artifact_dirs import ArtifactError, publish, start_work_dir
from lightning_memdec.io.embedded import load_tokenizer
from lightning_memdec.io.tokenizer_identity import tokenizer_info
from lightning_memdec.kernels.scoring import mix_log_probs, sweep_lambda


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_gpt2):
    root = tmp_path_factory.mktemp("router-models")
    return {"base": tiny_gpt2, "memdec": save_tiny(root / "memdec", seed=1), "other": save_tiny(root / "other", seed=2)}


def spread_router(
    seed: int = 0, threshold: float = 0.0, hidden: int = 32, scale: float = 20.0, width: int = 8
) -> Router:
    """A random router whose λ varies a lot between positions (a freshly initialised one stays near 0.5)."""
    torch.manual_seed(seed)
    router = Router(hidden, width, threshold)
    with torch.no_grad():
        router.net[-1].weight.mul_(scale)
    return router.eval()


def direct_lambda(router: Router, hidden: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """λ written out: features (hidden, entropy, max log-prob), standardised, the MLP, sigmoid, the threshold."""
    log_p = torch.log_softmax(base_logits.double(), -1)
    entropy = -(log_p.exp() * log_p).sum(-1, keepdim=True)
    feats = torch.cat([hidden.double(), entropy, log_p.max(-1, keepdim=True).values], -1).float()
    z = (feats - router.feature_mean) / router.feature_std
    lam = torch.sigmoid(router.net[2](torch.nn.functional.gelu(router.net[0](z))))[..., 0].double()
    return torch.where(lam < router.threshold, torch.zeros_like(lam), lam)


def direct_mixture(base_logits, memdec_logits, lam):
    p_base = torch.softmax(base_logits.double(), -1)
    p_mem = torch.softmax(memdec_logits.double(), -1)
    return torch.log((1 - lam[..., None]) * p_base + lam[..., None] * p_mem)


def test_per_position_mixture_equals_direct_computation():
    torch.manual_seed(0)
    base, other = torch.log_softmax(torch.randn(2, 5, 7, dtype=torch.float64), -1), torch.randn(2, 5, 7)
    other = torch.log_softmax(other.double(), -1)
    lam = torch.rand(2, 5, 1, dtype=torch.float64)
    lam[0, 1] = 0.0
    lam[1, 2] = 1.0
    expected = torch.log((1 - lam) * base.exp() + lam * other.exp())
    torch.testing.assert_close(mix_log_probs(base, other, lam), expected)
    nan_other = other.clone()
    nan_other[0, 1] = float("nan")  # a skipped decoder's value must not leak where λ = 0
    assert torch.equal(mix_log_probs(base, nan_other, lam)[0, 1], base[0, 1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mix_log_probs(base, other, lam + 1.0)


def test_interpolated_lm_with_router_equals_direct_mixture(pair):
    router = spread_router()
    lm = InterpolatedLM(str(pair["base"]), str(pair["memdec"]), 0.3, router=router)
    ids = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = lm(ids, use_cache=False).logits
        b = lm.base(ids, output_hidden_states=True)
        expected = direct_mixture(b.logits, lm.memdec(ids).logits, direct_lambda(router, b.hidden_states[-1], b.logits))
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)


def test_router_scorer_equals_direct_computation_on_the_scored_columns(pair):
    """Head from the first scored column on, one-pass entropy and max log-prob: the gold log-probs, features and λ
    of a full float64 log-softmax over every column (unscored columns hold zeros)."""
    router = spread_router(threshold=0.45)
    base = InterpolatedLM(str(pair["base"]), str(pair["memdec"]), 0.3).base
    ids = torch.randint(0, 50257, (3, 16), generator=torch.Generator().manual_seed(3))
    labels = torch.randint(0, 50257, (3, 16), generator=torch.Generator().manual_seed(4))
    labels[:, :5] = -100  # a window's context prefix
    labels[1, 5] = -100  # one more unscored position in a scored column
    with torch.no_grad():
        got = router_scorer(base, router, 50257, features=True)(ids, labels)
        out = base(ids, output_hidden_states=True)
        log_p = torch.log_softmax(out.logits.double(), -1)
        gold = log_p.gather(-1, labels.clamp(min=0)[..., None])[..., 0].masked_fill(labels == -100, 0.0)
        entropy = -(log_p.exp() * log_p).sum(-1, keepdim=True)
        feats = torch.cat([out.hidden_states[-1].double(), entropy, log_p.max(-1, keepdim=True).values], -1)
        lam = direct_lambda(router, out.hidden_states[-1], out.logits)
    torch.testing.assert_close(got["base"][:, 5:].double(), gold[:, 5:], atol=2e-5, rtol=0)
    torch.testing.assert_close(got["features"][:, 5:].double(), feats[:, 5:], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got["router_lambda"][:, 5:].double(), lam[:, 5:], atol=1e-5, rtol=0)
    assert (got["router_lambda"][:, 5:] == 0).any() and (got["router_lambda"][:, 5:] > 0).any()
    for name in ("base", "features", "router_lambda"):
        assert not got[name][:, :5].any(), name


def reference_greedy(lm, router, prompt: torch.Tensor, steps: int):
    """Greedy decoding with full forward passes of both models at every step (no cache, no skipping), λ forced
    to 0 under the threshold; returns the tokens and each step's λ."""
    ids, lambdas = prompt, []
    with torch.no_grad():
        for _ in range(steps):
            b = lm.base(ids, output_hidden_states=True)
            lam = direct_lambda(router, b.hidden_states[-1][:, -1], b.logits[:, -1])
            mixed = direct_mixture(b.logits[:, -1], lm.memdec(ids).logits[:, -1], lam)
            ids = torch.cat([ids, mixed.argmax(-1, keepdim=True)], 1)
            lambdas.append(lam)
    return ids[:, prompt.shape[1] :], torch.stack(lambdas, 1)


def planted_threshold(lm, router, prompt, steps) -> tuple[torch.Tensor, torch.Tensor]:
    """A threshold under which some steps fall and others not, each skip run followed by a decoder call (so the
    decoder catches up on pending tokens); returns the reference tokens and λs at it."""
    _, free = reference_greedy(lm, router, prompt, steps)
    for quantile in (0.5, 0.3, 0.7, 0.4, 0.6):
        router.threshold = float(free.quantile(quantile))
        tokens, lambdas = reference_greedy(lm, router, prompt, steps)
        zero = (lambdas[0] == 0).tolist()
        caught_up = any(zero[i] and not zero[i + 1] for i in range(steps - 1))
        if 2 <= sum(zero) <= steps - 3 and caught_up:
            return tokens, lambdas
    raise AssertionError(f"no planted threshold skips some steps and not others: {free}")


def test_generation_skipping_the_decoder_equals_full_passes(pair):
    router = spread_router(seed=4, scale=5.0)
    lm = InterpolatedLM(str(pair["base"]), str(pair["memdec"]), 0.3, router=router)
    prompt = torch.randint(0, 50257, (1, 6), generator=torch.Generator().manual_seed(1))
    steps = 16
    tokens, lambdas = planted_threshold(lm, router, prompt, steps)
    calls = []
    hook = lm.memdec.register_forward_pre_hook(
        lambda m, a, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        generated = lm.generate(prompt, max_new_tokens=steps, do_sample=False)[:, prompt.shape[1] :]
    finally:
        hook.remove()
    assert torch.equal(generated, tokens)
    ran = (lambdas[0] != 0).nonzero()[:, 0].tolist()
    assert len(calls) == len(ran) < steps  # the decoder ran exactly at the steps whose λ is not 0
    # each call took every token since the previous one (pending ones at once): the decoder's cache caught up
    assert sum(calls) == prompt.shape[1] + ran[-1] and max(calls[1:]) > 1


def saved_router(tmp_path, pair, router: Router, tokenizer="gpt2", name="router"):
    out = tmp_path / name
    tok = tokenizer_info(load_tokenizer(tokenizer), tokenizer)
    work = start_work_dir(out, {"test": name}, overwrite=False)
    save_router_weights(router, work)
    return publish(work, out, router_meta(router, str(pair["base"]), str(pair["memdec"]), tok, {"test": True}))


def test_router_artefact_round_trip(tmp_path, pair):
    router = spread_router(threshold=0.4)
    with torch.no_grad():
        router.set_standardisation(torch.randn(50, 34) * 3 + 1)
    path = saved_router(tmp_path, pair, router)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["kind"] == "router" and meta["threshold"] == 0.4 and meta["hidden_size"] == 32
    assert meta["base"]["model_sha256"] and meta["memdec"]["model_sha256"] != meta["base"]["model_sha256"]
    loaded = load_router(path, str(pair["base"]), str(pair["memdec"]))
    features = torch.randn(3, 7, 34)
    assert torch.equal(loaded.routed(features), router.routed(features))
    assert loaded.threshold == 0.4
    lm = InterpolatedLM(str(pair["base"]), str(pair["memdec"]), 0.3, router=path)
    ids = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(2))
    direct = InterpolatedLM(str(pair["base"]), str(pair["memdec"]), 0.3, router=router)
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, direct(ids).logits)


def test_linear_router_is_logistic_in_the_standardised_features_and_round_trips(tmp_path, pair):
    """width 0: no hidden layer, λ = sigmoid(w · z + b) with z the standardised features."""
    torch.manual_seed(3)
    router = Router(32, 0, threshold=0.2)
    with torch.no_grad():
        router.set_standardisation(torch.randn(50, 34) * 2 - 1)
        router.net[0].weight.mul_(10.0)
    features = torch.randn(4, 6, 34)
    z = (features.double() - router.feature_mean.double()) / router.feature_std.double()
    lam = torch.sigmoid(z @ router.net[0].weight.double()[0] + router.net[0].bias.double())
    torch.testing.assert_close(router(features).double(), lam, atol=1e-6, rtol=1e-5)
    expected = torch.where(lam < 0.2, torch.zeros_like(lam), lam)
    torch.testing.assert_close(router.routed(features).double(), expected, atol=1e-6, rtol=1e-5)
    loaded = load_router(saved_router(tmp_path, pair, router.eval()), str(pair["base"]), str(pair["memdec"]))
    assert torch.equal(loaded.routed(features), router.routed(features))


def test_router_of_another_base_decoder_or_tokenizer_is_refused(tmp_path, pair):
    path = saved_router(tmp_path, pair, spread_router())
    with pytest.raises(ArtifactError, match="fitted for base .* fit-router"):
        InterpolatedLM(str(pair["other"]), str(pair["memdec"]), 0.3, router=path)
    with pytest.raises(ArtifactError, match="fitted for memdec"):
        InterpolatedLM(str(pair["base"]), str(pair["other"]), 0.3, router=path)
    neox = saved_router(tmp_path, pair, spread_router(), tokenizer="gpt-neox-20b", name="neox")
    with pytest.raises(ArtifactError, match="fitted with tokenizer"):
        load_router(
            neox, str(pair["base"]), str(pair["memdec"]), tokenizer_info(load_tokenizer("gpt2"), "gpt2")["fingerprint"]
        )
    with pytest.raises(ValueError, match="hidden states of size 16"):
        InterpolatedLM(str(pair["base"]), str(pair["memdec"]), 0.3, router=Router(16))


def planted_kind(rng, n: int, flag: float, memdec_better: bool, hidden: int = 8) -> RouterData:
    """Positions of one kind of document: a feature flags the kind; the decoder is much better on one kind
    (best λ ≈ 0.9) and worse on the other (best λ ≈ 0.1), as domain and general text."""
    features = rng.normal(size=(n, hidden + 2)).astype(np.float32)
    features[:, 0] = flag + 0.3 * rng.normal(size=n)
    good, bad = np.log(rng.uniform(0.2, 0.6, n)), np.log(rng.uniform(0.005, 0.03, n))
    base, memdec = (bad, good) if memdec_better else (good, bad)
    return RouterData(features, base, memdec)


def test_fitted_router_beats_the_best_fixed_lambda_on_held_out_planted_text():
    rng = np.random.default_rng(0)
    kinds = [planted_kind(rng, 3000, 1.0, True), planted_kind(rng, 3000, -1.0, False)]
    router, info = train_router(kinds, width=16, threshold=0.0)
    held = [planted_kind(rng, 1000, 1.0, True), planted_kind(rng, 1000, -1.0, False)]
    base = np.concatenate([h.base for h in held])
    memdec = np.concatenate([h.memdec for h in held])
    best_lambda, ppls = sweep_lambda(base, memdec)
    with torch.no_grad():
        lam = router.routed(torch.as_tensor(np.concatenate([h.features for h in held]))).double()
    routed = -mix_log_probs(torch.as_tensor(base), torch.as_tensor(memdec), lam).mean().item()
    fixed = float(np.log(min(ppls)))
    assert 0.2 < best_lambda < 0.8
    assert routed < fixed - 0.3, (routed, fixed)  # a large margin: a fixed λ pays dearly on one kind or the other
    assert lam[:1000].mean() > 0.8 and lam[1000:].mean() < 0.2
    assert info["epochs"] >= 1


def test_training_a_router_leaves_the_process_as_it_was_and_repeats_under_its_seed(monkeypatch):
    """fit_router from Python, then evaluation or generation in the same process: the caller's random state, the
    deterministic-algorithms flag and the environment are as before (seed_everything and a deterministic Trainer
    changed them for the whole process), and the same seed trains the same router."""
    import os

    for name in ("PL_GLOBAL_SEED", "CUBLAS_WORKSPACE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    rng = np.random.default_rng(0)
    kinds = [planted_kind(rng, 300, 1.0, True), planted_kind(rng, 300, -1.0, False)]
    torch.manual_seed(12345)
    state, environment = torch.random.get_rng_state(), dict(os.environ)
    deterministic = torch.are_deterministic_algorithms_enabled()
    first, _ = train_router(kinds, width=4, threshold=0.0, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state) and dict(os.environ) == environment
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    again, _ = train_router(kinds, width=4, threshold=0.0, seed=7)
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_general_budget_keeps_the_best_domain_router_within_the_tolerance():
    """Domain and general positions that a feature separates only in part: weighting the domain more lowers held-out
    domain perplexity and raises general; the kept router is the lowest-domain one within the tolerance, checked
    against each candidate's held-out figures computed here directly."""
    rng = np.random.default_rng(1)

    def overlapping(n, flag, memdec_better):
        kind = planted_kind(rng, n, flag, memdec_better)
        kind.features[:, 0] = flag + rng.normal(size=n)  # the kinds overlap: no router routes them apart exactly
        return kind

    kinds = [overlapping(1000, 0.5, True), overlapping(1000, -0.5, False)]
    weights = (0.5, 0.95)
    router, info = fit_within_general_budget(kinds, width=0, threshold=0.0, tolerance=1.0, weights=weights)
    candidates = info["candidates"]
    assert [c["domain_weight"] for c in candidates] == list(weights)
    direct = []
    for weight in weights:  # the same seeded training, held-out figures computed here
        trained, _ = train_router(kinds, 0, 0.0, weight)
        domain, general = held_out_ppls(trained, kinds[0]), held_out_ppls(trained, kinds[1])
        direct.append((domain["router_ppl"], general["router_ppl"] / general["base_ppl"] - 1))
    for c, (domain_ppl, rise) in zip(candidates, direct):
        assert c["held_out_domain_ppl"] == pytest.approx(domain_ppl)
        assert c["held_out_general_rise"] == pytest.approx(rise)
    assert direct[1][0] < direct[0][0] and direct[1][1] > direct[0][1]  # more domain weight: domain down, general up
    within = [i for i, (_, rise) in enumerate(direct) if rise <= 1.0]
    assert within == [0], direct  # the tolerance binds: the domain-heavy router rises too far
    chosen = min(within, key=lambda i: direct[i][0])
    assert info["domain_weight"] == weights[chosen] and info["within_tolerance"]
    assert held_out_ppls(router, kinds[0])["router_ppl"] == pytest.approx(direct[chosen][0])
    # a tolerance no candidate meets: the least general rise, flagged
    _, strict = fit_within_general_budget(kinds, 0, 0.0, tolerance=0.0, weights=(0.95,))
    assert not strict["within_tolerance"] and strict["domain_weight"] == 0.95
    for bad in (-0.1, float("nan"), "3 %", True):
        with pytest.raises(ValueError, match="general_tolerance must be a fraction"):
            check_general_tolerance(bad)


def test_router_holds_out_whole_documents():
    """Documents of tokens [0, 40), [40, 85), [85, 101): 100 positions, position i predicts token i + 1. The cut
    nearest 90 % falls at document 2's first position (84), so exactly document 2 is held out; one document alone
    (or two documents split far from 90 %) falls back to the last 10 % of positions."""
    n = 100
    kind = RouterData(np.arange(n * 3, dtype=np.float32).reshape(n, 3), np.arange(n) * 1.0, -np.arange(n) * 1.0,
                      offsets=np.array([0, 40, 85, 101]))  # fmt: skip
    head, held = kind.split()
    doc_of_gold = np.searchsorted(kind.offsets, np.arange(1, n + 1), side="right") - 1
    assert np.array_equal(held.base, np.flatnonzero(doc_of_gold == 2) * 1.0)
    assert np.array_equal(head.base, np.flatnonzero(doc_of_gold < 2) * 1.0)
    assert np.array_equal(held.features, kind.features[84:]) and kind.held_out_documents() == 1
    alone = RouterData(kind.features, kind.base, kind.memdec, offsets=np.array([0, 101]))
    assert len(alone.split()[1].base) == 10 and alone.held_out_documents() == 0
    uneven = RouterData(kind.features, kind.base, kind.memdec, offsets=np.array([0, 30, 101]))
    assert len(uneven.split()[1].base) == 10 and uneven.held_out_documents() == 0
    assert len(RouterData(kind.features, kind.base, kind.memdec).split()[1].base) == 10


def test_served_batches_with_a_router_equal_each_prompt_alone(pair, tmp_path):
    """`memdec serve --router`'s worker: left-padded batches, skips decided for the whole batch, each row's greedy
    tokens equal to that prompt generated alone; a router of other models is refused before the server starts."""
    from lightning_memdec.apps.serve import check_router
    from lightning_memdec.apps.serve_worker import generate_steps, load_generator

    path = saved_router(tmp_path, pair, spread_router(seed=4, scale=5.0, threshold=0.9))
    model = load_generator(str(pair["base"]), str(pair["memdec"]), 0.3, torch.device("cpu"), str(path))
    assert model.router is not None and model.router.threshold == 0.9
    prompts = [[464, 3290, 373], [40, 588, 257, 1310, 286, 262], [50, 51]]
    jobs = [{"prompt_ids": p, "max_tokens": 10, "sampling": {"do_sample": False}} for p in prompts]
    rows: list[list[int]] = [[] for _ in prompts]
    calls = []
    hook = model.memdec.register_forward_pre_hook(
        lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True
    )
    try:
        for step in generate_steps(model, jobs, eos_token_ids=set()):
            for row, out in enumerate(step):
                rows[row] += [out["token"]] if out else []
    finally:
        hook.remove()
    assert 1 <= len(calls) < 10, calls  # the batch skipped the decoder at some steps, not at all
    for prompt, row in zip(prompts, rows):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt) :]
        assert row == alone.tolist()
    tokenizer = load_tokenizer("gpt2")
    with pytest.raises(ArtifactError, match="fitted for base"):
        check_router(str(path), str(pair["other"]), str(pair["memdec"]), tokenizer)
    with pytest.raises(ValueError, match="--memdec"):
        check_router(str(path), str(pair["base"]), None, tokenizer)


def test_fit_router_cli_publishes_a_router_that_evaluate_reports(pair, tmp_path, capsys):
    """`memdec fit-router` end to end on tiny models, then `memdec evaluate --router`: the router row equals the
    perplexity of InterpolatedLM(router=...) on the same tokens (one window), with intervals; refusals up front."""
    from lightning_memdec.cli import main
    from lightning_memdec.evaluation.evaluate import evaluate
    from lightning_memdec.evaluation.split_tokens import text_tokens

    out = tmp_path / "router"
    args = ["fit-router", "--base", str(pair["base"]), "--memdec", str(pair["memdec"]), "--domain",
            "embedded:biomed/valid", "--general", "embedded:general/valid", "--out", str(out), "--window", "32",
            "--max_tokens", "300", "--routing.threshold", "0.2", "--device", "cpu"]  # fmt: skip
    main(args)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "router" and meta["threshold"] == 0.2 and meta["base"]["name"] == str(pair["base"])
    assert meta["training"]["positions"] == {"domain": 299, "general": 299}
    assert all(0 < n < 299 for n in meta["training"]["held_out_positions"])
    assert len(meta["training"]["held_out_documents"]) == 2
    assert meta["training"]["domain"] == "embedded:biomed/valid" and (out / "router.safetensors").is_file()
    training = meta["training"]  # the default general budget: one router per domain weight, one kept
    assert training["general_tolerance"] == 0.03 and len(training["candidates"]) == len(DOMAIN_WEIGHTS)
    assert training["domain_weight"] in DOMAIN_WEIGHTS
    assert not (tmp_path / "router.lock").exists() and not (tmp_path / "router.partial").exists()
    for bad, message in (
        (args, "already exists"),
        (args[:-6] + ["--routing.threshold", "1.5", "--overwrite", "true"], "--routing.threshold: the router's λ"),
        (
            args[:-6] + ["--routing.general_tolerance", "-1", "--overwrite", "true"],
            "--routing.general_tolerance must be a fraction",
        ),
    ):
        with pytest.raises(SystemExit) as exit_:  # the CLI prints a user's mistake, without a traceback
            main(bad)
        assert exit_.value.code == 1 and message in capsys.readouterr().err

    report = evaluate(
        [str(pair["base"])],
        "embedded:biomed/test",
        tmp_path / "ev",
        memdec=str(pair["memdec"]),
        mix=EvaluateMixing(lmbda=0.3, router=str(out)),
        scoring=Scoring(batch_size=4, window=128, stride=64, max_tokens=100),
    )
    row = report["rows"][0]
    tokens = torch.as_tensor(text_tokens("embedded:biomed/test", load_tokenizer("gpt2"), 100))[None]
    lm = InterpolatedLM(str(pair["base"]), str(pair["memdec"]), 0.3, router=out)
    with torch.no_grad():
        gold = lm(tokens[:, :-1]).logits.double().gather(-1, tokens[:, 1:, None])[..., 0]
    assert row["router_ppl"] == pytest.approx(float((-gold).mean().exp()), rel=1e-5)
    assert row["router_ppl"] != pytest.approx(row["memdec_ppl"], rel=1e-6)
    low, high = row["all_positions"]["intervals"]["router_ppl"]
    assert np.isnan([low, high]).all()  # one document here: no interval, not a point-like one
    assert "router_ppl - memdec_ppl" in row["all_positions"]["differences"]
    with pytest.raises(ArtifactError, match="none of --bases"):
        evaluate(
            [str(pair["other"])],
            "embedded:biomed/test",
            tmp_path / "ev2",
            memdec=str(pair["memdec"]),
            mix=EvaluateMixing(lmbda=0.3, router=str(out)),
            scoring=Scoring(batch_size=4, window=128, stride=64, max_tokens=100),
        )


def test_fit_router_window_defaults_to_what_the_models_hold(pair, tmp_path):
    """memdec evaluate's 1024 unless the models' context is shorter: the README's command, on the shipped bases of
    512 positions, was refused for want of --window."""
    from lightning_memdec.apps.fit_router import fit_router

    fit_router(str(pair["base"]), str(pair["memdec"]), "embedded:biomed/valid", "embedded:general/valid",
               tmp_path / "router", max_tokens=200, device="cpu")  # fmt: skip
    assert json.loads((tmp_path / "router" / "meta.json").read_text())["training"]["window"] == 512


@pytest.mark.parametrize("general", ["missing", "empty"])
def test_fit_router_refuses_a_bad_general_text_before_any_model_loads(pair, tmp_path, monkeypatch, general):
    """The general text was read only after both models had scored the whole domain text (minutes at full size)."""
    import lightning_memdec.apps.fit_router as fit_router_module

    monkeypatch.setattr(fit_router_module, "load_causal_lm", lambda ref: pytest.fail("a model was loaded"))
    path = tmp_path / "general.txt"
    if general == "empty":
        path.write_text("\n\n")
    error, said = (FileNotFoundError, "does not exist") if general == "missing" else (ValueError, "holds no text")
    with pytest.raises(error, match=said):
        fit_router_module.fit_router(str(pair["base"]), str(pair["memdec"]), "embedded:biomed/valid", str(path),
                                     tmp_path / "router", max_tokens=200, device="cpu")  # fmt: skip


def test_a_sigterm_while_routers_train_exits_143_not_0(monkeypatch):
    """Lightning's stop is a SystemExit with no code: fit-router exited 0 with nothing written."""
    import os
    import signal

    from lightning_memdec.apps.router_training import RouterModule
    from lightning_memdec.io.artifact_dirs import Interrupted

    monkeypatch.setattr(RouterModule, "on_train_start", lambda self: os.kill(os.getpid(), signal.SIGTERM))
    rng = np.random.default_rng(0)
    with pytest.raises(Interrupted, match="fit-router interrupted") as stopped:
        train_router([planted_kind(rng, 300, 1.0, True), planted_kind(rng, 300, -1.0, False)], 0, 0.0)
    assert stopped.value.code == 143


def direct_linear_lambda(router: Router, features) -> np.ndarray:
    """A width-0 router's routed λ written out: sigmoid(w · z + b) of the standardised features, 0 under the
    threshold."""
    z = (torch.as_tensor(features).double() - router.feature_mean.double()) / router.feature_std.double()
    lam = torch.sigmoid(z @ router.net[0].weight.detach().double()[0] + router.net[0].bias.detach().double())
    return torch.where(lam < router.threshold, torch.zeros_like(lam), lam).numpy()


def direct_ppl(base, memdec, lam) -> float:
    """Perplexity of the per-position λ mixture of two gold log-prob arrays, in numpy."""
    return float(np.exp(-np.mean(np.log((1 - lam) * np.exp(base) + lam * np.exp(memdec)))))


def held_rows(kind: RouterData) -> slice:
    """A kind without document offsets holds out its last HELD_OUT of positions."""
    return slice(int(round(len(kind.base) * (1 - HELD_OUT))), None)


def test_router_listing_its_features_in_another_order_is_refused(tmp_path, pair):
    """Another version's feature order would feed the weights the wrong columns: λ silently meaningless."""
    path = saved_router(tmp_path, pair, spread_router())
    meta = json.loads((path / "meta.json").read_text())
    meta["features"] = meta["features"][1:] + meta["features"][:1]
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="reads features"):
        load_router(path)
    with pytest.raises(ArtifactError, match="reads features"):
        load_router(path, str(pair["base"]), str(pair["memdec"]))


def test_router_for_a_base_built_in_memory_warns_unverifiable_and_loads(tmp_path, pair):
    """A model with no path has no content hash: nothing to compare, so a warning, not a refusal."""
    from transformers import GPT2Config, GPT2LMHeadModel

    router = spread_router(threshold=0.3)
    path = saved_router(tmp_path, pair, router)
    in_memory = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.warns(UserWarning, match="base cannot be verified"):
        loaded = load_router(path, in_memory, str(pair["memdec"]))
    features = torch.randn(2, 5, 34)
    assert torch.equal(loaded.routed(features), router.routed(features))


def test_router_of_another_base_is_refused_without_a_tokenizer_fingerprint(tmp_path, pair):
    """A base saved without its tokenizer gives no fingerprint; the models' hashes must still be compared."""
    path = saved_router(tmp_path, pair, spread_router())
    with pytest.raises(ArtifactError, match="fitted for base"):
        load_router(path, str(pair["other"]), str(pair["memdec"]))
    with pytest.raises(ArtifactError, match="fitted for memdec"):
        load_router(path, str(pair["base"]), str(pair["other"]))


def test_a_feature_constant_over_the_training_rows_gives_finite_lambda():
    """A dead hidden unit has std 0: it must standardise to 0 (no say in λ), not to NaN."""
    torch.manual_seed(0)
    rows = torch.randn(200, 10)
    rows[:, 3] = 1.25
    router = spread_router(threshold=0.1, hidden=8, scale=3.0, width=0)
    router.set_standardisation(rows)
    features = torch.randn(4, 6, 10)
    features[..., 3] = 1.25
    keep = [i for i in range(10) if i != 3]  # λ written out without the constant feature
    z = (features.double()[..., keep] - rows.double()[:, keep].mean(0)) / rows.double()[:, keep].std(0)
    lam = torch.sigmoid(z @ router.net[0].weight.detach().double()[0, keep] + router.net[0].bias.detach().double())
    expected = torch.where(lam < 0.1, torch.zeros_like(lam), lam)
    got = router.routed(features).double()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_each_kind_weighs_its_share_whatever_its_row_count():
    """The loss weights: a kind of 30 rows and one of 10 weigh 0.7 and 0.3 in all, each row alike within a kind."""
    from lightning_memdec.apps.router_training import weighted_rows

    rng = np.random.default_rng(0)
    parts = [planted_kind(rng, 30, 1.0, True), planted_kind(rng, 10, -1.0, False)]
    weight = weighted_rows(parts, [0.7, 0.3]).tensors[3].double().numpy()
    np.testing.assert_allclose(weight[:30], np.full(30, 0.7 / 30), rtol=1e-6)
    np.testing.assert_allclose(weight[30:], np.full(10, 0.3 / 10), rtol=1e-6)


def test_router_standardises_with_the_training_rows_only():
    """The held-out rows decide early stopping and the kept router: their features must not leak into its
    standardisation (here they drift, as later documents do)."""
    rng = np.random.default_rng(0)
    kinds = [planted_kind(rng, 100, 1.0, True), planted_kind(rng, 60, -1.0, False)]
    for kind in kinds:
        kind.features[held_rows(kind)] += 5.0
    router, _ = train_router(kinds, 0, 0.0)
    fit = np.concatenate([kind.features[: held_rows(kind).start] for kind in kinds]).astype(np.float64)
    np.testing.assert_allclose(router.feature_mean.double().numpy(), fit.mean(0), atol=1e-5)
    np.testing.assert_allclose(router.feature_std.double().numpy(), fit.std(0, ddof=1), rtol=1e-5)


def constant_router(lam: float, hidden: int = 8) -> Router:
    """λ the same at every position: zero weights, bias logit(λ)."""
    router = Router(hidden, 0, 0.0)
    with torch.no_grad():
        router.net[0].weight.zero_()
        router.net[0].bias.fill_(float(np.log(lam / (1 - lam))))
    return router.eval()


def test_general_budget_keeps_the_lowest_domain_ppl_within_and_else_the_least_general_rise(monkeypatch):
    """Three candidates of known λ (more domain weight, more λ: domain perplexity down, general up), so the rule is
    checked where more than one candidate is within the tolerance, and where none is."""
    import lightning_memdec.apps.router_training as training

    rng = np.random.default_rng(2)
    kinds = [planted_kind(rng, 200, 1.0, True), planted_kind(rng, 200, -1.0, False)]
    lambdas = {0.5: 0.2, 0.7: 0.5, 0.95: 0.8}
    routers = {w: constant_router(lam) for w, lam in lambdas.items()}
    trained = lambda kinds, width, threshold, w: (routers[w], {"domain_weight": w, "epochs": 0})  # noqa: E731
    monkeypatch.setattr(training, "train_router", trained)
    (d, dh), (g, gh) = ((k, held_rows(k)) for k in kinds)
    domain = {w: direct_ppl(d.base[dh], d.memdec[dh], lam) for w, lam in lambdas.items()}
    base_ppl = float(np.exp(-np.mean(g.base[gh])))
    rise = {w: direct_ppl(g.base[gh], g.memdec[gh], lam) / base_ppl - 1 for w, lam in lambdas.items()}
    assert domain[0.5] > domain[0.7] > domain[0.95] and 0 < rise[0.5] < rise[0.7] < rise[0.95]
    for tolerance, kept, within in (
        (rise[0.95] + 1.0, 0.95, True),  # all within: the lowest domain perplexity
        ((rise[0.7] + rise[0.95]) / 2, 0.7, True),  # two within: the lower domain perplexity of the two
        (rise[0.5] / 2, 0.5, False),  # none within: the least general rise, flagged
    ):
        router, info = fit_within_general_budget(kinds, 0, 0.0, tolerance, weights=tuple(lambdas))
        assert router is routers[kept] and info["domain_weight"] == kept and info["within_tolerance"] is within
        for c in info["candidates"]:
            assert c["held_out_domain_ppl"] == pytest.approx(domain[c["domain_weight"]], rel=1e-6)
            assert c["held_out_general_rise"] == pytest.approx(rise[c["domain_weight"]], rel=1e-5)


def test_held_out_ppls_mix_at_the_thresholded_lambda():
    """What decides the kept router is the mixture generation runs: λ 0 (decoder skipped) under the threshold."""
    rng = np.random.default_rng(3)
    kind = planted_kind(rng, 400, 1.0, True)
    router = spread_router(seed=1, threshold=0.4, hidden=8, scale=3.0, width=0)
    held = held_rows(kind)
    lam = direct_linear_lambda(router, kind.features[held])
    assert 0.1 < (lam == 0).mean() < 0.9  # the threshold skips some held-out positions, not all
    got = held_out_ppls(router, kind)
    assert got["base_ppl"] == pytest.approx(float(np.exp(-np.mean(kind.base[held]))), rel=1e-9)
    assert got["router_ppl"] == pytest.approx(direct_ppl(kind.base[held], kind.memdec[held], lam), rel=1e-5)


def test_held_out_summary_equals_direct_figures():
    """The best fixed λ is swept on both kinds' held-out rows (base first: λ weighs the decoder), its perplexity and
    the share of skipped positions (λ exactly 0) per kind."""
    from lightning_memdec.apps.fit_router import held_out_summary

    rng = np.random.default_rng(4)
    kinds = []
    for n in (300, 200):  # the decoder better on most positions: the best fixed λ is well above 0.5
        features = rng.normal(size=(n, 10)).astype(np.float32)
        kinds.append(RouterData(features, np.log(rng.uniform(0.01, 0.1, n)), np.log(rng.uniform(0.05, 0.5, n))))
    router = spread_router(seed=2, threshold=0.3, hidden=8, scale=3.0, width=0)
    summary = held_out_summary(router, kinds)
    held = [(k.base[held_rows(k)], k.memdec[held_rows(k)], k.features[held_rows(k)]) for k in kinds]
    base, memdec = np.concatenate([h[0] for h in held]), np.concatenate([h[1] for h in held])
    grid = np.linspace(0, 1, 21)
    best = grid[np.argmin([direct_ppl(base, memdec, lam) for lam in grid])]
    assert best > 0.5 and summary["best_fixed_lambda"] == pytest.approx(best)
    for name, (b, m, f) in zip(("domain", "general"), held):
        lam = direct_linear_lambda(router, f)
        assert 0 < (lam == 0).mean() < 0.5
        assert summary[name]["router_skip_fraction"] == pytest.approx((lam == 0).mean())
        assert summary[name]["fixed_ppl"] == pytest.approx(direct_ppl(b, m, best), rel=1e-9)
        assert summary[name]["router_ppl"] == pytest.approx(direct_ppl(b, m, lam), rel=1e-5)


def test_fit_router_scores_each_position_in_the_first_window_of_stride_half_the_window(pair):
    """As memdec evaluate: windows every window / 2 tokens, each position scored by the first window covering it,
    so every position past the first half window has at least half a window of context."""
    from lightning_memdec.apps.fit_router import text_positions
    from lightning_memdec.hf.loading import load_causal_lm

    models = tuple(load_causal_lm(str(pair[k])).eval() for k in ("base", "memdec"))
    tokens = np.random.default_rng(5).integers(0, 50257, 40)
    window = 16
    kind = text_positions("text", tokens, 50256, models, 50257, window)
    n = len(tokens) - 1
    starts = list(range(0, n - window + 1, window // 2))
    starts += [n - window] if starts[-1] + window < n else []
    expected = {"base": np.zeros(n), "memdec": np.zeros(n)}
    first_covering = [next(s for s in starts if s + window > p) for p in range(n)]
    with torch.no_grad():
        for start in starts:
            ids = torch.as_tensor(tokens[start : start + window])[None]
            gold = torch.as_tensor(tokens[start + 1 : start + window + 1])
            for name, model in zip(("base", "memdec"), models):
                log_p = torch.log_softmax(model(ids).logits[0].double(), -1).gather(-1, gold[:, None])[:, 0]
                for p in (p for p in range(start, start + window) if first_covering[p] == start):
                    expected[name][p] = float(log_p[p - start])
    np.testing.assert_allclose(kind.base, expected["base"], atol=2e-5)
    np.testing.assert_allclose(kind.memdec, expected["memdec"], atol=2e-5)


def test_fit_router_refuses_an_existing_out_before_any_model_loads(pair, tmp_path, monkeypatch):
    """Refused at once, not after both models scored both texts (minutes at full size); the directory untouched."""
    import lightning_memdec.apps.fit_router as fit_router_module

    monkeypatch.setattr(fit_router_module, "load_causal_lm", lambda ref: pytest.fail("a model was loaded"))
    out = tmp_path / "router"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ArtifactError, match="already exists"):
        fit_router_module.fit_router(str(pair["base"]), str(pair["memdec"]), "embedded:biomed/valid",
                                     "embedded:general/valid", out, max_tokens=200, device="cpu")  # fmt: skip
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_fit_router_s_default_window_fits_the_shorter_of_the_two_contexts(pair, tmp_path, monkeypatch):
    """A decoder of a shorter context than the base's: the default window is the shorter one (both models score
    the same windows), not the base's alone, which the decoder would refuse."""
    from transformers import GPT2Config

    import lightning_memdec.apps.fit_router as fit_router_module
    from lightning_memdec.hf.loading import context_length, model_config

    short = tmp_path / "short-decoder"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64).save_pretrained(short)
    windows = []

    def stop_at_the_check(window, config, ref):
        windows.append(window)
        raise InterruptedError("checked")

    monkeypatch.setattr(fit_router_module, "check_fits_context", stop_at_the_check)
    with pytest.raises(InterruptedError, match="checked"):
        fit_router_module.fit_router(str(pair["base"]), str(short), "embedded:biomed/valid",
                                     "embedded:general/valid", tmp_path / "router", device="cpu")  # fmt: skip
    contexts = [context_length(model_config(ref)) for ref in (str(pair["base"]), str(short))]
    assert windows == [min(1024, *contexts)] and contexts[1] < contexts[0]


def test_evaluate_router_without_memdec_is_refused(tmp_path, pair):
    """A router weighs the decoder: with no --memdec there is nothing to check it against, nor to mix."""
    from lightning_memdec.evaluation.router_rows import router_by_base

    path = saved_router(tmp_path, pair, spread_router())
    with pytest.raises(ValueError, match="--memdec"):
        router_by_base(str(path), None, [(str(pair["base"]), None, "base")])
    assert router_by_base(None, None, []) == {}


def test_evaluate_refuses_a_router_fitted_with_another_tokenizer(tmp_path, pair):
    """evaluate's router rows check the base's tokenizer, as InterpolatedLM does: a router fitted under another
    tokenizer reads other token ids."""
    from lightning_memdec.evaluation.router_rows import router_by_base

    neox = saved_router(tmp_path, pair, spread_router(), tokenizer="gpt-neox-20b", name="neox")
    with pytest.raises(ArtifactError, match="fitted with tokenizer"):
        router_by_base(str(neox), str(pair["memdec"]), [(str(pair["base"]), None, "base")])
    gpt2 = saved_router(tmp_path, pair, spread_router(), name="gpt2")
    assert list(router_by_base(str(gpt2), str(pair["memdec"]), [(str(pair["base"]), None, "base")])) == [
        str(pair["base"])
    ]


def test_router_columns_equal_direct_computation():
    """Perplexity at the per-position λ, mean λ and the share of positions skipped (λ exactly 0, not merely small)."""
    from lightning_memdec.evaluation.router_rows import router_columns

    rng = np.random.default_rng(6)
    lam = np.array([0.0, 0.0, 0.1, 0.3, 0.45, 0.7, 0.9, 0.0])
    base, memdec = np.log(rng.uniform(0.01, 0.5, 8)), np.log(rng.uniform(0.01, 0.5, 8))
    got = router_columns({"router_lambda": lam, "base": base, "memdec": memdec})
    assert got["router_skip_fraction"] == pytest.approx(np.mean(lam == 0))
    assert got["router_mean_lambda"] == pytest.approx(lam.mean())
    assert got["router_ppl"] == pytest.approx(direct_ppl(base, memdec, lam), rel=1e-9)


def test_a_rerun_with_another_text_at_the_same_path_after_a_stop_inside_publish_is_refused(pair, tmp_path, monkeypatch):
    """The run settings named the domain and general texts by their paths: a text changed there after a stop inside
    publish was called done with the router fitted on the old text. The hash of the token ids the texts gave tells
    them apart; the same command is still done."""
    from conftest import stopped_inside_publish

    from lightning_memdec.apps.fit_router import fit_router
    from lightning_memdec.io.artifact_dirs import partial_dir, read_meta
    from lightning_memdec.io.embedded import resolve_text
    from lightning_memdec.io.text_sources import read_documents

    docs, domain = read_documents(resolve_text("embedded:biomed/valid")), tmp_path / "domain.txt"
    domain.write_text("\n\n".join(docs[:40]))
    models = (str(pair["base"]), str(pair["memdec"]))
    settings = dict(window=64, max_tokens=300, device="cpu")
    for out in (tmp_path / "same", tmp_path / "changed"):
        stopped_inside_publish(monkeypatch, fit_router, *models, str(domain), "embedded:general/valid", out, **settings)
        assert not out.exists() and (partial_dir(out) / "meta.json").is_file()
    done = fit_router(*models, str(domain), "embedded:general/valid", tmp_path / "same", **settings)
    assert done == tmp_path / "same" and not partial_dir(done).exists()  # done: in place
    before = read_meta(partial_dir(tmp_path / "changed"))
    domain.write_text("\n\n".join(docs[40:80]))  # other domain text at the same path
    with pytest.raises(ArtifactError, match="already exists; pass --overwrite"):
        fit_router(*models, str(domain), "embedded:general/valid", tmp_path / "changed", **settings)
    assert read_meta(tmp_path / "changed") == before  # the stopped run's router, left for --overwrite
