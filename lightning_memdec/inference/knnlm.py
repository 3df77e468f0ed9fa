"""The kNN-LM baseline (Khandelwal et al., 2020) as the paper evaluates it: a base LM + live datastore retrieval.

    p(y | x) = (1 − λ)·p_base(y | x) + λ·p_kNN(y | x)

the mixture the Memory Decoder replaces (see :mod:`lightning_memdec.inference.interpolated_lm`). The maths (p_kNN, gold
log-probs, the mixture) lives in :mod:`lightning_memdec.kernels.scoring`; this module does the retrieval and checks
that the base LM is the one that built the datastore. Like interpolate.py it does not import Lightning.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel

from lightning_memdec.hf.loading import (
    cache_arg_name,
    causal_lm,
    check_fits_context,
    check_token_ids,
    find_tokenizer,
    forward_params,
    model_identity,
    output_rows,
    position_ids_from_mask,
    resolve_model,
    tokenizer_name,
)
from lightning_memdec.io.settings import check_positive
from lightning_memdec.io.tokenizer_identity import (
    check_head_covers_vocab,
    check_same_tokenizer,
    describe_tokenizer,
    tokenizer_info,
)
from lightning_memdec.kernels.scoring import (
    check_lmbda,
    gold_log_probs,
    knn_gold_log_probs,
    knn_scores,
    mix_log_probs,
    vocab_log_probs,
    vocab_logits,
)

__all__ = ["KNNLM"]


def _key_dim(model: PreTrainedModel, capture) -> int:
    """Width of the key layer's output, from a two-token forward pass of the transformer body."""
    from lightning_memdec.hf.key_capture import body

    with torch.no_grad(), capture.capturing() as cap:
        body(model)(input_ids=torch.zeros(1, 2, dtype=torch.long, device=model.device), use_cache=False)
    return int(cap.value.shape[-1])


def _check_same_weights(base, meta: dict, where: str) -> None:
    """The base's weights must be those that built the datastore (its recorded ``model_sha256``): a model replaced
    at the same path passes every name and shape check, but its queries would search another model's keys. A base
    of another name is only warned about where no hash vouches for it (the same weights may be saved elsewhere)."""
    recorded, actual = meta.get("model_sha256"), model_identity(base)["model_sha256"]
    if recorded is not None and actual is not None and recorded != actual:
        raise ValueError(
            f"{where} was built with {meta['model']} (sha {recorded}), but the base LM {base.name_or_path} has other "
            f"weights (sha {actual}): rebuild the datastore with this base, or load the model that built it."
        )
    if recorded is not None and actual == recorded:  # the same weights, in whatever folder: nothing to warn about
        return
    name = str(getattr(base, "name_or_path", "") or "")
    if name and Path(name).name != Path(resolve_model(meta["model"])).name:  # embedded:base-small is base-small
        warnings.warn(
            f"{where} was built with {meta['model']}, but the base LM is {name}: keys only match when the weights do.",
            stacklevel=3,
        )


