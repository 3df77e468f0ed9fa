"""What ``memdec quickstart`` can refuse before it tokenizes or trains anything, beyond what its budget group
checks itself: --beta, --out, and a --budget.window longer than a base's context."""

from __future__ import annotations

from pathlib import Path

from lightning_memdec.hf.loading import check_fits_context, model_config
from lightning_memdec.io.artifact_dirs import check_writable_dir


def check_quickstart_inputs(out: Path, beta: float, window: int, models: list[str]) -> None:
    """Refuse a --beta outside [0, 1], an --out that is a file or cannot be written, and a window longer than the
    context of any of ``models`` (the bases and the teacher)."""
    if not 0 <= beta <= 1:
        raise ValueError(f"--beta (the KL weight of the Memory Decoder loss) must be in [0, 1], got {beta!r}.")
    check_writable_dir(out, "--out")
    for ref in models:
        check_fits_context(window, model_config(ref), ref, "--budget.window")
