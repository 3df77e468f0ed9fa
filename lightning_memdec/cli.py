"""The ``memdec`` console script: training through LightningCLI, pipeline stages as typed functions.

``memdec fit|validate|test --config …`` is the LightningCLI of :mod:`lightning_memdec.training.fit` (OmegaConf
interpolation on, configs composed by repeated ``--config``, packaged configs found by name); every other
subcommand is a pipeline stage whose flags come from its function signature.
"""

from __future__ import annotations

import ast
import difflib
import errno
import importlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# what the package raises for a user's mistake, its message saying what to fix
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ImportError)

LIGHTNING_COMMANDS = {
    "fit": "train the Memory Decoder (or a base LM with model.beta 0) with LightningCLI",
    "validate": "validation loss/perplexity of a decoder checkpoint (--ckpt_path)",
    "test": "test loss/perplexity (data.test_corpus) of a decoder checkpoint (--ckpt_path)",
}
# list-valued flags users repeat (`--base a --base b`) or give several values (`--dataset.files a b`), per command;
# jsonargparse appends with `--base+ a`
REPEATABLE_FLAGS = {
    "tokenize": ("--text", "--dataset.files"),
    "quickstart": ("--base",),
    "evaluate": ("--bases", "--knn.datastore", "--knn.index"),
    "downstream": ("--tasks", "--bases", "--knn.datastore", "--knn.index", "--prompts.task_names"),
    "pretrain-bases": ("--extra_text", "--sizes"),
}


def repeatable(args: list[str]) -> list[str]:
    """Turn each `--flag v1 [v2 …]` of the command's repeatable list flags into jsonargparse's `--flag+ v1 --flag+ v2`
    (the first value is always the flag's; more follow up to the next `-…` argument; a JSON list `[a,b]` is kept)."""
    flags = REPEATABLE_FLAGS.get(args[0], ()) if args else ()
    out, i = [], 0
    while i < len(args):
        flag, i = args[i], i + 1
        values = []
        if flag in flags and i < len(args) and not args[i].startswith("["):
            values, i = [args[i]], i + 1
            while i < len(args) and not args[i].startswith("-"):
                values, i = values + [args[i]], i + 1
        out += [x for v in values for x in (f"{flag}+", v)] or [flag]
    return out


# each pipeline command and the function behind it ("module:function"), imported only when the command runs: the
# modules behind training and retrieval import Lightning and torch (seconds), which `memdec tokenize` or
# `memdec configs` never need
STAGES = {
    "tokenize": "lightning_memdec.io.token_corpus:tokenize",
    "build-datastore": "lightning_memdec.stages.datastore:build_datastore",
    "build-index": "lightning_memdec.retrieval.faiss_index:build_index",
    "build-index-sharded": "lightning_memdec.stages.index_shards:build_index_sharded",
    "build-targets": "lightning_memdec.stages.targets:build_targets",
    "import-official": "lightning_memdec.stages.official_import:import_official",
    "quickstart": "lightning_memdec.apps.quickstart:quickstart",
    "evaluate": "lightning_memdec.evaluation.evaluate:evaluate",
    "fit-router": "lightning_memdec.apps.fit_router:fit_router",
    "downstream": "lightning_memdec.evaluation.downstream:downstream",
    "transfer-vocab": "lightning_memdec.training.vocab_transfer:transfer_vocab",
    "pretrain-bases": "lightning_memdec.apps.pretrain_bases:pretrain_bases",
    "serve": "lightning_memdec.apps.serve:serve",
    "configs": "lightning_memdec.io.packaged_configs:configs",
}


def stage_functions(*commands: str) -> dict[str, Callable]:
    """The functions of the named pipeline commands (of all when none is named; unknown names are left out)."""
    functions = {}
    for command in commands or STAGES:
        if command in STAGES:
            module, _, name = STAGES[command].partition(":")
            functions[command] = getattr(importlib.import_module(module), name)
    return functions


