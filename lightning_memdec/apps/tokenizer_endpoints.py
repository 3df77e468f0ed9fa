"""vLLM's tokenizer endpoints (``/tokenize``, ``/detokenize``, ``/tokenizer_info``) for ``memdec serve``.

Clients that tokenize on the server's side use them: lm-evaluation-harness's ``local-completions`` model finds them
and then needs no local copy of the tokenizer. The bodies are vLLM's; no model is involved.
"""

from __future__ import annotations

from lightning_memdec.apps.openai_protocol import RequestError, ServedModel, check_prompt_size, text_bytes


def tokenize(body: dict, served: ServedModel) -> dict:
    """``{"prompt": str, "add_special_tokens": bool = true}`` → ``{"tokens", "count", "max_model_len"}``."""
    prompt, special = body.get("prompt"), body.get("add_special_tokens", True)
    if not isinstance(prompt, str):
        raise RequestError(400, f"prompt must be a string, got {type(prompt).__name__}.", "prompt")
    if not isinstance(special, bool):
        raise RequestError(400, f"add_special_tokens must be true or false, got {special!r}.", "add_special_tokens")
    check_prompt_size(len(text_bytes(prompt, "prompt")), served)
    tokens = served.tokenizer(prompt, add_special_tokens=special).input_ids
    return {"tokens": tokens, "count": len(tokens), "max_model_len": served.context}


def detokenize(body: dict, served: ServedModel) -> dict:
    """``{"tokens": [int, …]}`` → ``{"prompt": str}`` (special tokens kept, as vLLM's)."""
    tokens, vocab = body.get("tokens"), len(served.tokenizer)
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise RequestError(400, f"tokens must be a list of token ids, got {tokens!r:.80}.", "tokens")
    if not all(0 <= t < vocab for t in tokens):
        raise RequestError(400, f"tokens must lie in [0, {vocab}).", "tokens")
    return {"prompt": served.tokenizer.decode(tokens)}


def tokenizer_info(served: ServedModel) -> dict:
    """The tokenizer's class, special tokens, chat template and context."""
    tokenizer = served.tokenizer
    return {
        "tokenizer_class": type(tokenizer).__name__,
        "eos_token": tokenizer.eos_token,
        "bos_token": tokenizer.bos_token,
        "pad_token": tokenizer.pad_token,
        "unk_token": tokenizer.unk_token,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "model_max_length": served.context,
        "vocab_size": len(tokenizer),
    }
