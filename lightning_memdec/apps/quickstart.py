"""`memdec quickstart`: the whole method end to end on the embedded corpora, on a laptop CPU.

By default it starts from the two shipped base LMs (``embedded:base-small`` and ``embedded:base-large``, GPT-2
architecture pretrained on general Wikipedia): the teacher is the larger fine-tuned on the domain (as the paper
builds its datastore with a fine-tuned GPT2-xl) → teacher datastore → index → kNN temperature chosen on the domain
valid split → sparse targets → Memory Decoder training (continued from the small base) through the same
LightningCLI ``fit`` users run → a CE-only decoder with the same start and budget (the paper's ablation) →
evaluation on the domain test split of every base alone, + kNN-LM over its own datastore, + MemDec and + CE-only
decoder, of the teacher alone and + kNN-LM over its datastore (the ceiling MemDec imitates), and of both decoders
alone; every λ and kNN temperature is chosen on the domain valid split. General perplexity is reported too. The
report is ``memdec evaluate``'s (report.json, report.md, lambda_curve.png): intervals over documents, the overlap
audit of valid and test against the domain train text, plus the goals, the general split and the run's stages.

``--pretrain_bases true`` pretrains two tiny bases from scratch on the embedded general corpus instead.
Every stage writes a directory under ``out`` and is skipped when rerun once finished.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from lightning_memdec.apps.quickstart_checks import check_quickstart_inputs
from lightning_memdec.apps.quickstart_evaluation import GENERAL_TEST, evaluate_all
from lightning_memdec.apps.quickstart_report import goals
from lightning_memdec.apps.quickstart_stages import (
    Budget,
    StageClock,
    base_names,
    base_tokenizers,
    build_or_reuse_index,
    check_same_settings,
    choose_temperature,
    corpus_dir,
    datastore,
    done,
    epoch_steps,
    fingerprints,
    knn_gold_probs,
    parameters,
    scores_and_keys,
    split_path,
    tokenizer_encoding,
    train_model,
)
from lightning_memdec.evaluation.report import write_report
from lightning_memdec.io.artifact_dirs import sha256_file
from lightning_memdec.io.embedded import EMBEDDED_PREFIX
from lightning_memdec.io.output_lock import exclusive_output
from lightning_memdec.io.token_corpus import Corpus
from lightning_memdec.stages.settings import KNNTargets
from lightning_memdec.stages.targets import build_targets

__all__ = ["SMALL_BASE", "LARGE_BASE", "SHIPPED_BASES", "Budget", "StageClock", "quickstart", "train_model"]


# tiny from-scratch bases for --pretrain_bases true (and the cross-vocabulary benchmark)
SMALL_BASE = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2}
LARGE_BASE = {"model_type": "gpt2", "n_embd": 128, "n_layer": 4, "n_head": 4}
SHIPPED_BASES = [f"{EMBEDDED_PREFIX}base-small", f"{EMBEDDED_PREFIX}base-large"]


@exclusive_output(replaces_out=False)
def quickstart(
    out: Path = Path("runs/quickstart"),
    domain: str | None = None,
    base: list[str] | None = None,
    teacher: str | None = None,
    pretrain_bases: bool = False,
    tokenizer: str | None = None,
    budget: Budget = Budget(),
    beta: float = 0.5,
) -> dict:
    """Run the Memory Decoder method end to end and report perplexities (report.json, report.md, figure).

    Args:
        out: run directory; finished stages in it are reused when rerun.
        domain: directory with train.txt, valid.txt, test.txt (documents separated by blank lines), or a
            shipped corpus: biomed, law or general (``embedded:law``); default: the embedded biomedical corpus.
        base: base LMs (HF names, directories or embedded:base-small / embedded:base-large), all with the same
            tokenizer; default: the two shipped bases. The decoder starts from the smallest.
        teacher: the model fine-tuned on the domain as the teacher; default: the base with the most parameters.
        pretrain_bases: pretrain two tiny bases from scratch on the embedded general corpus instead of ``base``.
        tokenizer: tokenizer of the corpora; default: the bases' own (gpt2 with --pretrain_bases).
        budget: token and step budgets of every stage (the defaults took 13-22 minutes on 2 CPU cores, as the
            machine's host was quiet or busy: docs/results/quickstart-biomed-2026-12-04, quickstart-eval-speed).
        beta: KL weight of the Memory Decoder loss.
    """
    refs, tokenizer = checked_bases(base, teacher, pretrain_bases, tokenizer)  # refused before any work
    check_quickstart_inputs(out, beta, budget.window, [*refs, *([teacher] if teacher else [])])
    splits = [split_path(domain, s) for s in ("train", "valid", "test")]
    started, started_cpu = time.perf_counter(), time.process_time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clock = StageClock()
    settings = {"domain": domain, "base": refs, "teacher": teacher, "pretrain_bases": pretrain_bases}
    texts = {Path(s).name: sha256_file(s) for s in splits if Path(s).is_file()}  # --domain DIR: its text, edited or not
    models = fingerprints([*refs, *([teacher] if teacher else [])], tokenizer)  # retrained in place: other models
    check_same_settings(out, {**settings, "tokenizer": tokenizer, "beta": beta, **asdict(budget), "texts": texts,
                              "fingerprints": models, "encoding": tokenizer_encoding(tokenizer)})  # fmt: skip
    with clock("tokenize"):
        corpora = tokenized_corpora(out / "corpora", splits, tokenizer, budget, pretrain_bases)
    # 1. base LMs: given (default: the shipped ones), or pretrained on the general corpus
    if pretrain_bases:
        with clock("pretrain bases"):
            bases = pretrained_bases(out, corpora, budget)
    else:
        bases = base_names(refs)
    sizes = {name: parameters(ref) for name, ref in bases.items()}
    start = bases[min(sizes, key=sizes.get)]
    teacher_start = teacher or bases[max(sizes, key=sizes.get)]
    dt, dv = corpora["domain-train"], corpora["domain-valid"]
    decoder_steps = budget.memdec_steps or epoch_steps(dt, budget)
    # 2. teacher: the largest base fine-tuned on the domain; its datastore gives the training targets
    with clock("teacher fine-tune"):
        t_model = train_model(
            "teacher", out, dt, dv, budget, budget.teacher_steps, teacher_start, 0.0, lr=budget.teacher_lr
        )
    (targets_train, targets_valid), t_choice = teacher_targets(out, t_model, dt, dv, budget, clock)
    # 3. the Memory Decoder and the CE-only ablation: same start, same budget, through `memdec fit`
    tt = (targets_train, targets_valid)
    with clock("train memdec"):
        memdec = train_model("memdec", out, dt, dv, budget, decoder_steps, start, beta, tt, lr=budget.decoder_lr)
    with clock("train ce-only"):
        ce_only = train_model("ce-only", out, dt, dv, budget, decoder_steps, start, 0.0, lr=budget.decoder_lr)
    # 4. evaluation: λ and every kNN temperature chosen on the domain valid split, applied to test
    decoders = {"memdec": memdec, "ce_only": ce_only}
    report = evaluate_all(out, bases, {"teacher": str(t_model)}, corpora, decoders, budget, clock)
    report["run"] = {
        "seconds": clock.seconds, "cpu_seconds": clock.cpu_seconds,
        "total_cpu_seconds": round(time.process_time() - started_cpu, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "teacher_start": teacher_start, "teacher_steps": budget.teacher_steps, "targets_temperature": t_choice,
        "decoder_start": start, "decoder_steps": decoder_steps, "domain_train_tokens": Corpus(dt).num_tokens,
        "parameters": sizes, "budget": asdict(budget), "domain": domain or "embedded:biomed", "tokenizer": tokenizer,
    }  # fmt: skip
    report["goals"] = goals(report)
    write_report(report, out)
    print((out / "report.md").read_text())
    return report


def teacher_targets(out: Path, t_model: Path, dt: Path, dv: Path, budget: Budget, clock: StageClock):
    """The teacher's datastore and index, its kNN temperature chosen on valid, and the train/valid sparse targets."""
    s, k = out / "stores", budget.k
    with clock("teacher datastore + index"):
        t_store = datastore(t_model, dt, s / "teacher-train", budget, stride=budget.window)
        t_valid = datastore(t_model, dv, s / "teacher-valid", budget)
        t_index = build_or_reuse_index(t_store, s / "teacher-index")
    with clock("targets"):
        # the teacher's valid keys, captured while scoring it, are the queries (evaluation reuses both)
        cache = out / "scores" / "teacher-domain-valid.npy"
        t_gold_valid, t_keys_valid = scores_and_keys(t_model, dv, budget, cache, keys=True)
        t_choice = choose_temperature(*knn_gold_probs(t_store, t_index, t_keys_valid, dv, k), t_gold_valid)
        temperature = t_choice["temperature"]
        targets_train, targets_valid = out / "targets" / "train", out / "targets" / "valid"
        if not done(targets_train):
            build_targets(t_store, t_index, targets_train, overwrite=True, knn=KNNTargets(k=k, temperature=temperature))
        if not done(targets_valid):
            build_targets(
                t_store,
                t_index,
                targets_valid,
                queries=t_valid,
                overwrite=True,
                knn=KNNTargets(k=k, temperature=temperature),
            )
    return (targets_train, targets_valid), t_choice


def checked_bases(base, teacher, pretrain_bases: bool, tokenizer: str | None) -> tuple[list[str], str]:
    """The base references and the corpora's tokenizer, refusing contradictory or mismatched settings."""
    if pretrain_bases and base:
        raise ValueError("give either --base or --pretrain_bases true, not both.")
    base = [base] if isinstance(base, (str, Path)) else base  # one base as a str (from Python): not its letters
    refs = [] if pretrain_bases else [str(b) for b in (base or SHIPPED_BASES)]
    if not pretrain_bases:
        tokenizer = base_tokenizers(refs + ([teacher] if teacher else []), tokenizer)
    elif teacher:
        raise ValueError("--teacher needs given bases; with --pretrain_bases the teacher is the large one.")
    return refs, tokenizer or "gpt2"


def tokenized_corpora(c: Path, splits: list[str], tokenizer: str, budget: Budget, general: bool) -> dict[str, Path]:
    """The domain splits and general test (plus general train/valid to pretrain bases), reused when done."""
    train, valid, test = splits
    corpora = {
        "general-test": corpus_dir(c / "general-test", GENERAL_TEST, tokenizer, budget.valid_tokens),
        "domain-train": corpus_dir(c / "domain-train", train, tokenizer, budget.domain_tokens),
        "domain-valid": corpus_dir(c / "domain-valid", valid, tokenizer, budget.valid_tokens),
        "domain-test": corpus_dir(c / "domain-test", test, tokenizer, budget.test_tokens),
    }
    if general:
        for split, n in (("train", budget.general_tokens), ("valid", budget.valid_tokens)):
            corpora[f"general-{split}"] = corpus_dir(c / f"general-{split}", f"{EMBEDDED_PREFIX}general/{split}",
                                                     tokenizer, n)  # fmt: skip
    return corpora


def pretrained_bases(out: Path, corpora: dict[str, Path], budget: Budget) -> dict[str, str]:
    """Two tiny bases pretrained from scratch on the general corpus (--pretrain_bases)."""
    gt, gv = corpora["general-train"], corpora["general-valid"]
    plan = [("base-small", budget.small_base_steps, SMALL_BASE), ("base-large", budget.large_base_steps, LARGE_BASE)]
    return {name: str(train_model(name, out, gt, gv, budget, steps, cfg, beta=0.0)) for name, steps, cfg in plan}
