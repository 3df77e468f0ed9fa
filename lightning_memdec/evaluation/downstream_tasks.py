"""Zero-shot classification tasks for ``memdec downstream``: read, validate, filter verbalizers, subsample.

A task is a prompt template over each example's ``input`` fields, a domain premise (the context of DCPMI's
domain-conditional term), class names and per-class verbalizer words. Two sources, one format:

* a folder in the shared kNN-Prompt format: ``tasks.json`` (one entry per task) + ``<task>/test.jsonl`` and,
  optionally, ``<task>/dev.jsonl``;
* a YAML file mapping task names to entries with the same keys plus ``test:`` (and optionally ``dev:``) paths to
  the user's own JSONL, relative to the YAML file. An entry may also fix its ``lmbda``.

Every record is one JSON object per line, ``{"id": int, "input": {...}, "label": int}``. Everything is checked
here, before any model is loaded; errors name the file, the line and the field. No torch or transformers here.
"""

from __future__ import annotations

import json
import random
import string
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from lightning_memdec.io.artifact_dirs import wrong_path

__all__ = ["Task", "TaskError", "load_tasks", "single_token_verbalizers", "knn_prompt_sample"]

REQUIRED_KEYS = ("template", "domain_premise", "labels", "verbalizers")
RECORD_KEYS = ("id", "input", "label")


class TaskError(ValueError):
    """A task definition or task file that cannot be scored (raised before any model is loaded)."""


@dataclass
class Task:
    """One classification task; ``verbalizers[c]`` are the words of class ``c`` (leading space included)."""

    name: str
    template: str
    domain_premise: str
    labels: list[str]
    verbalizers: list[list[str]]
    splits: dict[str, list[dict]] = field(default_factory=dict)  # "test" and optionally "dev": validated records
    files: dict[str, str] = field(default_factory=dict)
    lmbda: float | None = None

    def prompt(self, record: dict) -> str:
        return self.template.format(**record["input"])