class KNNLM(torch.nn.Module):
    """The kNN-LM baseline (Khandelwal et al., 2020) as the paper evaluates it: base LM + live datastore retrieval.

    p(y | x) = (1 − λ)·p_base(y | x) + λ·p_kNN(y | x), with p_kNN(y) = Σ_{j: v_j = y} softmax_j(−d_j / T) over the
    k nearest datastore keys (squared L2), queried with the base's own hidden state at the datastore's key layer.

    Args:
        base: the base LM that built the datastore (``PreTrainedModel`` or name/path).
        datastore: datastore directory (or an opened ``Datastore``).
        index: index directory over that datastore (or an opened ``KeyIndex``); not needed with ``search="exact"``.
        k: neighbours per query (paper: 1024); capped at the datastore size.
        temperature: T of the softmax over −distances (paper: 16).
        lmbda: the kNN weight λ ∈ [0, 1].
        exact_distances: recompute fp32 distances from the stored keys (IVF-PQ distances are approximate).
        tokenizer: the base's tokenizer, when its directory has none (checked against the datastore's).
        nprobe: IVF lists visited per query (default: the index's meta.json).
        search: ``"faiss"`` (the index: FAISS on the host, or a cuVS index on its GPU) or ``"exact"``: every key by
            blocked matrix products on the base's device (:func:`~retrieval.exact_search.exact_search`), the keys
            resident there when they fit (on a GPU the fast kNN-LM without any index; on a CPU only for small
            stores); distances are exact.
        **load_kwargs: ``from_pretrained`` arguments for a base given by name/path.
    """

    def __init__(
        self,
        base: PreTrainedModel | str | Path,
        datastore,
        index=None,
        k: int = 1024,
        temperature: float = 16.0,
        lmbda: float = 0.25,
        exact_distances: bool = False,
        tokenizer=None,
        nprobe: int | None = None,
        search: str = "faiss",
        **load_kwargs,
    ):
        super().__init__()
        from lightning_memdec.hf.key_capture import KeyCapture

        self._lmbda = check_lmbda(lmbda)
        check_positive("k (neighbours per query)", k, whole=True)
        check_positive("temperature", temperature)
        base_ref = base
        base = causal_lm(base_ref, "base", **load_kwargs)
        from lightning_memdec.io.readers import Datastore, check_index_matches
        from lightning_memdec.retrieval.faiss_index import KeyIndex

        if search not in ("faiss", "exact"):
            raise ValueError(f"search must be 'faiss' or 'exact', got {search!r}.")
        if search == "faiss" and index is None:
            raise ValueError("search='faiss' needs index= (an index over the datastore); or use search='exact'.")
        self.search = search
        self.store = Datastore(datastore) if isinstance(datastore, (str, Path)) else datastore
        self.key_index = None
        if search == "faiss":
            on = base.device.index if base.device.type == "cuda" else None  # a cuVS index: the base's GPU
            self.key_index = KeyIndex(index, nprobe=nprobe, device=on) if isinstance(index, (str, Path)) else index
        meta = self.store.meta
        where = f"datastore {self.store.dir}"
        if self.key_index is not None:
            check_index_matches(self.key_index.dir, self.key_index.meta, self.store)
        self.vocab = self._check_tokenizer(base_ref, base, tokenizer, meta, where)
        base_type = getattr(base.config, "model_type", None)
        if meta.get("model_type") is not None and base_type != meta["model_type"]:
            raise ValueError(
                f"{where} was built with a {meta['model_type']!r} model ({meta['model']}), but the base LM "
                f"{base.name_or_path or type(base).__name__} is a {base_type!r}; kNN-LM queries must come from the "
                "model that built the datastore."
            )
        self.capture = KeyCapture(base, meta["layer"])
        dim = _key_dim(base, self.capture)
        if dim != meta["dim"]:
            raise ValueError(
                f"{where} holds {meta['dim']}-dim keys from layer {meta['layer']} of "
                f"{meta['model']}, but that layer of "
                f"the base LM {base.name_or_path or type(base).__name__} gives {dim}-dim keys; use the base that "
                "built the datastore (or build a datastore with this base)."
            )
        _check_same_weights(base, meta, where)
        self.base = base.eval()
        self.k = int(min(k, meta["num_entries"]))
        self.temperature = float(temperature)
        self.exact_distances = bool(exact_distances)
        self.values = np.asarray(self.store.values)  # int32, 4 bytes an entry: read once, gathered per query
        self.device_keys: torch.Tensor | None = None  # search="exact": the keys on the base's device, once
        self.device_norms: torch.Tensor | None = None  # and their ‖k‖²
        self.search_bytes: int | None = None  # and the exact search's memory budget, read once with them
        self.device_values: torch.Tensor | None = None  # the values as a tensor where the search runs

    @staticmethod
    def _check_tokenizer(base_ref, base, tokenizer, meta: dict, where: str) -> int:
        """The base must number tokens like the datastore's values do; returns the shared vocabulary size."""
        expected = meta["tokenizer"]
        tok = tokenizer if tokenizer is not None else find_tokenizer(base_ref, base)
        rows = output_rows(base)
        if tok is not None:
            info = tokenizer_info(tok, tokenizer_name(tok, "base"))
            check_same_tokenizer(expected, where, info, "the base LM", "use the base (and tokenizer) that built it")
        else:
            warnings.warn(
                f"the base LM has no tokenizer to check against {where}'s ({describe_tokenizer(expected)}); "
                "pass tokenizer= to verify.",
                stacklevel=3,
            )
        vocab_what = f"{where}'s tokenizer {describe_tokenizer(expected)}"
        check_head_covers_vocab(rows, "the base LM", expected["vocab_size"], vocab_what, "use a base of that tokenizer")
        return int(expected["vocab_size"])

    @property
    def lmbda(self) -> float:
        return self._lmbda

    @lmbda.setter
    def lmbda(self, value: float) -> None:
        self._lmbda = check_lmbda(value)

    @property
    def device(self) -> torch.device:
        return self.base.device

    # -- pieces ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def base_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Base logits ``[B, T, V]`` (sliced to the shared vocabulary) and query keys ``[B, T, d]`` in one pass."""
        check_token_ids(input_ids)
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        with self.capture.capturing() as cap:
            out = self.base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask, input_ids.shape[1]),
                use_cache=False,
                return_dict=True,
            )
        return vocab_logits(out.logits, self.vocab), cap.value

    def neighbours(self, keys: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Squared L2 distances ``[n, k]`` float64 (+inf for a missing neighbour) and their tokens ``[n, k]``, on the
        host (the gold-token scoring path, float64)."""
        dist, tokens = self.device_neighbours(keys, torch.device("cpu"))
        return dist.double().numpy(), tokens.numpy()

    def device_neighbours(self, keys: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances ``[n, k]`` (float32 from a search on ``device``, float64 from FAISS; +inf for a missing
        neighbour) and their tokens ``[n, k]`` int64, both on ``device``.

        Exact search stays where it ran (the base's device), and so does a cuVS index's search (its GPU): ids, values
        and distances never visit the host. A FAISS search runs on the host; its results are moved once.
        """
        if self.search == "exact":
            dist, ids = self._exact_neighbours(keys)
            return dist.to(device), self._tokens_of(ids).to(device)
        queries = keys.detach().reshape(-1, keys.shape[-1])
        dist, ids = self.key_index.search_tensors(queries, self.k)  # on the index's device
        if self.exact_distances:
            from lightning_memdec.retrieval.exact_search import exact_distances

            dist = exact_distances(queries.to(ids.device, torch.float32), self.store.keys, ids)
        dist = dist.double().masked_fill_(ids < 0, float("inf"))  # FAISS's −1: no neighbour, weight 0
        return dist.to(device), self._tokens_of(ids.clamp(min=0)).to(device)

    def _tokens_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The values (next tokens) of datastore entries ``ids``, int64 on the ids' device, gathered by torch
        indexing, so that a step never reads back to the host (a captured CUDA graph could not). On an accelerator
        the values (int32, 4 bytes an entry) are copied there once; on the CPU they are the store's memmap itself,
        paged in as read, never copied or written."""
        if self.device_values is None or self.device_values.device != ids.device:
            if ids.device.type == "cpu":
                with warnings.catch_warnings():  # torch warns that the memmap is read-only: it is only read
                    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                    self.device_values = torch.from_numpy(self.values)
            else:
                self.device_values = torch.from_numpy(np.array(self.values, dtype=np.int32)).to(ids.device)
        return self.device_values[ids].long()

    def place_keys(self, device: torch.device | str) -> bool:
        """For exact search: the keys copied onto ``device`` once with their ‖k‖², if they fit there
        (:func:`~lightning_memdec.retrieval.exact_search.resident_keys`); returns whether they are resident. The
        search's memory budget is read then too: every token searches the same blocks, and a step captured as a
        CUDA graph (``StaticGenerator.from_knnlm``) reads no device memory figures."""
        from lightning_memdec.retrieval.exact_search import resident_keys, squared_norms
        from lightning_memdec.retrieval.search_budget import memory_budget

        device = torch.device(device)
        if self.device_keys is None or self.device_keys.device != device:
            self.device_keys = resident_keys(self.store.keys, device)
            self.device_norms = None if self.device_keys is None else squared_norms(self.device_keys)
            self.search_bytes = memory_budget(device)
        return self.device_keys is not None

    def _exact_neighbours(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from lightning_memdec.retrieval.exact_search import exact_search

        stored = self.device_keys if self.place_keys(keys.device) else self.store.keys  # else streamed from the host
        queries = keys.detach().reshape(-1, keys.shape[-1])
        # complete_ties off: a decoding step never reads back to the host (StaticGenerator captures it as a CUDA
        # graph); keys tied at the k-th distance weigh the same, so only which of their tokens get it is arbitrary
        return exact_search(
            queries, stored, self.k, device=keys.device, memory_bytes=self.search_bytes, key_norms=self.device_norms,
            complete_ties=False,
        )  # fmt: skip

    def knn_gold_log_probs(self, keys: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        """log p_kNN(gold) ``[n]`` float64: the weight of the neighbours whose value is the gold token (no [n, V])."""
        dist, tokens = self.neighbours(keys)
        return knn_gold_log_probs(dist, tokens == gold.reshape(-1, 1).cpu().numpy(), self.temperature)

    def knn_log_probs(self, keys: torch.Tensor) -> torch.Tensor:
        """Dense log p_kNN ``[n, V]`` float32 (−inf off the neighbours' tokens), built on the keys' device: on a GPU
        the ``[n, V]`` row is never made on the host and copied (weights in float64, as on the host)."""
        return self.knn_log_probs_at(keys, [self.temperature])[0]

    def knn_log_probs_at(self, keys: torch.Tensor, temperatures) -> list[torch.Tensor]:
        """:meth:`knn_log_probs` at each of ``temperatures`` from one search: only the softmax over the same
        distances changes, so choosing T on a dev split costs no extra search."""
        dist, tokens = self.device_neighbours(keys, keys.device)
        dist, out = dist.double(), []
        for t in temperatures:
            weights = torch.softmax(knn_scores(dist, float(t)), dim=-1)  # [n, k]
            probs = torch.zeros(tokens.shape[0], self.vocab, dtype=torch.float32, device=keys.device)
            out.append(probs.scatter_add_(1, tokens, weights.float()).log_())
        return out

    # -- the mixture -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def log_probs(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mixed next-token log-probabilities ``[B, T, V]`` (float32); padded positions keep the base's."""
        logits, keys = self.base_forward(input_ids, attention_mask)
        base_lp = vocab_log_probs(logits, self.vocab)
        if self.lmbda == 0.0:
            return base_lp
        if attention_mask is None:  # every position is real: no masked copies of [B, T, V] tensors
            knn = self.knn_log_probs(keys.reshape(-1, keys.shape[-1])).to(base_lp.device)
            return mix_log_probs(base_lp, knn.view_as(base_lp), self.lmbda)
        real = attention_mask.to(base_lp.device).bool()
        knn = self.knn_log_probs(keys[real]).to(base_lp.device)
        out = base_lp.clone()
        out[real] = mix_log_probs(base_lp[real], knn, self.lmbda)
        return out

    forward = log_probs

    @torch.no_grad()
    def generate_greedy(self, input_ids: torch.LongTensor, max_new_tokens: int) -> torch.LongTensor:
        """Greedy decoding from the mixture with the base's KV cache: one base step and one retrieval per token.

        Rows are continued independently (no padding, no early stop), as a latency baseline; λ = 0 skips retrieval.
        """
        check_token_ids(input_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a whole number ≥ 0, got {max_new_tokens!r}.")
        check_fits_context(input_ids.shape[-1] + max_new_tokens, self.base, "the base LM", "prompt + max_new_tokens")
        cache_arg = cache_arg_name(self.base)
        # only the last position's logits, as generate() does: the prompt's pass would otherwise build [B, T, V]
        last_only = {"logits_to_keep": 1} if "logits_to_keep" in forward_params(self.base) else {}
        ids = input_ids.to(self.device)
        step, cache = ids, None
        for _ in range(max_new_tokens):
            with self.capture.capturing() as cap:
                out = self.base(input_ids=step, use_cache=True, return_dict=True, **{cache_arg: cache}, **last_only)
            cache = getattr(out, cache_arg)
            log_probs = vocab_log_probs(out.logits[:, -1], self.vocab)
            if self.lmbda > 0.0:
                knn = self.knn_log_probs(cap.value[:, -1]).to(log_probs.device)
                log_probs = mix_log_probs(log_probs, knn, self.lmbda)
            step = log_probs.argmax(-1, keepdim=True)
            ids = torch.cat([ids, step], dim=1)
        return ids

    @torch.no_grad()
    def gold_log_probs(
        self, input_ids: torch.LongTensor, labels: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-position log-probabilities of the gold next tokens, for perplexity, without any dense kNN tensor.

        ``labels[b, t]`` is the token that follows position ``t`` (already shifted); −100 (or a padded position)
        skips it: no retrieval, 0 in every output. Returns float64 ``[B, T]`` tensors on the CPU: ``base``,
        ``knn`` (p_kNN alone, may be −inf) and ``mix`` (at the current λ).
        """
        logits, keys = self.base_forward(input_ids, attention_mask)
        labels = labels.to(logits.device)
        scored = labels != -100
        if attention_mask is not None:
            scored &= attention_mask.to(logits.device).bool()
        base = gold_log_probs(logits, labels.masked_fill(~scored, -100), self.vocab).double().cpu()
        scored = scored.cpu()
        knn = torch.zeros_like(base)
        if scored.any():
            knn[scored] = self.knn_gold_log_probs(keys[scored.to(keys.device)], labels.cpu()[scored])
        mix = mix_log_probs(base, knn, self.lmbda).masked_fill(~scored, 0.0)
        return {"base": base, "knn": knn, "mix": mix}
