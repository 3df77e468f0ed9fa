"""``memdec downstream``: zero-shot classification with kNN-Prompt's domain-conditional PMI (Shi et al., 2022).

Each base LM is scored alone, + Memory Decoder and, with a datastore of that base, + kNN-LM (the paper's Table 2).
A prompt's class scores are kNN-Prompt's domain-conditional PMI (:mod:`evaluation.dcpmi`) under the mixture
``P_λ = λ·p_other + (1 − λ)·p_base`` after the prompt and after the task's domain premise; the prediction is the
argmax (classes tied at the top share the credit: accuracy does not depend on the order a task lists its classes in).
Every mixture's λ, and kNN-LM's temperature, is chosen on the task's dev split; the decoder's arrays are shared by
every base (they share its tokenizer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lightning_memdec.evaluation.dcpmi import PromptScorer, choose_lambda, dcpmi_scores, knn_side, lm_side
from lightning_memdec.evaluation.downstream_checks import check_downstream_inputs
from lightning_memdec.evaluation.downstream_general import GeneralText, knn_model_name
from lightning_memdec.evaluation.downstream_report import (
    REPORT_FILES,
    accuracy_summary,
    write_downstream_report,
    write_predictions,
)
from lightning_memdec.evaluation.downstream_tasks import Task, knn_prompt_sample, load_tasks, single_token_verbalizers
from lightning_memdec.evaluation.knn_temperature import check_temperatures, knn_key
from lightning_memdec.evaluation.settings import Bootstrap, DownstreamMixing, GeneralSplit, KNNLMRows, Prompts
from lightning_memdec.hf.loading import context_length, find_tokenizer, load_causal_lm, model_config, torch_device
from lightning_memdec.inference.interpolated_lm import mixture_vocab
from lightning_memdec.inference.knnlm import KNNLM
from lightning_memdec.io.artifact_dirs import keep_earlier_report
from lightning_memdec.io.embedded import load_tokenizer
from lightning_memdec.io.output_lock import exclusive_output
from lightning_memdec.io.tokenizer_identity import encoding_fingerprint
from lightning_memdec.kernels.scoring import (
    DEFAULT_LAMBDA_GRID,
    DEFAULT_TEMPERATURE_GRID,
    check_lambda_grid,
    check_lmbda,
    lambda_at_edge,
)

__all__ = ["downstream", "general_text", "general_summary"]

SYSTEM_SUFFIX = {None: "", "memdec": " + MemDec", "knn": " + kNN-LM", "ce_only": " + CE-only"}


# -- the stage ---------------------------------------------------------------------------------------------------------


class _Run:
    """What one ``downstream`` call scores with: tasks, verbalizer ids per base, λ settings, kNN-LM's temperatures
    (tried on dev; ``given`` without one), the decoders (MemDec and the CE-only control, shared by the bases of their
    tokenizer) and, optionally, the general text to score."""

    def __init__(self, tasks, verbalizer_ids, lambdas, grid, temperatures: dict, decoders: dict, scorer_args: tuple,
                 general=None):  # fmt: skip
        self.tasks, self.verbalizer_ids, self.lambdas, self.grid = tasks, verbalizer_ids, lambdas, grid
        self.temperature_grid, self.given_temperature = temperatures["grid"], temperatures["given"]
        self.scored_temperatures = list(dict.fromkeys([*self.temperature_grid, self.given_temperature]))
        self.decoders = {kind: model for kind, model in decoders.items() if model is not None}
        self.max_length, self.batch_size = scorer_args
        self.general: GeneralText | None = general
        self.decoded: dict[tuple, np.ndarray] = {}  # the decoders' arrays, shared by the bases of their tokenizer
        self.base_arrays: dict[tuple[str, str], dict] = {}  # (base, task) -> its arrays, for the other-base control
        self.results: list[dict[str, Any]] = []

    def fixed_lambda(self, task: Task, kind: str) -> tuple[float | None, str]:
        """A λ fixed by the user for this mixture (None: tuned on dev). The decoder's λ settings hold for its
        controls (the CE-only decoder, another base) too: every mixture but kNN-LM's is tuned, or fixed, alike."""
        decoder_like = kind != "knn"
        if decoder_like and task.name in self.lambdas["task"]:
            return check_lmbda(self.lambdas["task"][task.name]), "given for the task"
        if decoder_like and task.lmbda is not None:
            return check_lmbda(task.lmbda), "task file"
        given = self.lambdas["memdec" if decoder_like else "knn"]
        return (given, "given") if given is not None else (None, "")

    def score_base(self, name: str, model, tok, knnlm: KNNLM | None) -> None:
        """Every task with one base: alone, + MemDec, + kNN-LM, + CE-only, each mixture's λ tuned on dev (the
        other bases: later)."""
        decoders = list(self.decoders.values())
        vocab = len(tok)
        for decoder in decoders:  # refuses a decoder of another tokenizer, naming both
            vocab = min(vocab, mixture_vocab(model, decoder, tok, find_tokenizer(decoder, decoder)))
        limits = [self.max_length, context_length(model)] + [context_length(d) for d in decoders]
        scorer = PromptScorer(tok, min(x for x in limits if x), self.batch_size)
        fingerprint = encoding_fingerprint(tok)  # the decoders' scores are of this encoding's prompt ids
        base_side = knn_side(knnlm, self.scored_temperatures) if knnlm is not None else lm_side(model, vocab, "base")
        self._score_general(name, model, vocab, knnlm)
        has_knn = knnlm is not None
        for task in self.tasks:
            ids = self.verbalizer_ids[name][task.name]
            token_ids = sorted({t for cls in ids for t in cls})
            column = {t: j for j, t in enumerate(token_ids)}
            columns = [[column[t] for t in cls] for cls in ids]
            kinds = [None] + [k for k in ("memdec", "knn", "ce_only") if k in self.decoders or k == "knn" and has_knn]
            tune = "dev" in task.splits and (
                any(self.fixed_lambda(task, k)[0] is None for k in [*kinds[1:], "memdec"])
                or has_knn
                and len(self.temperature_grid) > 1
            )
            arrays = {}
            for split in ["test"] + (["dev"] if tune else []):
                prompts = [task.prompt(r) for r in task.splits[split]] + [task.domain_premise]
                arrays[split] = scorer.run(prompts, base_side, token_ids, f"{name} {task.name} {split}")
                for kind, decoder in self.decoders.items():
                    key = (kind, fingerprint, scorer.max_length, task.name, split)
                    if key not in self.decoded:
                        side = lm_side(decoder, vocab, kind)
                        self.decoded[key] = scorer.run(prompts, side, token_ids, f"{kind} {task.name} {split}")[kind]
                    arrays[split][kind] = self.decoded[key]
            base_arrays = {split: {"base": a["base"]} for split, a in arrays.items()}
            self.base_arrays[(name, task.name)] = {"arrays": base_arrays, "columns": columns, "vocab": vocab}
            for kind in kinds:
                self.results.append(self._system(name, task, kind, arrays, columns))

    def _score_general(self, name: str, model, vocab: int, knnlm: KNNLM | None) -> None:
        """The general text's log p(gold) of this base (and its p_kNN), and of the decoders once."""
        if self.general is None:
            return
        if knnlm is not None:
            self.general.score_knn(name, knnlm, self.scored_temperatures)
        else:
            self.general.score(name, model, vocab)
        for kind, decoder in self.decoders.items():
            self.general.score(SYSTEM_SUFFIX[kind].removeprefix(" + "), decoder, vocab)

    def add_other_base_controls(self, bases: list[str]) -> None:
        """base + another base, its λ tuned as MemDec's is: does any second general model help as much?"""
        if "memdec" not in self.decoders:
            return
        for name in bases:
            for other in (b for b in bases if b != name):
                for task in self.tasks:
                    mine, theirs = self.base_arrays[(name, task.name)], self.base_arrays[(other, task.name)]
                    if mine["columns"] != theirs["columns"] or mine["vocab"] != theirs["vocab"]:
                        raise ValueError(f"{name} and {other} score different verbalizer ids or vocabularies; "
                                         "the other-base control needs bases of one tokenizer.")  # fmt: skip
                    arrays = {split: {"base": a["base"], other: theirs["arrays"][split]["base"]}
                              for split, a in mine["arrays"].items()}  # fmt: skip
                    self.results.append(self._system(name, task, other, arrays, mine["columns"]))

    def _knn_temperature(self, task: Task, arrays: dict, columns) -> dict[str, Any]:
        """kNN-LM's T for a task: on dev, the grid's T whose best λ (or the fixed λ) has the best dev accuracy (the
        first on ties), as λ itself is chosen; without a dev split (or with one T), the one given. ``at_edge``: an end
        of the grid that no other T equals (the best T may lie beyond; a tie, e.g. at λ = 0, says nothing of T)."""
        if "dev" not in arrays or len(self.temperature_grid) == 1:
            t = self.given_temperature if "dev" not in arrays else self.temperature_grid[0]
            return {"temperature": t, "from": "given", "dev_accuracy": None, "at_edge": False}
        lmbda = self.fixed_lambda(task, "knn")[0]
        labels = np.array([r["label"] for r in task.splits["dev"]])
        accuracy = {}
        for t in self.temperature_grid:
            view = _view(arrays["dev"], knn_key(t))
            grid = self.grid if lmbda is None else [lmbda]
            accuracy[t] = max(choose_lambda(view, columns, labels, grid)[1])
        best = max(accuracy.values())
        chosen = next(t for t, acc in accuracy.items() if acc == best)
        at_edge = lambda_at_edge(chosen, self.temperature_grid) and list(accuracy.values()).count(best) == 1
        return {"temperature": chosen, "from": "dev", "dev_accuracy": {f"{t:g}": a for t, a in accuracy.items()},
                "at_edge": at_edge}  # fmt: skip

    def _system(self, base_name: str, task: Task, kind, arrays: dict, columns) -> dict[str, Any]:
        """One (task, system): its λ (given by flag, tuned on dev, or the fallback), kNN-LM's T, and its test scores.
        ``kind`` is None (the base alone), memdec, knn, ce_only or another base's name."""
        other_key, knn_t = kind, {"temperature": None, "from": None, "dev_accuracy": None, "at_edge": False}
        if kind == "knn":
            knn_t = self._knn_temperature(task, arrays, columns)
            other_key = knn_key(knn_t["temperature"])
        lmbda, source, curve = 0.0, "", None
        if kind is not None:
            lmbda, source = self.fixed_lambda(task, kind)
            if lmbda is None and "dev" in arrays:
                dev_labels = np.array([r["label"] for r in task.splits["dev"]])
                lmbda, curve = choose_lambda(_view(arrays["dev"], other_key), columns, dev_labels, self.grid)
                source = "dev"
            elif lmbda is None:
                lmbda, source = self.lambdas["fallback"], "fallback (no dev split)"
        suffix = SYSTEM_SUFFIX.get(kind, f" + {kind}")
        other = suffix.removeprefix(" + ") if kind else None
        if kind == "knn":
            other = knn_model_name(base_name, knn_t["temperature"])
        scores = dcpmi_scores(**_view(arrays["test"], other_key), class_columns=columns, lmbda=lmbda)
        kind_name = "base" if kind is None else kind if kind in SYSTEM_SUFFIX else "other base"
        return {"task": task.name, "system": base_name + suffix, "base": base_name, "kind": kind_name,
                "other": other, "lmbda": lmbda if kind else None, "lmbda_from": source or None, "dev_curve": curve,
                "knn_temperature": knn_t["temperature"], "knn_temperature_from": knn_t["from"],
                "knn_temperature_at_edge": knn_t["at_edge"],
                "dev_accuracy_by_temperature": knn_t["dev_accuracy"],
                "scores": scores, "labels": np.array([r["label"] for r in task.splits["test"]]),
                "ids": [r["id"] for r in task.splits["test"]], "class_names": task.labels}  # fmt: skip


