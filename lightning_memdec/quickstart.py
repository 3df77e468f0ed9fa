"""`memdec quickstart`: the whole method end to end on the embedded corpora, on a laptop CPU.

No pretrained model can be downloaded here, so (unless ``--base`` is given) it first pretrains two small
base LMs of different size on the embedded general corpus. Then, on a domain: a teacher (the larger base
fine-tuned on the domain, as the paper builds its datastore with a fine-tuned GPT2-xl) → datastore →
index → kNN temperature chosen on the domain valid split → sparse targets → Memory Decoder training
(continued from the small base) through the same LightningCLI ``fit`` users run → a CE-only decoder with
the same start and budget (the paper's ablation) → evaluation of every base alone, + kNN-LM, + MemDec and
+ CE-only decoder on the domain test split (λ chosen on valid), and on the general test split.

Every stage writes a directory under ``out`` and is skipped when rerun once finished.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightning_memdec.artifacts import META, write_json_atomic
from lightning_memdec.assets import EMBEDDED_PREFIX
from lightning_memdec.configs import load_config
from lightning_memdec.corpus import Corpus, tokenize
from lightning_memdec.datastore import Datastore, build_datastore
from lightning_memdec.index import KeyIndex, build_index
from lightning_memdec.targets import build_targets
from lightning_memdec.train import fit

log = logging.getLogger(__name__)
TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)

SMALL_BASE = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2}
LARGE_BASE = {"model_type": "gpt2", "n_embd": 128, "n_layer": 4, "n_head": 4}


@dataclass
class Budget:
    """Token and step budgets; the defaults fit the whole quickstart in about 15 minutes on 2 CPU cores."""

    general_tokens: int = 520_000
    domain_tokens: int = 120_000
    eval_tokens: int = 12_000
    window: int = 128
    batch_size: int = 8
    small_base_steps: int = 500
    large_base_steps: int = 500
    teacher_steps: int = 150
    memdec_steps: int = 150
    k: int = 64


class StageClock:
    """Wall-clock seconds per quickstart stage, reported so users see where their budget goes."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 1)
        log.warning("quickstart stage %s: %.1f s", name, self.seconds[name])


def _check_same_settings(out: Path, settings: dict) -> None:
    """Finished stages are reused by name, so a rerun must have the settings that produced them."""
    from lightning_memdec.artifacts import ArtifactError

    path = out / "quickstart_settings.json"
    settings = json.loads(json.dumps(settings))
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise ArtifactError(
                f"{out} holds a quickstart run with other settings ({', '.join(changed)} differ); "
                f"use another --out, or delete {out} to start afresh."
            )
    else:
        write_json_atomic(path, settings)


def _done(path: Path) -> bool:
    return (path / META).is_file()


def _split(domain: str | None, split: str) -> str:
    if domain is None:
        return f"{EMBEDDED_PREFIX}biomed/{split}"
    path = Path(domain) / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"--domain {domain} must hold train.txt, valid.txt and test.txt; {path} is missing.")
    return str(path)


def _corpus(out: Path, text: str, tokenizer: str, max_tokens: int) -> Path:
    return out if _done(out) else tokenize([text], out, tokenizer, max_tokens=max_tokens)


