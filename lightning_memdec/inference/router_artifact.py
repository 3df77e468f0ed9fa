"""A router on disk: ``router.safetensors`` + ``meta.json`` (what it reads, whose base and decoder, its threshold).

A router's λ only means something for the base whose hidden states it reads and the decoder it weighs, so its
meta.json records both models' content hashes (:func:`hf.loading.model_fingerprint`) and the tokenizer's
fingerprint; loading it for another pair is refused before any model runs. Weights are safetensors: no pickle.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from lightning_memdec.hf.loading import model_identity
from lightning_memdec.inference.router import FEATURES, Router
from lightning_memdec.io.artifact_dirs import ArtifactError, base_meta, read_meta

__all__ = ["WEIGHTS", "router_meta", "save_router_weights", "load_router", "check_router_models"]

WEIGHTS = "router.safetensors"


def router_meta(router: Router, base, memdec, tokenizer: dict, training: dict[str, Any]) -> dict[str, Any]:
    """The meta.json of a router fitted for ``base`` + ``memdec`` (tokenizer as ``tokenizer_info`` gives it)."""
    return base_meta(
        "router",
        features=list(FEATURES),
        hidden_size=router.hidden_size,
        width=router.width,
        threshold=router.threshold,
        base=model_identity(base),
        memdec=model_identity(memdec),
        tokenizer=tokenizer,
        training=training,
    )


def save_router_weights(router: Router, directory: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in router.state_dict().items()}, str(directory / WEIGHTS))


def check_router_models(meta: dict, where, base, memdec, tokenizer_fingerprint: str | None = None) -> None:
    """Refuse a router fitted for another base, decoder or tokenizer (compared by content hash)."""
    for side, model, flag in (("base", base, "--base"), ("memdec", memdec, "--memdec")):
        recorded, actual = meta[side], model_identity(model)
        if recorded.get("model_sha256") is None or actual["model_sha256"] is None:
            warnings.warn(f"the router {where}'s {side} cannot be verified (no model hash on one side).", stacklevel=3)
        elif recorded["model_sha256"] != actual["model_sha256"]:
            raise ArtifactError(
                f"the router {where} was fitted for {side} {recorded['name']} (sha {recorded['model_sha256']}), not "
                f"{actual['name']} (sha {actual['model_sha256']}); fit one for this pair with `memdec fit-router "
                f"{flag} {actual['name']} …`."
            )
    recorded_tok = meta["tokenizer"].get("fingerprint")
    if tokenizer_fingerprint is not None and recorded_tok != tokenizer_fingerprint:
        raise ArtifactError(
            f"the router {where} was fitted with tokenizer {meta['tokenizer'].get('name')} (fp {recorded_tok[:8]}…), "
            f"not this one (fp {tokenizer_fingerprint[:8]}…); fit a router with the models' tokenizer."
        )


def load_router(path: str | Path, base=None, memdec=None, tokenizer_fingerprint: str | None = None) -> Router:
    """A saved router, checked against the base/decoder (refs or models) it is about to serve when given."""
    meta = read_meta(path, kind="router")
    if tuple(meta.get("features", ())) != FEATURES:
        raise ArtifactError(
            f"the router {path} reads features {meta.get('features')}, this version computes {list(FEATURES)}; "
            "fit it again with `memdec fit-router`."
        )
    if base is not None and memdec is not None:
        check_router_models(meta, path, base, memdec, tokenizer_fingerprint)
    router = Router(int(meta["hidden_size"]), int(meta["width"]), float(meta["threshold"]))
    router.load_state_dict(load_file(str(Path(path) / WEIGHTS)))
    return router.eval()
