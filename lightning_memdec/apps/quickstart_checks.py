"""What ``memdec quickstart`` can refuse before it tokenizes or trains anything: its numbers, --out, and a --window
longer than a base's context.

Called with the application's arguments as one dict (its ``locals()`` once the bases are known), so its signature
can change without this module; an argument it does not know is ignored.
"""

from __future__ import annotations

import math

from lightning_memdec.hf.loading import check_fits_context, model_config
from lightning_memdec.io.artifact_dirs import check_writable_dir

POSITIVE_INTEGERS = ("window", "batch_size", "k", "general_tokens", "domain_tokens", "valid_tokens", "test_tokens",
                     "small_base_steps", "large_base_steps", "teacher_steps", "memdec_steps")  # fmt: skip
POSITIVE_NUMBERS = ("teacher_lr", "decoder_lr")


def check_quickstart_args(args: dict) -> None:
    """Refuse a non-positive count or learning rate, a --beta outside [0, 1], an --out that is a file or cannot be
    written, and a --window longer than the context of a given base or teacher (``refs``: the bases' references)."""
    for name in POSITIVE_INTEGERS:
        value = args.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"--{name} must be a positive integer, got {value!r}; give --{name} 1 or more.")
    for name in POSITIVE_NUMBERS:
        value = args.get(name)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"--{name} must be a finite number > 0, got {value!r}.")
    beta = args.get("beta")
    if beta is not None and not 0 <= beta <= 1:
        raise ValueError(f"--beta (the KL weight of the Memory Decoder loss) must be in [0, 1], got {beta!r}.")
    check_writable_dir(args["out"], "--out")
    window = args.get("window")
    for ref in [*(args.get("refs") or []), *([args["teacher"]] if args.get("teacher") else [])]:
        check_fits_context(window, model_config(ref), ref, "--window")
