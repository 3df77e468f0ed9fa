"""The built wheel, installed outside the repository, carries what an editable install hides if it is missing:
the packaged configs, the embedded models, corpora and tokenizers, and the console script."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

import lightning_memdec
from lightning_memdec.io.packaged_configs import packaged_configs

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lightning_memdec"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the build writes build/ and *.egg-info beside them)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(PACKAGE, source / "lightning_memdec", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    build = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(source)]
    subprocess.run(build, check=True, capture_output=True, text=True)
    (built,) = out.glob("lightning_memdec-*.whl")
    return built


def package_files() -> set[str]:
    """The files git tracks under lightning_memdec/, as paths inside the wheel."""
    listed = subprocess.run(["git", "ls-files", "lightning_memdec"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode != 0 or not listed.stdout:
        pytest.skip("not a git checkout: the tracked files are unknown")
    return set(listed.stdout.split())


def test_the_wheel_carries_every_tracked_file_of_the_package(wheel):
    inside = set(zipfile.ZipFile(wheel).namelist())
    tracked = package_files()
    assert tracked - inside == set()
    assert {f"lightning_memdec/conf/{name}" for name in packaged_configs()} <= inside
    assert "lightning_memdec/assets/models/base-small/model.safetensors" in inside
    # the Apache-2.0 text the metadata's license names, and the embedded data's origins and licences
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in inside)
    assert "lightning_memdec/assets/NOTICE.md" in inside
    assert f"lightning_memdec-{lightning_memdec.__version__}-py3-none-any.whl" == wheel.name


def test_the_installed_wheel_runs_outside_the_repository(wheel, tmp_path):
    """In a virtual environment that sees this one's dependencies but not the repository: the console script, a
    packaged config by name and an embedded model all come from the installed copy."""
    env = tmp_path / "venv"
    venv.create(env, system_site_packages=True, with_pip=True)
    python = env / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, text=True)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    code = (
        "import lightning_memdec\n"
        "from lightning_memdec.io.packaged_configs import resolve_config\n"
        "from lightning_memdec.io.embedded import resolve_model\n"
        "print(lightning_memdec.__file__)\n"
        "print(resolve_config('embedded-base-small'))\n"
        "print(resolve_model('embedded:base-small'))\n"
    )
    printed = subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    paths = [Path(line) for line in printed.stdout.splitlines()]
    assert all(path.is_relative_to(site) and path.exists() for path in paths), paths
    script = subprocess.run([str(env / "bin" / "memdec"), "--version"], cwd=tmp_path, capture_output=True, text=True)
    assert script.stdout.strip() == f"memdec {lightning_memdec.__version__}"
