"""The package's public API and the 0.1 module paths kept for one release."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import lightning_memdec
from lightning_memdec import legacy_paths


def test_every_public_name_resolves_to_its_definition():
    for name, module in lightning_memdec.PUBLIC_API.items():
        obj = getattr(lightning_memdec, name)
        assert obj is getattr(importlib.import_module(module), name)
    assert set(lightning_memdec.__all__) == {"__version__", *lightning_memdec.PUBLIC_API}


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lightning_memdec.nope  # noqa: B018


@pytest.mark.parametrize("preset", [None, "0"])
def test_importing_the_package_asks_torch_for_huge_pages_unless_the_user_said(preset):
    """THP_MEM_ALLOC_ENABLE defaults to 1 (torch reads it at its first allocation, after this import); a value in the
    environment is kept."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env |= {"THP_MEM_ALLOC_ENABLE": preset} if preset is not None else {}
    code = "import os, lightning_memdec; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == (preset or "1")


def test_importing_the_package_loads_no_torch():
    """`import lightning_memdec` (and so `memdec --help`) stays cheap: the API loads on first use."""
    code = "import sys, lightning_memdec; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("old", sorted(legacy_paths.OLD_TO_NEW))
def test_old_module_paths_alias_the_new_modules_with_a_warning(old):
    new = importlib.import_module(f"lightning_memdec.{legacy_paths.OLD_TO_NEW[old]}")
    sys.modules.pop(f"lightning_memdec.{old}", None)
    with pytest.warns(DeprecationWarning, match=f"lightning_memdec.{old} moved to {new.__name__}"):
        aliased = importlib.import_module(f"lightning_memdec.{old}")
    assert aliased is new


@pytest.mark.parametrize("name", sorted(set(lightning_memdec.PUBLIC_API) & set(legacy_paths.OLD_TO_NEW)))
def test_an_old_module_path_does_not_hide_the_public_function_of_its_name(name):
    """`evaluate`, `quickstart`, `downstream`: importing the 0.1 module path of that name (as an old config or
    checkpoint does) leaves `lightning_memdec.<name>` the public function; the old path still imports."""
    public = getattr(importlib.import_module(lightning_memdec.PUBLIC_API[name]), name)
    sys.modules.pop(f"lightning_memdec.{name}", None)
    with pytest.warns(DeprecationWarning):
        old = importlib.import_module(f"lightning_memdec.{name}")
    assert getattr(old, name) is public
    assert getattr(lightning_memdec, name) is public
    from lightning_memdec import evaluate, quickstart  # noqa: F401 (a public name, after the old paths)

    assert callable(evaluate) and callable(quickstart)


def test_old_class_paths_in_configs_still_resolve():
    """A 0.1 YAML's `class_path: lightning_memdec.callbacks.CrossModelEval` loads the same class."""
    from jsonargparse import ArgumentParser

    from lightning_memdec.training.callbacks import CrossModelEval

    parser = ArgumentParser()
    parser.add_argument("--cb", type=CrossModelEval)
    sys.modules.pop("lightning_memdec.callbacks", None)
    with pytest.warns(DeprecationWarning):
        cfg = parser.parse_args(
            ["--cb", '{"class_path": "lightning_memdec.callbacks.CrossModelEval", "init_args": {"bases": ["x"]}}']
        )
    assert cfg.cb.class_path.endswith("CrossModelEval")