def _view(arrays: dict, other_key: str | None) -> dict:
    """:func:`dcpmi_scores`' arguments from one split's arrays ``{name: [N + 1, K]}``, mixing the base with
    ``arrays[other_key]`` (None: the base alone); the last row of every array is the domain premise."""
    x = {"base_x": arrays["base"][:-1], "base_d": arrays["base"][-1], "other_x": None, "other_d": None}
    if other_key is None:
        return x
    other = arrays[other_key]
    return {**x, "other_x": other[:-1], "other_d": other[-1]}


def _tokenizer_for(ref: str, tokenizer: str | None):
    tok = load_tokenizer(tokenizer) if tokenizer is not None else find_tokenizer(ref)
    if tok is None:
        raise ValueError(f"{ref} has no tokenizer in its directory; pass --prompts.tokenizer NAME_OR_DIR.")
    return tok


@exclusive_output(replaces_out=False)
def downstream(
    tasks: list[str],
    bases: list[str],
    out: Path,
    memdec: str | None = None,
    ce_only: str | None = None,
    knn: KNNLMRows = KNNLMRows(),
    mix: DownstreamMixing = DownstreamMixing(),
    prompts: Prompts = Prompts(),
    general: GeneralSplit = GeneralSplit(),
    bootstrap: Bootstrap = Bootstrap(),
) -> dict[str, Any]:
    """Zero-shot classification (kNN-Prompt's DCPMI): each base alone, + MemDec, + kNN-LM, and the controls (+ the
    other bases, + the CE-only decoder, each λ chosen as MemDec's); report with paired differences + predictions.

    Long by its report; the scoring is in :class:`_Run`.
    Class score = Σ over the class's single-token verbalizers of log(P(v|x)+1e-10) − log(P(v|domain)+1e-10), a sum
    of log-ratios, not of probabilities, as kNN-Prompt's score.py; prediction = argmax (classes tied at the top share
    the credit). Tasks are validated, and
    verbalizers filtered with each base's tokenizer, before any model is loaded.

    Args:
        tasks: task folders (tasks.json + <task>/test.jsonl [+ dev.jsonl]) and/or YAML task files.
        bases: base LMs (names, directories or embedded:base-small); each is scored alone and mixed. With a memdec
            and two or more bases, each base is also mixed with every other base (a control).
        out: output directory for predictions.jsonl, report.json, report.md and accuracy.png.
        memdec: the Memory Decoder (directory or name); omitted: no "+ MemDec" systems and no controls.
        ce_only: the decoder trained with CE only (the paper's ablation), a control of MemDec (needs memdec).
        knn: "+ kNN-LM" systems: datastores, one per base in the order of bases, with their indexes; the search.
        mix: the decoder's λ for every task (else a task's own: mix.task_lmbda, its YAML `lmbda`; else chosen on its
            dev split over mix.lambda_grid; else mix.fallback_lmbda), and kNN-LM's, whose temperature is chosen on
            dev too (mix.temperature_grid; --knn.temperature without a dev split).
        prompts: the tasks and examples scored, and how prompts are cut, batched, tokenized and run.
        general: a general text on which the perplexity of every model and mixture used is reported.
        bootstrap: the 95% bootstrap intervals' resamples and seed.
    """
    grid = check_lambda_grid(DEFAULT_LAMBDA_GRID if mix.lambda_grid is None else mix.lambda_grid)
    lambdas = {
        "memdec": None if mix.lmbda is None else check_lmbda(mix.lmbda),
        "knn": None if mix.knn_lmbda is None else check_lmbda(mix.knn_lmbda),
        "task": {name: check_lmbda(v) for name, v in (mix.task_lmbda or {}).items()},
        "fallback": check_lmbda(mix.fallback_lmbda),
    }
    max_length, batch_size, tokenizer = prompts.max_length, prompts.batch_size, prompts.tokenizer
    bases = [bases] if isinstance(bases, str) else list(bases)
    datastore, index = list(knn.datastore or []), list(knn.index or [])
    if len(datastore) > len(bases):
        raise ValueError("give at most one --knn.datastore per base (in the bases' order).")
    if ce_only is not None and memdec is None:
        raise ValueError("--ce_only is a control of MemDec; pass --memdec too (or drop --ce_only).")
    models = {"--bases": bases, "--memdec": [memdec] if memdec else [], "--ce_only": [ce_only] if ce_only else []}
    check_downstream_inputs(out, models, datastore, index, tokenizer)  # before any model loads
    task_list = load_tasks(tasks, prompts.task_names, prompts.verbalizers)
    for task in task_list:
        task.splits = {split: knn_prompt_sample(recs, prompts.n_sample) for split, recs in task.splits.items()}
    tokenizers = {ref: _tokenizer_for(ref, tokenizer) for ref in bases}
    verbalizer_ids = {
        ref: {t.name: single_token_verbalizers(t, tok, f"{ref}'s tokenizer") for t in task_list}
        for ref, tok in tokenizers.items()
    }
    models = [m for m in (*bases, memdec, ce_only) if m is not None]
    general_split = general_text(general.text, general.tokens, tokenizers, models, max_length, batch_size)
    dev = torch_device(prompts.device)
    decoders = {name: load_causal_lm(ref).to(dev).eval() for name, ref in (("memdec", memdec), ("ce_only", ce_only))
                if ref is not None}  # fmt: skip
    temperatures = {
        "grid": check_temperatures(DEFAULT_TEMPERATURE_GRID if mix.temperature_grid is None else mix.temperature_grid),
        "given": knn.temperature,
    }
    scorer_args = (max_length, batch_size)
    run = _Run(task_list, verbalizer_ids, lambdas, grid, temperatures, decoders, scorer_args, general_split)
    knn_args = {
        "k": knn.k,
        "temperature": knn.temperature,
        "exact_distances": knn.exact_distances,
        "nprobe": knn.nprobe,
    }
    for i, ref in enumerate(bases):
        model = load_causal_lm(ref).to(dev).eval()
        knnlm = None
        if i < len(datastore):
            knnlm = KNNLM(model, datastore[i], index[i], lmbda=0.5, tokenizer=tokenizers[ref], **knn_args)
        run.score_base(ref, model, tokenizers[ref], knnlm)
        del model, knnlm
    run.add_other_base_controls(bases)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keep_earlier_report(out, REPORT_FILES)
    write_predictions(run.results, out / REPORT_FILES[-1])
    general_figures = None
    if general_split is not None:
        general_figures = general_summary(general_split, run.results, decoders, bootstrap.resamples, bootstrap.seed)
    report = {
        "tasks": {t.name: {"files": t.files, "n_test": len(t.splits["test"]), "labels": t.labels} for t in task_list},
        "bases": bases, "memdec": memdec, "ce_only": ce_only, "datastores": datastore,
        "verbalizers": prompts.verbalizers,
        "controls": sorted({r["system"] for r in run.results if r["kind"] in ("ce_only", "other base")}),
        "scoring": "DCPMI: sum over single-token verbalizers of log(P(v|x)+1e-10) - log(P(v|domain)+1e-10)",
        "lambda_grid": grid, "n_sample": prompts.n_sample, "max_length": max_length,
        "knn_temperature_grid": temperatures["grid"] if datastore else None,
        "knn_temperature": knn.temperature if datastore else None,
        **accuracy_summary(run.results, bootstrap.resamples, bootstrap.seed, grid),
        "general": general_figures,
    }  # fmt: skip
    write_downstream_report(report, out)
    return report


