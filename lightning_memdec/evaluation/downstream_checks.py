"""What ``memdec downstream`` can refuse before it loads a model, beyond what its argument groups check
themselves: ``--out``, model references that are no model, and kNN-LM datastores that are not one or were built
with another tokenizer than their base's."""

from __future__ import annotations

from pathlib import Path

from lightning_memdec.hf.loading import find_tokenizer, model_config, tokenizer_name
from lightning_memdec.io.artifact_dirs import check_writable_dir, read_meta
from lightning_memdec.io.embedded import load_tokenizer
from lightning_memdec.io.tokenizer_identity import check_same_tokenizer, tokenizer_info


def check_downstream_inputs(
    out: Path, models: dict[str, list[str]], stores: list[str], indexes: list[str], tokenizer: str | None
) -> None:
    """Refuse an --out that is a file or cannot be written, a model reference that is no model (``models``: flag →
    references, the bases first under ``--bases``), and a datastore / index that is not one, or whose datastore
    was built with another tokenizer than its base's (``stores[i]`` belongs to ``models["--bases"][i]``)."""
    check_writable_dir(out, "--out")
    for flag, refs in models.items():
        for ref in refs:
            try:
                model_config(ref)
            except ValueError as err:
                raise ValueError(f"{flag} {ref}: {err}") from None
    bases = models.get("--bases", [])
    for store, index, ref in zip(stores, indexes, bases):
        meta = read_meta(store, kind="datastore")
        read_meta(index, kind="index")
        if isinstance(meta.get("tokenizer"), dict) and "fingerprint" in meta["tokenizer"]:
            tok = load_tokenizer(tokenizer) if tokenizer else find_tokenizer(ref)
            if tok is not None:
                check_same_tokenizer(
                    meta["tokenizer"], f"--knn.datastore {store}", tokenizer_info(tok, tokenizer_name(tok, ref)),
                    f"its base {ref}", "give the datastore built with this base, in the order of --bases",
                )  # fmt: skip