def train_model(
    name: str,
    out: Path,
    train: Path,
    valid: Path,
    budget: Budget,
    steps: int,
    start: dict | str,
    beta: float,
    train_targets: Path | None = None,
    val_targets: Path | None = None,
    lr: float = 2e-3,
) -> Path:
    """Train one model with :func:`lightning_memdec.train.fit` (what `memdec fit` runs) into ``out/models/<name>``.

    ``start`` is a model to continue (name or directory) or a GPT-2 config dict to train from scratch.
    """
    export = out / "models" / name
    if _done(export):
        return export
    if isinstance(start, str):
        model = {"model": start}
    else:  # from scratch: the vocabulary is the corpus tokenizer's (gpt2: 50257, gpt-neox-20b: 50277)
        vocab = Corpus(train).tokenizer["vocab_size"]
        model = {"config": {**start, "n_positions": budget.window, "vocab_size": vocab}}
    data = {
        "train_corpus": str(train),
        "val_corpus": str(valid),
        "window": budget.window,
        "batch_size": budget.batch_size,
    }
    if train_targets is not None:
        data.update(train_targets=str(train_targets), val_targets=str(val_targets))
    run = out / "runs" / name
    config = load_config(
        "trainer/cpu.yaml",
        {
            "model": {**model, "beta": beta, "learning_rate": lr, "warmup_steps": 0.05},
            "data": data,
            "trainer": {
                "max_steps": steps,
                "val_check_interval": max(1, steps // 2),
                "limit_val_batches": 4,
                "check_val_every_n_epoch": None,
                "default_root_dir": str(run),
                "enable_model_summary": False,
                # tqdm rather than rich bars: rich's console proxy recurses when driven from a Jupyter kernel
                "callbacks": [{"class_path": "lightning.pytorch.callbacks.TQDMProgressBar"}],
            },
            "checkpoint": {"dirpath": str(run / "checkpoints")},
            "export": {"dirpath": str(export)},
        },
    )
    log.info("training %s for %d steps", name, steps)
    return fit(config)


def knn_gold_probs(store: Path, index: Path, queries: Path, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour distances [n, k] and whether each neighbour's value is the gold token, for every query position."""
    ds, qs = Datastore(store), Datastore(queries)
    dist, ids = KeyIndex(index).search(np.asarray(qs.keys, dtype=np.float32), k)
    match = (np.asarray(ds.values)[np.maximum(ids, 0)] == np.asarray(qs.values)[:, None]) & (ids >= 0)
    return dist, match


def choose_temperature(dist: np.ndarray, match: np.ndarray, base_valid: np.ndarray, grid=TEMPERATURES) -> dict:
    """The kNN temperature (and λ) with the lowest kNN-LM perplexity on the valid split."""
    from lightning_memdec.scoring import knn_gold_log_probs, mixed_perplexity, sweep_lambda

    scores = {}
    for t in grid:
        knn = knn_gold_log_probs(dist, match, t)
        lmbda, _ = sweep_lambda(base_valid, knn)
        scores[t] = (mixed_perplexity(base_valid, knn, lmbda), lmbda)
    best = min(scores, key=lambda t: scores[t][0])
    return {
        "temperature": best,
        "lambda": scores[best][1],
        "valid_ppl_by_temperature": {str(t): v[0] for t, v in scores.items()},
    }


def _gold(model_dir: Path | str, corpus: Path, budget: Budget, cache: Path) -> np.ndarray:
    """Sliding-window gold-token log-probs of one LM over a corpus at the budget's window, cached as .npy."""
    from lightning_memdec.scoring import corpus_gold_log_probs

    return corpus_gold_log_probs(model_dir, corpus, budget.window, cache=cache)


def _store(model: Path | str, corpus: Path, out: Path, budget: Budget) -> Path:
    if _done(out):
        return out
    return build_datastore(
        corpus,
        str(model),
        out,
        window=budget.window,
        stride=budget.window // 2,
        batch_windows=16,
        accelerator="cpu",
        overwrite=True,
    )


def _index(store: Path, out: Path) -> Path:
    return out if _done(out) else build_index(store, out, factory="auto", overwrite=True)


def quickstart(
    out: Path = Path("runs/quickstart"),
    domain: str | None = None,
    base: list[str] | None = None,
    tokenizer: str = "gpt2",
    general_tokens: int = Budget.general_tokens,
    domain_tokens: int = Budget.domain_tokens,
    eval_tokens: int = Budget.eval_tokens,
    window: int = Budget.window,
    batch_size: int = Budget.batch_size,
    small_base_steps: int = Budget.small_base_steps,
    large_base_steps: int = Budget.large_base_steps,
    teacher_steps: int = Budget.teacher_steps,
    memdec_steps: int = Budget.memdec_steps,
    k: int = Budget.k,
    beta: float = 0.5,
) -> dict:
    """Run the Memory Decoder method end to end and report perplexities (report.json, report.md, figure).

    Args:
        out: run directory; finished stages in it are reused when rerun.
        domain: directory with train.txt, valid.txt, test.txt (documents separated by blank lines);
            default: the embedded biomedical corpus.
        base: base LMs (HF names or directories, same tokenizer) to use instead of pretraining two small ones;
            the first is the decoder's starting point and the last (largest) the teacher.
        tokenizer: tokenizer of the corpora (and of the pretrained bases).
        general_tokens: general-corpus tokens for pretraining the bases.
        domain_tokens: domain train tokens (datastore, targets, decoder training).
        eval_tokens: tokens of each valid/test split scored.
        window: context length of every model and window of every stage (stride = window / 2).
        batch_size: windows per training step.
        small_base_steps: pretraining steps of the small base.
        large_base_steps: pretraining steps of the large base.
        teacher_steps: fine-tuning steps of the teacher on the domain.
        memdec_steps: training steps of the Memory Decoder (and of the CE-only decoder).
        k: neighbours per position for targets and kNN-LM.
        beta: KL weight of the Memory Decoder loss.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clock = StageClock()
    budget = Budget(
        general_tokens,
        domain_tokens,
        eval_tokens,
        window,
        batch_size,
        small_base_steps,
        large_base_steps,
        teacher_steps,
        memdec_steps,
        k,
    )
    _check_same_settings(out, {"domain": domain, "base": base, "tokenizer": tokenizer, "beta": beta, **budget.__dict__})
    c = out / "corpora"
    with clock("tokenize"):
        corpora = {
            "general-train": _corpus(c / "general-train", f"{EMBEDDED_PREFIX}general/train", tokenizer, general_tokens),
            "general-valid": _corpus(c / "general-valid", f"{EMBEDDED_PREFIX}general/valid", tokenizer, eval_tokens),
            "general-test": _corpus(c / "general-test", f"{EMBEDDED_PREFIX}general/test", tokenizer, eval_tokens),
            "domain-train": _corpus(c / "domain-train", _split(domain, "train"), tokenizer, domain_tokens),
            "domain-valid": _corpus(c / "domain-valid", _split(domain, "valid"), tokenizer, eval_tokens),
            "domain-test": _corpus(c / "domain-test", _split(domain, "test"), tokenizer, eval_tokens),
        }
    # 1. base LMs: given, or pretrained on the general corpus
    if base:
        bases = {Path(b).name or b: str(b) for b in base}
    else:
        gt, gv = corpora["general-train"], corpora["general-valid"]
        with clock("pretrain bases"):
            bases = {
                "base-small": str(
                    train_model("base-small", out, gt, gv, budget, small_base_steps, SMALL_BASE, beta=0.0)
                ),
                "base-large": str(
                    train_model("base-large", out, gt, gv, budget, large_base_steps, LARGE_BASE, beta=0.0)
                ),
            }
    start, largest = list(bases.values())[0], list(bases.values())[-1]
    dt, dv = corpora["domain-train"], corpora["domain-valid"]
    # 2. teacher: the largest base fine-tuned on the domain; its datastore gives the training targets
    with clock("teacher"):
        teacher = train_model("teacher", out, dt, dv, budget, teacher_steps, largest, beta=0.0, lr=1e-3)
    s = out / "stores"
    with clock("teacher datastore + index"):
        t_store, t_valid = (
            _store(teacher, dt, s / "teacher-train", budget),
            _store(teacher, dv, s / "teacher-valid", budget),
        )
        t_index = _index(t_store, s / "teacher-index")
    with clock("targets"):
        t_choice = choose_temperature(
            *knn_gold_probs(t_store, t_index, t_valid, k),
            _gold(teacher, dv, budget, out / "scores" / "teacher-valid.npy"),
        )
        temperature = t_choice["temperature"]
        targets_train, targets_valid = out / "targets" / "train", out / "targets" / "valid"
        if not _done(targets_train):
            build_targets(t_store, t_index, targets_train, k=k, temperature=temperature, overwrite=True)
        if not _done(targets_valid):
            build_targets(
                t_store, t_index, targets_valid, queries=t_valid, k=k, temperature=temperature, overwrite=True
            )
    # 3. the Memory Decoder and the CE-only ablation: same start, same budget, through `memdec fit`
    with clock("train memdec"):
        memdec = train_model(
            "memdec",
            out,
            dt,
            dv,
            budget,
            memdec_steps,
            start,
            beta=beta,
            train_targets=targets_train,
            val_targets=targets_valid,
            lr=1e-3,
        )
    with clock("train ce-only"):
        ce_only = train_model("ce-only", out, dt, dv, budget, memdec_steps, start, beta=0.0, lr=1e-3)
    # 4. evaluation: λ (and the kNN temperature) chosen on the domain valid split, applied to test
    with clock("evaluate"):
        report = evaluate_all(out, bases, corpora, memdec, ce_only, budget)
    report.update(
        {
            "seconds": clock.seconds,
            "teacher": str(teacher),
            "teacher_temperature": t_choice,
            "budget": budget.__dict__,
            "domain": domain or "embedded:biomed",
            "tokenizer": tokenizer,
        }
    )
    write_json_atomic(out / "report.json", report)
    write_markdown(report, out / "report.md")
    plot_report(report, out / "report.png")
    return report


def evaluate_all(
    out: Path, bases: dict[str, str], corpora: dict[str, Path], memdec: Path, ce_only: Path, budget: Budget
) -> dict:
    from lightning_memdec.corpus import Corpus
    from lightning_memdec.knnlm import KNNLM, knnlm_scorer
    from lightning_memdec.scoring import (
        DEFAULT_LAMBDA_GRID,
        mixed_perplexity,
        perplexity,
        sliding_gold_log_probs,
        sweep_lambda,
    )

    sc = out / "scores"
    gold = lambda model, split, name: _gold(model, corpora[split], budget, sc / f"{name}-{split}.npy")
    mem = {split: gold(memdec, split, "memdec") for split in ("domain-valid", "domain-test", "general-test")}
    ce = {split: gold(ce_only, split, "ce-only") for split in ("domain-valid", "domain-test")}
    results = []
    for name, ref in bases.items():
        base = {split: gold(ref, split, name) for split in ("domain-valid", "domain-test", "general-test")}
        store = _store(ref, corpora["domain-train"], out / "stores" / f"{name}-train", budget)
        vstore = _store(ref, corpora["domain-valid"], out / "stores" / f"{name}-valid", budget)
        index = _index(store, out / "stores" / f"{name}-index")
        knn = choose_temperature(*knn_gold_probs(store, index, vstore, budget.k), base["domain-valid"])
        knn_test_cache = sc / f"{name}-knn-test.npy"
        if knn_test_cache.is_file():
            knn_test = np.load(knn_test_cache)
        else:
            model = KNNLM(ref, store, index, k=budget.k, temperature=knn["temperature"], lmbda=knn["lambda"])
            tokens = np.asarray(Corpus(corpora["domain-test"]).tokens)
            knn_test = sliding_gold_log_probs(
                tokens, budget.window, budget.window // 2, 8, knnlm_scorer(model), desc=f"kNN-LM {name} test"
            )["knn"]
            np.save(knn_test_cache, knn_test)
        lam, curve = sweep_lambda(base["domain-valid"], mem["domain-valid"])
        ce_lam, _ = sweep_lambda(base["domain-valid"], ce["domain-valid"])
        results.append(
            {
                "base": name,
                "base_ppl": perplexity(base["domain-test"]),
                "knnlm_ppl": mixed_perplexity(base["domain-test"], knn_test, knn["lambda"]),
                "memdec_ppl": mixed_perplexity(base["domain-test"], mem["domain-test"], lam),
                "ce_only_ppl": mixed_perplexity(base["domain-test"], ce["domain-test"], ce_lam),
                "lambda": lam,
                "ce_only_lambda": ce_lam,
                "knnlm_lambda": knn["lambda"],
                "knnlm_temperature": knn["temperature"],
                "general_base_ppl": perplexity(base["general-test"]),
                "general_memdec_ppl": mixed_perplexity(base["general-test"], mem["general-test"], lam),
                "valid_ppl_by_lambda": dict(zip([str(x) for x in DEFAULT_LAMBDA_GRID], curve)),
            }
        )
    return {
        "results": results,
        "memdec_alone_ppl": perplexity(mem["domain-test"]),
        "ce_only_alone_ppl": perplexity(ce["domain-test"]),
        "test_positions": int(len(mem["domain-test"])),
    }


def write_markdown(report: dict, path: Path) -> None:
    lines = [
        f"Domain test perplexity ({report['test_positions']} positions of {report['domain']}); λ chosen "
        "on the domain valid split.",
        "",
        "| base | base | + kNN-LM | + MemDec | + CE-only decoder | λ | general: base | general: + MemDec |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['base']} | {r['base_ppl']:.2f} | {r['knnlm_ppl']:.2f} | {r['memdec_ppl']:.2f} | "
            f"{r['ce_only_ppl']:.2f} "
            f"| {r['lambda']:.2f} | {r['general_base_ppl']:.2f} | {r['general_memdec_ppl']:.2f} |"
        )
    lines += [
        "",
        f"MemDec alone: {report['memdec_alone_ppl']:.2f}; CE-only decoder alone: {report['ce_only_alone_ppl']:.2f}.",
        "",
    ]
    path.write_text("\n".join(lines))


def plot_report(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["base"] for r in report["results"]]
    x = np.arange(len(names))
    for i, (key, label) in enumerate(
        [("base_ppl", "base"), ("knnlm_ppl", "+ kNN-LM"), ("ce_only_ppl", "+ CE-only"), ("memdec_ppl", "+ MemDec")]
    ):
        left.bar(x + (i - 1.5) * 0.2, [r[key] for r in report["results"]], 0.2, label=label)
    left.set_xticks(x, names)
    left.set_ylabel("domain test perplexity")
    left.legend()
    for r in report["results"]:
        lam = [float(k) for k in r["valid_ppl_by_lambda"]]
        right.plot(lam, list(r["valid_ppl_by_lambda"].values()), marker="o", label=r["base"])
    right.set_xlabel("λ (weight of the Memory Decoder)")
    right.set_ylabel("domain valid perplexity")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
