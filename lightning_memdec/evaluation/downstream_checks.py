"""What ``memdec downstream`` can refuse before it loads a model: numbers, models, datastores, indexes and ``--out``.

Called with the stage's arguments as one dict (its ``locals()`` on entry), so the stage's signature can change
without this module; an argument it does not know is ignored, one missing is taken as not given.
"""

from __future__ import annotations

from pathlib import Path

from lightning_memdec.hf.loading import find_tokenizer, model_config, tokenizer_name
from lightning_memdec.io.artifact_dirs import check_writable_dir, read_meta
from lightning_memdec.io.embedded import load_tokenizer
from lightning_memdec.io.tokenizer_identity import check_same_tokenizer, tokenizer_info


def check_positive(settings: dict, names: tuple[str, ...]) -> None:
    """Each named setting that is given (not None) must be an integer ≥ 1; the error names its flag."""
    for name in names:
        value = settings.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"--{name} must be a positive integer, got {value!r}; give --{name} 1 or more.")


def as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, (str, Path)) else list(value)


def check_downstream_args(args: dict) -> None:
    """Refuse, before any model is loaded: a non-positive --max_length / --batch_size / --k / --n_sample /
    --general_tokens, an --out that is a file or cannot be written, a model reference that is no model, and a
    --datastore / --index that is not one (or whose datastore was built with another tokenizer than its base's)."""
    check_positive(args, ("max_length", "batch_size", "n_sample", "general_tokens"))
    stores, indexes = as_list(args.get("datastore")), as_list(args.get("index"))
    if stores:
        check_positive(args, ("k",))
    if args.get("bootstrap") is not None and args["bootstrap"] < 0:
        raise ValueError(f"--bootstrap must be 0 or more resamples, got {args['bootstrap']}.")
    check_writable_dir(args["out"], "--out")
    bases = as_list(args.get("bases"))
    for flag, refs in (("--bases", bases), ("--memdec", as_list(args.get("memdec"))),
                       ("--ce_only", as_list(args.get("ce_only")))):  # fmt: skip
        for ref in refs:
            try:
                model_config(ref)
            except ValueError as err:
                raise ValueError(f"{flag} {ref}: {err}") from None
    for i, (store, index) in enumerate(zip(stores, indexes)):
        meta = read_meta(store, kind="datastore")
        read_meta(index, kind="index")
        if i < len(bases) and isinstance(meta.get("tokenizer"), dict) and "fingerprint" in meta["tokenizer"]:
            ref = bases[i]
            tok = load_tokenizer(args["tokenizer"]) if args.get("tokenizer") else find_tokenizer(ref)
            if tok is not None:
                check_same_tokenizer(
                    meta["tokenizer"], f"--datastore {store}", tokenizer_info(tok, tokenizer_name(tok, ref)),
                    f"its base {ref}", "give the datastore built with this base, in the order of --bases",
                )  # fmt: skip
