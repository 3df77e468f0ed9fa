"""Packaged configs: shipped in the wheel, addressable by name, and every experiment composes into a full fit run."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lightning_memdec.cli import main, packaged_config_args
from lightning_memdec.io.packaged_configs import CONFIG_ROOT, load_config, packaged_configs, resolve_config
from lightning_memdec.training.fit import lightning_cli

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = [name for name in packaged_configs() if name.startswith("experiments/")]
# experiments target GPUs and strategies; on this CPU-only test machine only the devices are swapped
ON_CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"]


def test_every_yaml_ships_in_the_wheel(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("lightning_memdec-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    on_disk = {f"lightning_memdec/conf/{name}" for name in packaged_configs()}
    assert on_disk and on_disk <= names, f"configs missing from the wheel: {sorted(on_disk - names)}"
    assert "lightning_memdec/assets/models/base-small/model.safetensors" in names


def test_packaged_names_resolve_and_local_files_win(tmp_path, monkeypatch):
    assert (REPO / "conf").resolve() == CONFIG_ROOT  # a clone's conf/ is the packaged folder
    assert resolve_config("trainer/gpu.yaml") == CONFIG_ROOT / "trainer" / "gpu.yaml"
    assert resolve_config("conf/trainer/gpu.yaml").read_text() == (CONFIG_ROOT / "trainer" / "gpu.yaml").read_text()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "trainer").mkdir()
    (tmp_path / "trainer" / "gpu.yaml").write_text("trainer:\n  max_steps: 7\n")
    assert resolve_config("trainer/gpu.yaml") == Path("trainer/gpu.yaml")
    assert load_config("trainer/gpu.yaml", {"trainer": {"devices": 2}})["trainer"] == {"max_steps": 7, "devices": 2}
    args = packaged_config_args(["fit", "--config", "model/gpt2-small.yaml", "--config=data/biomed.yaml"])
    assert args == [
        "fit",
        "--config",
        str(CONFIG_ROOT / "model/gpt2-small.yaml"),
        f"--config={CONFIG_ROOT}/data/biomed.yaml",
    ]
    with pytest.raises(FileNotFoundError, match="neither a file nor a packaged config.*trainer/cpu.yaml"):
        resolve_config("trainer/nope.yaml")


def test_memdec_configs_lists_every_packaged_config(capsys):
    main(["configs"])
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == packaged_configs() and "experiments/embedded-base-large.yaml" in listed


def test_help_lists_training_and_stages(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "tokenize", "build-targets", "evaluate", "pretrain-bases", "configs"):
        assert f"\n  {command} " in out


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_into_a_fit_run(experiment, tmp_path):
    """The experiment YAML alone (plus CPU devices) instantiates module, datamodule, trainer and callbacks."""
    raw = load_config(experiment)
    root = ["--trainer.default_root_dir", str(tmp_path)]
    cli = lightning_cli(packaged_config_args(["--config", experiment, *ON_CPU, *root]), run=False)
    for section in ("model", "data", "trainer"):
        assert section in raw, f"{experiment} lacks a {section} section"
    for key, value in raw["model"].items():
        got = cli.model.hparams[key]
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    for key, value in raw["data"].items():
        assert cli.datamodule.hparams[key] == value, key
    trainer = raw["trainer"]
    if "max_steps" in trainer:
        assert cli.trainer.max_steps == trainer["max_steps"]
    callbacks = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {"ModelCheckpoint", "ExportHuggingFace", "LearningRateMonitor"} <= callbacks
    for entry in trainer.get("callbacks", []):
        assert entry["class_path"].rsplit(".", 1)[1] in callbacks