def summary(command: str) -> str:
    """The first paragraph of a command's docstring, read from its module's source without importing it."""
    module, _, name = STAGES[command].partition(":")
    source = PACKAGE_DIR.joinpath(*module.split(".")[1:]).with_suffix(".py")  # lightning_memdec.a.b: a/b.py
    tree = ast.parse(source.read_text(encoding="utf-8"))
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name)
    return " ".join((ast.get_docstring(function) or "").split("\n\n")[0].split())  # its first paragraph


def print_help() -> None:
    lines = ["usage: memdec <command> [options]    (memdec <command> --help: the command's options; memdec --version)"]
    lines += [""]
    lines += ["training (LightningCLI; --config takes files or packaged configs, see `memdec configs`):"]
    lines += [f"  {name:<20} {text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines += ["", "pipeline stages and applications:"]
    lines += [f"  {name:<20} {summary(name)}" for name in STAGES]
    print("\n".join(lines))


def main(args: list[str] | None = None) -> None:
    try:
        dispatch(sys.argv[1:] if args is None else list(args))
    except BrokenPipeError:
        # whoever read stdout has gone (`memdec --help | head -3`): stop quietly, as other Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        raise SystemExit(141) from None  # 128 + SIGPIPE, the shell's status for a tool the pipe stopped


def dispatch(raw: list[str]) -> None:
    if not raw or raw[0] in ("-h", "--help"):
        print_help()
        return
    if raw[0] in ("-V", "--version"):
        from lightning_memdec import __version__

        print(f"memdec {__version__}")
        return
    try:
        run_command(raw)
    except KeyboardInterrupt:  # Ctrl-C: one line, not Python's traceback (what was finished is kept either way)
        print(f"memdec {raw[0]}: interrupted (SIGINT).", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except USER_ERRORS as err:
        if not raised_by_package(err):
            raise  # a bug, here or in a library: the whole traceback
        print(f"memdec {raw[0]}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as err:
        if err.errno not in DISK_LIMITS:
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(
            f"memdec {raw[0]}: error: {DISK_LIMITS[err.errno]}{where}. Free space (or raise the limit) and run the "
            "same command again (build-datastore and build-targets resume from their last whole chunk).",
            file=sys.stderr,
        )
        raise SystemExit(1) from None


# a write refused by the disk or a limit: what to tell the user (each ended in a raw traceback but ENOSPC)
DISK_LIMITS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "a file would exceed the largest file size allowed (`ulimit -f`, or the file system's limit)",
}


def run_command(raw: list[str]) -> None:
    if raw[0] in LIGHTNING_COMMANDS:
        from lightning_memdec.training.fit import lightning_cli

        lightning_cli(raw)
        return
    functions = stage_functions(raw[0])
    if not functions:
        raise not_a_command(raw)
    from jsonargparse import CLI, set_parsing_settings

    # the argument groups' field docstrings (``--knn.k``, ``--hardware.devices``, …) are their flags' help
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    # one function, not a subcommand: the usage reads `memdec tokenize [--config CONFIG] …`, as it is typed
    CLI(functions[raw[0]], args=repeatable(raw)[1:], as_positional=False, prog=f"memdec {raw[0]}")


def not_a_command(raw: list[str]) -> SystemExit:
    """The error for a first argument that is no command: the options put first, or a near miss, named."""
    commands = [*LIGHTNING_COMMANDS, *STAGES]
    later = [arg for arg in raw if arg in commands]
    if raw[0].startswith("-") and later:  # `memdec --config x fit`
        return SystemExit(f"memdec: error: the command comes first: memdec {later[0]} {raw[0]} … (memdec --help).")
    close = [] if raw[0].startswith("-") else difflib.get_close_matches(raw[0], commands, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return SystemExit(
        f"memdec: error: {raw[0]!r} is not a command; {hint}choose one of {', '.join(commands)} (memdec --help)."
    )


def raised_by_package(err: BaseException) -> bool:
    """Whether ``err`` comes from one of the package's own checks (its message names the file or setting and the
    fix, so the user needs no traceback), not from deeper code."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


if __name__ == "__main__":
    main()
