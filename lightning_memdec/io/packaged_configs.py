"""The YAML configs shipped inside the package (``lightning_memdec/conf``), addressable after a plain install.

``memdec fit --config trainer/gpu.yaml`` reads ``./trainer/gpu.yaml`` when such a file exists and the
packaged one otherwise; ``memdec configs`` lists what ships. A clone also has them at ``conf/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "conf"


def packaged_configs() -> list[str]:
    """Names (relative to the config root) of every shipped YAML config, sorted."""
    return sorted(p.relative_to(CONFIG_ROOT).as_posix() for p in CONFIG_ROOT.rglob("*.yaml"))


def resolve_config(path: str | Path) -> Path:
    """A local file when it exists, else the packaged config of that name (``conf/`` prefix optional)."""
    local = Path(path)
    if local.is_file():
        return local
    name = local.as_posix().removeprefix("conf/")
    packaged = CONFIG_ROOT / name
    if packaged.is_file():
        return packaged
    raise FileNotFoundError(
        f"config {path} is neither a file nor a packaged config; packaged ones (memdec configs): "
        f"{', '.join(packaged_configs())}."
    )


def describe(name: str) -> str:
    """The first comment line of a packaged config: what it is for."""
    for line in (CONFIG_ROOT / name).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def load_config(*sources: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Compose YAML configs and dicts (later ones win, nested sections merge), interpolations resolved.

    ``load_config("trainer/cpu.yaml", "model/gpt2-small.yaml", {"data": {"train_corpus": ...}})`` gives the
    dict that ``memdec fit --config … --config … --data.train_corpus …`` parses, for :func:`train.fit`.
    """
    from omegaconf import OmegaConf

    parts = [OmegaConf.create(s) if isinstance(s, dict) else OmegaConf.load(resolve_config(s)) for s in sources]
    return OmegaConf.to_container(OmegaConf.merge(*parts), resolve=True)


def configs(show_paths: bool = False) -> list[str]:
    """List the packaged configs (usable as ``memdec fit --config NAME`` from any directory).

    Args:
        show_paths: print each config's path on disk instead of its description.
    """
    names = packaged_configs()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {CONFIG_ROOT / name if show_paths else describe(name)}")
    return names
