"""Packaged configs: shipped in the wheel, addressable by name, and every experiment composes into a full fit run."""

import importlib.metadata
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import lightning_memdec
from lightning_memdec.cli import main, stage_functions
from lightning_memdec.io import packaged_configs as packaged_configs_module
from lightning_memdec.io.packaged_configs import (
    CONFIG_ROOT,
    config_args,
    config_layers,
    load_config,
    packaged_configs,
    resolve_config,
)
from lightning_memdec.training.fit import lightning_cli

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = [name for name in packaged_configs() if name.startswith("experiments/")]
# experiments target GPUs and strategies; on this CPU-only test machine only the devices are swapped
ON_CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"]


def test_packaged_names_resolve_and_local_files_win(tmp_path, monkeypatch):
    assert (REPO / "conf").resolve() == CONFIG_ROOT  # a clone's conf/ is the packaged folder
    assert resolve_config("hardware/gpu.yaml") == CONFIG_ROOT / "hardware" / "gpu.yaml"
    assert resolve_config("conf/hardware/gpu.yaml").read_text() == (CONFIG_ROOT / "hardware" / "gpu.yaml").read_text()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hardware").mkdir()
    (tmp_path / "hardware" / "gpu.yaml").write_text("trainer:\n  max_steps: 7\n")
    assert resolve_config("hardware/gpu.yaml") == Path("hardware/gpu.yaml")
    assert load_config("hardware/gpu.yaml", {"trainer": {"devices": 2}})["trainer"] == {"max_steps": 7, "devices": 2}
    args = config_args(["fit", "--config", "model/gpt2-small.yaml", "--config=data/biomed.yaml", "--seed", "1"])
    assert args == [
        "fit",
        "--config",
        str(CONFIG_ROOT / "model/gpt2-small.yaml"),
        f"--config={CONFIG_ROOT}/data/biomed.yaml",
        "--seed",
        "1",
    ]
    with pytest.raises(FileNotFoundError, match="neither a file nor a packaged config.*hardware/cpu.yaml"):
        resolve_config("hardware/nope.yaml")
    with pytest.raises(FileNotFoundError, match="split by concern; use --config hardware/cpu.yaml --config schedule/s"):
        resolve_config("trainer/cpu.yaml")


def test_a_packaged_config_is_found_without_its_folder_or_extension(tmp_path, monkeypatch):
    """``--config gpt2-wikitext103`` (docs/official.md) names experiments/gpt2-wikitext103.yaml; a short name that
    several configs share is refused with all of them, and a local file still wins."""
    experiment = CONFIG_ROOT / "experiments" / "gpt2-wikitext103.yaml"
    for name in ("gpt2-wikitext103", "experiments/gpt2-wikitext103", "gpt2-wikitext103.yaml"):
        assert resolve_config(name) == experiment
    assert resolve_config("ddp") == CONFIG_ROOT / "hardware" / "ddp.yaml"  # not ddp_cpu.yaml
    assert resolve_config("cpu") == CONFIG_ROOT / "hardware" / "cpu.yaml"  # nor is ddp_cpu.yaml a "cpu" (a suffix)
    assert config_args(["fit", "--config", "gpt2-wikitext103"])[:2] == ["fit", "--config"]
    monkeypatch.setattr(packaged_configs_module, "CONFIG_ROOT", tmp_path)
    for group in ("a", "b"):
        (tmp_path / group).mkdir()
        (tmp_path / group / "x.yaml").write_text(f"# {group}\n")
    with pytest.raises(FileNotFoundError, match=r"config x could be any of a/x.yaml, b/x.yaml; name one"):
        resolve_config("x")
    assert resolve_config("b/x") == tmp_path / "b" / "x.yaml"
    monkeypatch.chdir(tmp_path / "a")
    assert resolve_config("x.yaml") == Path("x.yaml")