def _template_fields(template: str, where: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise TaskError(f"{where}: template {template!r} is not a valid str.format string ({err}).") from err


def _check_entry(name: str, entry, where: str, verbalizer_set: str) -> dict:
    if not isinstance(entry, dict):
        raise TaskError(f"{where}: task {name!r} must be a mapping, got {type(entry).__name__}.")
    key = "verbalizers" if verbalizer_set == "fuzzy" else "primary_verbalizers"
    needed = (*REQUIRED_KEYS[:3], key)
    for k in needed:
        if k not in entry:
            raise TaskError(f"{where}: task {name!r} has no {k!r} field (needs {', '.join(needed)}).")
    for k in ("template", "domain_premise"):
        if not isinstance(entry[k], str):
            raise TaskError(f"{where}: task {name!r} field {k!r} must be a string, got {entry[k]!r}.")
    labels = entry["labels"]
    if not isinstance(labels, list) or len(labels) < 2:
        raise TaskError(f"{where}: task {name!r} field 'labels' must list at least two class names, got {labels!r}.")
    verbalizers = entry[key]
    if verbalizer_set == "primary" and isinstance(verbalizers, list):
        verbalizers = [[w] if isinstance(w, str) else w for w in verbalizers]
    if not isinstance(verbalizers, list) or len(verbalizers) != len(labels):
        raise TaskError(
            f"{where}: task {name!r} field {key!r} must have one list of words per class ({len(labels)}), "
            f"got {verbalizers!r:.200}."
        )
    for c, words in enumerate(verbalizers):
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
            raise TaskError(f"{where}: task {name!r} {key}[{c}] ({labels[c]}) must be a non-empty list of words.")
    _template_fields(entry["template"], f"{where}: task {name!r}")
    lmbda = entry.get("lmbda")
    return {"labels": [str(x) for x in labels], "verbalizers": verbalizers, "lmbda": lmbda}


def read_records(path: Path, fields: set[str], n_classes: int) -> list[dict]:
    """Every line of a task JSONL file, checked: JSON object, id/input/label present, label in range, fields there,
    ids unique."""
    if not path.is_file():
        raise TaskError(f"{wrong_path(path, 'task file', want_dir=False)}.")
    records, seen = [], {}  # id -> its line: a repeated id would be scored (and its example counted) twice
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskError(f"{where}: not a JSON object ({err}).") from err
            if not isinstance(rec, dict):
                raise TaskError(f"{where}: a record must be a JSON object, got {type(rec).__name__}.")
            missing = [k for k in RECORD_KEYS if k not in rec]
            if missing:
                raise TaskError(f"{where}: record has no {missing[0]!r} field (needs id, input, label).")
            if not isinstance(rec["input"], dict):
                raise TaskError(f"{where}: field 'input' must be an object of template fields.")
            absent = sorted(fields - set(rec["input"]))
            if absent:
                raise TaskError(f"{where}: field 'input' lacks {absent[0]!r}, which the template uses.")
            label = rec["label"]
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < n_classes:
                raise TaskError(f"{where}: field 'label' is {label!r}, not a class index in 0..{n_classes - 1}.")
            key = json.dumps(rec["id"])
            if key in seen:
                raise TaskError(f"{where}: id {rec['id']!r} is the id of line {seen[key]} too; ids must be unique.")
            seen[key] = lineno
            records.append(rec)
    if not records:
        raise TaskError(f"task file {path} holds no records.")
    return records


def _task(name: str, entry: dict, where: str, test: Path, dev: Path | None, verbalizer_set: str) -> Task:
    checked = _check_entry(name, entry, where, verbalizer_set)
    fields = _template_fields(entry["template"], where)
    n = len(checked["labels"])
    splits = {"test": read_records(test, fields, n)}
    files = {"test": str(test)}
    if dev is not None:
        splits["dev"] = read_records(dev, fields, n)
        files["dev"] = str(dev)
    return Task(name, entry["template"], entry["domain_premise"], checked["labels"], checked["verbalizers"], splits,
                files, checked["lmbda"])  # fmt: skip


def _from_folder(folder: Path, names, verbalizer_set: str) -> list[Task]:
    spec = folder / "tasks.json"
    if not spec.is_file():
        raise TaskError(f"{folder} has no tasks.json (a task folder holds tasks.json and <task>/test.jsonl).")
    entries = _parsed(spec, json.loads, "JSON")
    tasks = []
    for name in [n for n in names if n in entries] if names else list(entries):
        dev = folder / name / "dev.jsonl"
        test = folder / name / "test.jsonl"
        tasks.append(_task(name, entries[name], str(spec), test, dev if dev.is_file() else None, verbalizer_set))
    return tasks


def _parsed(path: Path, load, form: str) -> dict:
    """A task file's mapping of task names to entries; a file that does not parse, or holds something else, is
    refused naming it (not a parser's traceback)."""
    try:
        entries = load(path.read_text(encoding="utf-8"))
    except Exception as err:  # json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError
        raise TaskError(
            f"{path} is not valid {form} ({err}); fix the file (a task file maps task names to entries)."
        ) from None
    if not isinstance(entries, dict) or not entries:
        raise TaskError(f"{path}: expected a mapping of task names to task entries.")
    return entries


def _from_yaml(path: Path, names, verbalizer_set: str) -> list[Task]:
    import yaml

    entries = _parsed(path, yaml.safe_load, "YAML")
    tasks = []
    for name in [n for n in names if n in entries] if names else list(entries):
        entry = entries[name]
        if not isinstance(entry, dict) or "test" not in entry:
            raise TaskError(f"{path}: task {name!r} has no 'test' field (the path of its test JSONL).")
        dev = None if entry.get("dev") is None else path.parent / entry["dev"]
        tasks.append(_task(str(name), entry, str(path), path.parent / entry["test"], dev, verbalizer_set))
    return tasks


def load_tasks(specs, names=None, verbalizer_set: str = "fuzzy") -> list[Task]:
    """Tasks from folders (``tasks.json``) and/or YAML files, all checked; ``names`` selects tasks by name.

    ``verbalizer_set``: ``fuzzy`` (kNN-Prompt's lists, ``verbalizers``) or ``primary`` (one word per class).
    """
    if verbalizer_set not in ("fuzzy", "primary"):
        raise TaskError(f"verbalizer_set must be 'fuzzy' or 'primary', got {verbalizer_set!r}.")
    specs = [specs] if isinstance(specs, (str, Path)) else list(specs)
    tasks: list[Task] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = _from_folder(path, names, verbalizer_set)
        elif path.is_file():
            found = _from_yaml(path, names, verbalizer_set)
        else:
            raise TaskError(f"tasks {path}: neither a task folder (with tasks.json) nor a YAML task file.")
        tasks += found
    seen = [t.name for t in tasks]
    dup = sorted({n for n in seen if seen.count(n) > 1})
    if dup:
        raise TaskError(f"task {dup[0]!r} is defined twice in {specs}.")
    missing = sorted(set(names or ()) - set(seen))
    if missing:
        raise TaskError(f"no task {missing[0]!r} in {', '.join(map(str, specs))}.")
    return tasks


def single_token_verbalizers(task: Task, tokenizer, tokenizer_label: str = "the tokenizer") -> list[list[int]]:
    """Token ids of each class's single-token verbalizers, as kNN-Prompt's score.py keeps them.

    A word is kept when it is one token (``add_special_tokens=False``: a BOS would make every word two). Dropped
    words are named in a warning (score.py drops them silently); a class left with none is a :class:`TaskError`.
    """
    ids, dropped = [], []
    for c, words in enumerate(task.verbalizers):
        kept = []
        for w in words:
            toks = tokenizer(w, add_special_tokens=False)["input_ids"]
            if len(toks) == 1:
                kept.append(int(toks[0]))
            else:
                dropped.append(w)
        if not kept:
            raise TaskError(
                f"task {task.name!r}: class {c} ({task.labels[c]}) has no single-token verbalizer under "
                f"{tokenizer_label} (its words {words!r:.200} are all several tokens); give single-token words."
            )
        ids.append(kept)
    if dropped:
        warnings.warn(
            f"task {task.name!r}: {len(dropped)} multi-token verbalizers dropped under {tokenizer_label} "
            f"(kNN-Prompt scores single tokens only): {', '.join(repr(w) for w in dropped)}",
            stacklevel=2,
        )
    glued = [w for words in task.verbalizers for w in words if not w[:1].isspace()]
    # either glues: the template's prompts give p(y | x), the premise's the PMI's denominator p(y | premise)
    ends = [what for what, text in (("template", task.template), ("domain premise", task.domain_premise))
            if not text[-1:].isspace()]  # fmt: skip
    if glued and ends:
        warnings.warn(
            f"task {task.name!r}: {len(glued)} verbalizers have no leading space ({', '.join(map(repr, glued[:5]))}"
            f"{', …' if len(glued) > 5 else ''}), and the {' and the '.join(ends)} end without one: each is scored "
            "there as the end of the last word, not as a word of its own (kNN-Prompt's verbalizers start with a "
            "space).",
            stacklevel=2,
        )
    return ids


def knn_prompt_sample(records: list[dict], n_sample: int | None) -> list[dict]:
    """kNN-Prompt's subsample (``random.seed(0); shuffle; random.sample(range(n), n_sample)``); None keeps all."""
    if n_sample is None or n_sample >= len(records):
        return list(records)
    rng = random.Random(0)
    shuffled = list(records)
    rng.shuffle(shuffled)
    return [shuffled[i] for i in rng.sample(range(len(shuffled)), n_sample)]
