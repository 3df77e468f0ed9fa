"""The YAML configs shipped inside the package (``lightning_memdec/conf``), addressable after a plain install.

``memdec fit --config hardware/gpu.yaml`` reads ``./hardware/gpu.yaml`` when such a file exists and the
packaged one otherwise; ``memdec configs`` lists what ships. A clone also has them at ``conf/``.
Configs come in groups by concern (hardware, schedule, callbacks, logger, model, data); an experiment
names the groups it builds on in a top-level ``compose:`` list and states only what differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "conf"
COMPOSE_KEY = "compose"
# 0.1's trainer/ group, split by concern in 0.2: the configs that now say the same
SPLIT_TRAINER_CONFIGS = {
    "trainer/cpu.yaml": ["hardware/cpu.yaml", "schedule/short.yaml"],
    "trainer/gpu.yaml": ["hardware/gpu.yaml", "schedule/long.yaml"],
    "trainer/ddp.yaml": ["hardware/ddp.yaml", "schedule/long.yaml"],
    "trainer/ddp_cpu.yaml": ["hardware/ddp_cpu.yaml", "schedule/short.yaml"],
    "trainer/fsdp.yaml": ["hardware/fsdp.yaml", "schedule/long.yaml"],
    "trainer/cross_model_eval.yaml": ["callbacks/cross_model_eval.yaml"],
}


def packaged_configs() -> list[str]:
    """Names (relative to the config root) of every shipped YAML config, sorted."""
    return sorted(p.relative_to(CONFIG_ROOT).as_posix() for p in CONFIG_ROOT.rglob("*.yaml"))


def packaged_named(name: str) -> list[str]:
    """The shipped configs a short name stands for: ``gpt2-wikitext103`` or ``experiments/gpt2-wikitext103``
    for ``experiments/gpt2-wikitext103.yaml`` (the folder and ``.yaml`` may be left out)."""
    stem = name.removesuffix(".yaml")
    return [c for c in packaged_configs() if c.removesuffix(".yaml") == stem or c.endswith(f"/{stem}.yaml")]


def resolve_config(path: str | Path, beside: Path | None = None) -> Path:
    """A local file when it exists, else the packaged config of that name (``conf/`` prefix optional; the folder
    and ``.yaml`` too where the rest names one config).

    Local means beside the config whose ``compose:`` list names ``path`` (``beside``: its folder), else in the
    working directory; a local ``NAME.yaml`` wins over a packaged short name ``NAME``, and a path written ``./…``
    or absolute is local only."""
    local = Path(path) if beside is None else beside / path
    for candidate in (local, local.with_name(f"{local.name}.yaml")) if local.name else (local,):
        if candidate.is_file():
            return candidate
    if Path(path).is_absolute() or str(path).startswith("."):
        raise FileNotFoundError(f"config {path}: no such file ({local.resolve()}).")
    name = Path(path).as_posix().removeprefix("conf/")
    packaged = CONFIG_ROOT / name
    if packaged.is_file():
        return packaged
    named = packaged_named(name)
    if len(named) == 1:
        return CONFIG_ROOT / named[0]
    if named:
        raise FileNotFoundError(f"config {path} could be any of {', '.join(named)}; name one of them.")
    if name in SPLIT_TRAINER_CONFIGS:
        instead = " ".join(f"--config {n}" for n in SPLIT_TRAINER_CONFIGS[name])
        raise FileNotFoundError(f"config {path} was split by concern; use {instead} (memdec configs lists them).")
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


def config_layers(
    path: str | Path, seen: tuple[Path, ...] = (), beside: Path | None = None
) -> list[tuple[Path, dict[str, Any] | None]]:
    """What a config stands for, in merge order: the groups its ``compose:`` list names (each expanded the
    same way), then itself. Each layer is (file, None) for a file to read as it is, or (file, its settings
    without ``compose``) for a file that composes others."""
    from omegaconf import OmegaConf

    file = resolve_config(path, beside)
    if file.resolve() in seen:
        raise ValueError(f"config {file} composes itself (via {' -> '.join(map(str, seen))}); remove the cycle.")
    own = OmegaConf.to_container(OmegaConf.load(file)) or {}
    if not isinstance(own, dict) or COMPOSE_KEY not in own:
        return [(file, None)]
    groups = own.pop(COMPOSE_KEY)
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise ValueError(f"{file}: '{COMPOSE_KEY}' must be a list of config names, got {groups!r}.")
    layers = []
    for group in groups:
        try:
            layers += config_layers(group, (*seen, file.resolve()), beside=file.resolve().parent)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{file}, in its '{COMPOSE_KEY}' list: {err}") from err
    return [*layers, (file, own)]


def load_config(*sources: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Compose YAML configs and dicts (later ones win, nested sections merge), interpolations resolved.

    ``load_config("hardware/cpu.yaml", "model/gpt2-small.yaml", {"data": {"train_corpus": ...}})`` gives the
    dict that ``memdec fit --config … --config … --data.train_corpus …`` parses, for :func:`training.fit.fit`.
    Where an interpolation names a setting no source gives (``${data.window}``, ``${trainer.default_root_dir}``:
    the fit command's defaults), the interpolations stay as written; :func:`training.fit.fit` resolves them against
    those defaults, as ``memdec fit`` does.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationKeyError

    layers = [[(None, s)] if isinstance(s, dict) else config_layers(s) for s in sources]
    parts = [OmegaConf.load(file) if own is None else OmegaConf.create(own) for group in layers for file, own in group]
    merged = OmegaConf.merge(*parts)
    callbacks = [c for part in parts for c in layer_callbacks(OmegaConf.to_container(part))]
    if callbacks:  # each layer's callbacks add up (a merge would keep the last layer's list alone)
        merged.trainer.callbacks = callbacks
    try:
        return OmegaConf.to_container(merged, resolve=True)
    except InterpolationKeyError:  # a default of the fit command's: fit() resolves it
        return OmegaConf.to_container(merged, resolve=False)


def layer_callbacks(settings: dict[str, Any] | None) -> list:
    """The ``trainer.callbacks`` a config layer sets (one callback alone counts as a list of one)."""
    trainer = (settings or {}).get("trainer") or {}
    callbacks = trainer.get("callbacks") or []
    return callbacks if isinstance(callbacks, list) else [callbacks]


def config_args(args: list[str]) -> list[str]:
    """A command line with each ``--config NAME`` (``-c NAME``, ``--config=NAME``) replaced by what it stands for.

    A packaged name becomes its path when no such local file exists; a config with a ``compose:`` list
    becomes one ``--config`` per composed group, then its own settings as YAML text (which the parser takes
    in place of a path), so the ``--config`` and flags after it still win. The ``trainer.callbacks`` of the
    configs add up (``--config callbacks/cross_model_eval.yaml --config callbacks/throughput.yaml``: both), where
    the parser would keep the last list alone; a ``--trainer.callbacks`` flag still replaces them.
    """
    out: list[str] = []
    layers: list[tuple[int, Path, dict[str, Any] | None]] = []  # (its value's slot in out, file, settings)
    rest = iter(args)
    for arg in rest:
        if arg in ("--config", "-c"):
            name, joined = next(rest, None), False
        elif arg.startswith("--config="):
            name, joined = arg.split("=", 1)[1], True
        else:
            out.append(arg)
            continue
        if name is None:  # a trailing --config: the parser reports it
            out.append(arg)
            break
        for file, own in config_layers(name):
            out += ["--config="] if joined else ["--config", ""]  # the value goes on the last: see config_values
            layers.append((len(out) - 1, file, own))
    return config_values(out, layers)


def config_values(out: list[str], layers: list[tuple[int, Path, dict[str, Any] | None]]) -> list[str]:
    """Fill in each config's value: its path, or its settings as YAML text; where several configs set
    ``trainer.callbacks``, each goes without them, and all of them follow the last of those configs."""
    from omegaconf import OmegaConf

    settings = [OmegaConf.to_container(OmegaConf.load(file)) if own is None else own for _, file, own in layers]
    with_callbacks = [i for i, layer in enumerate(settings) if layer_callbacks(layer)]
    added_up = len(with_callbacks) > 1
    for i, (at, file, own) in enumerate(layers):
        if added_up and i in with_callbacks:
            own = {**settings[i], "trainer": {k: v for k, v in settings[i]["trainer"].items() if k != "callbacks"}}
        out[at] += str(file) if own is None else OmegaConf.to_yaml(OmegaConf.create(own))
    if added_up:
        callbacks = [c for i in with_callbacks for c in layer_callbacks(settings[i])]
        after = layers[with_callbacks[-1]][0] + 1
        out[after:after] = ["--config", OmegaConf.to_yaml(OmegaConf.create({"trainer": {"callbacks": callbacks}}))]
    return out


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