def test_local_files_win_and_a_compose_list_reads_beside_its_file(tmp_path, monkeypatch):
    """A local NAME.yaml wins over the packaged short name NAME; ./NAME is local only; `-c` is `--config`; a
    config's compose list names files beside it (from any working directory) before packaged ones, and a
    packaged experiment composes packaged groups whatever the working directory holds."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "short.yaml").write_text("trainer:\n  max_steps: 777\n")
    assert resolve_config("short") == Path("short.yaml")
    for anchored in ("./gpu", "."):
        with pytest.raises(FileNotFoundError, match=rf"config {anchored}: no such file"):
            resolve_config(anchored)
    assert config_args(["fit", "-c", "gpu"]) == ["fit", "--config", str(CONFIG_ROOT / "hardware" / "gpu.yaml")]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "exp.yaml").write_text("compose: [short.yaml, hardware/gpu.yaml]\n")
    (tmp_path / "sub" / "short.yaml").write_text("trainer:\n  max_steps: 555\n")
    for cwd in (tmp_path, tmp_path / "sub"):
        monkeypatch.chdir(cwd)
        files = [f for f, _ in config_layers(tmp_path / "sub" / "exp.yaml")]
        assert files[:2] == [tmp_path / "sub" / "short.yaml", CONFIG_ROOT / "hardware" / "gpu.yaml"], cwd
    (tmp_path / "hardware").mkdir()
    (tmp_path / "hardware" / "ddp.yaml").write_text("trainer:\n  devices: 99\n")
    monkeypatch.chdir(tmp_path)
    assert config_layers("experiments/gpt2-wikitext103.yaml")[0][0] == CONFIG_ROOT / "hardware" / "ddp.yaml"


def test_groups_split_the_trainer_by_concern():
    """Hardware, schedule, callbacks and logger each set their own trainer keys and nothing else."""
    concerns = {
        "hardware": {"accelerator", "devices", "strategy", "precision", "gradient_clip_val"},
        "schedule": {
            "max_steps",
            "check_val_every_n_epoch",
            "val_check_interval",
            "log_every_n_steps",
            "default_root_dir",
        },
        "callbacks": {"callbacks"},
        "logger": {"logger"},
    }
    for group, keys in concerns.items():
        names = [n for n in packaged_configs() if n.startswith(f"{group}/")]
        assert names, f"no {group}/ configs"
        for name in names:
            raw = yaml.safe_load(resolve_config(name).read_text())
            assert set(raw) == {"trainer"} and set(raw["trainer"]) <= keys, name


def test_experiments_compose_groups_and_later_configs_win(tmp_path, monkeypatch):
    gpt2 = config_layers("experiments/gpt2-wikitext103.yaml")
    assert [(f.relative_to(CONFIG_ROOT).as_posix(), own is None) for f, own in gpt2] == [
        ("hardware/ddp.yaml", True),
        ("schedule/long.yaml", True),
        ("model/gpt2-small.yaml", True),
        ("experiments/gpt2-wikitext103.yaml", False),
    ]
    assert "compose" not in gpt2[-1][1] and gpt2[-1][1]["model"] == {"warmup_steps": 0.02}
    composed = load_config("experiments/gpt2-wikitext103.yaml")
    groups = load_config("hardware/ddp.yaml", "schedule/long.yaml", "model/gpt2-small.yaml")
    assert composed["trainer"] == {**groups["trainer"], **composed["trainer"]}
    assert composed["trainer"]["strategy"] == "ddp"
    assert composed["trainer"]["max_steps"] == 50000 != groups["trainer"]["max_steps"]  # the experiment wins
    assert composed["model"] == {**groups["model"], "warmup_steps": 0.02}
    # on the command line the experiment becomes its groups' files, then its own settings as YAML text
    args = config_args(["--config", "experiments/gpt2-wikitext103.yaml", "--trainer.max_steps", "3"])
    assert args[:6] == ["--config", str(CONFIG_ROOT / "hardware/ddp.yaml"), "--config"] + [
        str(CONFIG_ROOT / "schedule/long.yaml"),
        "--config",
        str(CONFIG_ROOT / "model/gpt2-small.yaml"),
    ]
    assert yaml.safe_load(args[7]) == gpt2[-1][1] and args[8:] == ["--trainer.max_steps", "3"]
    cli = lightning_cli(["--config", "experiments/gpt2-wikitext103.yaml", *ON_CPU, "--trainer.max_steps=3"], run=False)
    assert cli.trainer.max_steps == 3 and cli.model.hparams.learning_rate == 1.0e-3  # from model/gpt2-small.yaml
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.yaml").write_text("compose: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("compose: [a.yaml]\n")
    (tmp_path / "c.yaml").write_text("compose: x\n")
    with pytest.raises(ValueError, match="composes itself"):
        load_config("a.yaml")
    with pytest.raises(ValueError, match="c.yaml: 'compose' must be a list of config names"):
        load_config("c.yaml")
    (tmp_path / "d.yaml").write_text("compose: [hardware/nope.yaml]\n")
    with pytest.raises(FileNotFoundError, match="d.yaml, in its 'compose' list: config hardware/nope.yaml is neither"):
        load_config("d.yaml")


def test_memdec_configs_lists_every_packaged_config(capsys):
    main(["configs"])
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == packaged_configs() and "experiments/embedded-base-large.yaml" in listed


def test_help_lists_training_and_stages(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "tokenize", "build-targets", "evaluate", "pretrain-bases", "configs"):
        assert f"\n  {command} " in out
    # each stage's line is its function's docstring's first paragraph, read from the source without importing it
    for command, function in stage_functions().items():
        first = " ".join(inspect.getdoc(function).split("\n\n")[0].split())
        assert f"\n  {command:<20} {first}\n" in f"{out}\n", command


@pytest.mark.parametrize("command", ["tokenize", "build-targets", "evaluate"])
def test_a_stage_usage_reads_as_it_is_typed(command, capsys):
    """``memdec tokenize [--config CONFIG] …``: options after the command, as the dispatcher requires (a subcommand
    parser's ``memdec [options] tokenize`` told users to put options first, which is refused)."""
    with pytest.raises(SystemExit) as stopped:
        main([command, "--help"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: memdec {command} [--config CONFIG]")


@pytest.mark.parametrize("args", [["--help"], ["configs"], ["tokenize", "--help"]])
def test_help_and_light_commands_import_neither_torch_nor_lightning(args):
    """`memdec --help`, `memdec configs` and `memdec tokenize` start in a fraction of a second: only the command's
    own module is imported, not every stage's (training and retrieval import Lightning and torch: seconds)."""
    code = "import sys\nfrom lightning_memdec.cli import main\n"
    code += f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
    code += "print('loaded:', sorted({'torch', 'lightning'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "loaded: []"


def test_an_unknown_command_is_refused_with_the_list_of_commands(capsys):
    with pytest.raises(
        SystemExit, match=r"'build-idx' is not a command; did you mean 'build-index'\? choose one of fit, "
    ):
        main(["build-idx", "--datastore", "ds"])
    with pytest.raises(SystemExit, match=r"'zzz' is not a command; choose one of fit, validate, test, tokenize"):
        main(["zzz"])
    with pytest.raises(SystemExit, match=r"the command comes first: memdec fit --config …"):
        main(["--config", "gpu", "fit"])
    with pytest.raises(SystemExit, match=r"'--cfg' is not a command; choose one of fit, "):
        main(["--cfg", "x"])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_into_a_fit_run(experiment, tmp_path):
    """The experiment YAML alone (plus CPU devices) instantiates module, datamodule, trainer and callbacks."""
    raw = load_config(experiment)
    root = ["--trainer.default_root_dir", str(tmp_path)]
    cli = lightning_cli(["--config", experiment, *ON_CPU, *root], run=False)
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
    assert {"RunCheckpoint", "ExportHuggingFace", "LearningRateLog"} <= callbacks
    for entry in trainer.get("callbacks", []):
        assert entry["class_path"].rsplit(".", 1)[1] in callbacks


@pytest.mark.parametrize("logger", ["tensorboard", "csv"])
def test_logger_groups_write_under_the_run_root(logger, tmp_path):
    args = ["--config", "experiments/gpt2-wikitext103.yaml", "--config", f"logger/{logger}.yaml", *ON_CPU]
    cli = lightning_cli([*args, "--trainer.default_root_dir", str(tmp_path)], run=False)
    expected = {"tensorboard": "TensorBoardLogger", "csv": "CSVLogger"}[logger]
    assert type(cli.trainer.logger).__name__ == expected and cli.trainer.logger.save_dir == str(tmp_path)


def test_configs_interpolating_a_fit_default_load_from_python_as_on_the_command_line(tmp_path, monkeypatch):
    """``${data.window}`` and ``${trainer.default_root_dir}`` name settings these configs leave at the fit command's
    defaults: load_config must not fail on them, and fit's parse of its dict must equal ``memdec fit``'s."""
    monkeypatch.chdir(tmp_path)
    groups = ["hardware/cpu.yaml", "model/tiny-gpt2-scratch.yaml", "logger/tensorboard.yaml"]
    data = {"train_corpus": "corpus-train", "train_targets": "targets-train"}
    config = load_config(*groups, {"data": data})
    from_python = lightning_cli(config, run=False)
    args = [arg for name in groups for arg in ("--config", name)]
    from_cli = lightning_cli([*args, *(f"--data.{key}={value}" for key, value in data.items())], run=False)
    window = from_cli.datamodule.hparams["window"]
    assert from_python.datamodule.hparams["window"] == window
    assert from_python.model.hparams["config"]["n_positions"] == from_cli.model.hparams["config"]["n_positions"]
    assert from_cli.model.hparams["config"]["n_positions"] == window
    assert from_python.trainer.logger.save_dir == from_cli.trainer.logger.save_dir == "."


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_is_the_installed_distributions(flag, capsys):
    main([flag])
    assert capsys.readouterr().out == f"memdec {lightning_memdec.__version__}\n"
    assert importlib.metadata.version("lightning_memdec") == lightning_memdec.__version__  # pyproject reads it


def test_a_closed_pipe_ends_the_command_quietly():
    """`memdec --help | head -1`: the reader is gone before the help is written; no BrokenPipeError traceback."""
    memdec = subprocess.Popen(
        [sys.executable, "-m", "lightning_memdec", "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    memdec.stdout.close()  # before the interpreter has even started: its first write meets a closed pipe
    assert memdec.stderr.read() == b""
    assert memdec.wait() == 141


def test_callback_configs_add_up(tmp_path):
    """Each config's trainer.callbacks join the others' (the parser, and an OmegaConf merge, kept the last list)."""
    root = ["--trainer.default_root_dir", str(tmp_path)]
    groups = ["--config", "callbacks/cross_model_eval.yaml", "-c", "callbacks/throughput.yaml"]
    cli = lightning_cli(["--config", "experiments/gpt2-wikitext103.yaml", *groups, *ON_CPU, *root], run=False)
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert names.count("CrossModelEval") == 2 and names.count("TrainingThroughput") == 1  # the experiment's, and one
    bases = [c.bases for c in cli.trainer.callbacks if type(c).__name__ == "CrossModelEval"]
    assert bases == [["gpt2-medium", "gpt2-large", "gpt2-xl"], ["gpt2-medium", "gpt2-large"]]  # in config order
    config = load_config("callbacks/cross_model_eval.yaml", "callbacks/throughput.yaml", "callbacks/early_stopping")
    assert [c["class_path"].rsplit(".", 1)[1] for c in config["trainer"]["callbacks"]] == [
        "CrossModelEval", "TrainingThroughput", "EarlyStopping",
    ]  # fmt: skip
    # one config with callbacks: passed as it is, by its path
    assert config_args(["--config", "callbacks/throughput.yaml"]) == [
        "--config",
        str(CONFIG_ROOT / "callbacks/throughput.yaml"),
    ]


def test_ctrl_c_ends_a_command_with_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    """A SIGINT in quickstart, evaluate or downstream printed Python's KeyboardInterrupt traceback (exit 1)."""
    import lightning_memdec.cli as cli

    def interrupted(raw):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_command", interrupted)
    with pytest.raises(SystemExit) as stop:
        main(["evaluate", "--help-not-reached"])
    assert stop.value.code == 130
    assert capsys.readouterr().err == "memdec evaluate: interrupted (SIGINT).\n"