def general_text(spec, max_tokens, tokenizers: dict, models: list[str], max_length: int, batch_size: int):
    """The general split, tokenized before any model is loaded, in windows of ``max_length`` capped by the context of
    every model (read from their configs); every base must share the first base's tokenizer."""
    if spec is None:
        return None
    encodings = {ref: encoding_fingerprint(tok) for ref, tok in tokenizers.items()}  # one token stream for all
    if len(set(encodings.values())) > 1:
        raise ValueError(
            f"--general.text needs bases whose tokenizers encode text alike (encoding fingerprints {encodings}); "
            "drop --general.text."
        )
    window = min([max_length] + [n for n in (context_length(model_config(m)) for m in models) if n])
    return GeneralText(spec, next(iter(tokenizers.values())), max_tokens, window, batch_size)


def general_summary(general: GeneralText, results: list[dict], decoders: dict, resamples: int, seed: int):
    """Every model alone (bases, decoders) and every mixture at each λ its tasks used, on the general text."""
    alone = list(dict.fromkeys(r["base"] for r in results))
    alone += [SYSTEM_SUFFIX[kind].removeprefix(" + ") for kind in decoders]
    mixtures = {(r["system"], r["base"], r["other"], r["lmbda"], r["knn_temperature"])
                for r in results if r["kind"] != "base"}  # fmt: skip
    return general.summary(alone, sorted(mixtures, key=lambda m: (m[0], m[3], m[4] or 0)), resamples, seed)
