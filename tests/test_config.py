"""Config loading: YAML + overrides, and one clear error per kind of bad input."""

import pytest

from mpigls import config
from mpigls.config import yaml_load


def test_defaults_and_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  popsize: 32\n  lr: 0.01\nbound:\n  eps: 0.2\n")
    cfg = config.load_config(path, ["optimizer.lr=0.5", "train.seed=3"])
    assert cfg.optimizer.popsize == 32 and cfg.optimizer.lr == 0.5 and cfg.bound.eps == 0.2
    assert cfg.train.seed == 3 and cfg.data.name == "digits"
    assert config.from_dict(config.to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optimizer.popsize=255"], "popsize must be even"),
        (["optimizer.pop_size=256"], "unknown config key"),
        (["bogus.key=1"], "unknown config key"),
        (["bound.eps=-0.1"], r"bound.eps must lie in \[0, 1\]"),
        (["train.batch_size=abc"], "must be of type int"),
        (["train.batch_size=1.5"], "must be of type int"),
        (["data.name=mnist"], "data.root is required"),
        (["model.name=resnet"], "model.name must be one of"),
        (["optimizer.name=sgd"], "optimizer.name must be"),
        (["bound.method=zonotope"], "bound.method must be one of"),
        (["optimizer.sigma_init=0"], "sigma_init must be a positive finite number, got 0"),
        (["noequals"], "section.key=value"),
    ],
)
def test_bad_input_is_a_clear_error(overrides, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load_config(None, overrides)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(config.ConfigError) as info:
        config.load_config(None, ["train.epoch=3"])
    assert "train" in str(info.value) and "'epochs'" in str(info.value)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        config.load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer: [unclosed\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(config.ConfigError, match="mapping"):
        config.load_config(listy)


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "configs/ must ship recipes"
    for path in files:
        overrides = ["data.root=/tmp"] if "data:\n  name: digits" not in path.read_text() else []
        config.load_config(path, overrides)


def test_describe_covers_every_key():
    keys = {k for k, _, _ in config.describe()}
    assert {"optimizer.popsize", "bound.method", "data.root", "train.seed", "eval.methods"} <= keys
    assert all(h for _, _, h in config.describe())


@pytest.mark.parametrize(
    "item, hint",
    [
        ("train.epoch=3", "epoch: did you mean 'epochs'?"),
        ("optimiser.lr=1", "optimiser: did you mean 'optimizer'?"),
        ("optimizer.poopsize=64", "poopsize: did you mean 'popsize'?"),
        ("eval.method=[ibp]", "method: did you mean 'methods'?"),
    ],
)
def test_mistyped_key_gets_did_you_mean(item, hint):
    with pytest.raises(config.ConfigError, match="unknown config key") as info:
        config.load_config(None, [item])
    assert hint in str(info.value)


def test_key_of_another_optimizer_names_its_owner():
    with pytest.raises(config.ConfigError) as info:
        config.load_config(None, ["optimizer.name=rgs", "optimizer.popsize=64"])
    assert "popsize: a key of pgpe" in str(info.value) and "for optimizer 'rgs'" in str(info.value)


@pytest.mark.parametrize("name", ["rgs", "grad"])
def test_switching_optimizer_on_the_command_line_drops_the_files_other_keys(tmp_path, name):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  name: pgpe\n  popsize: 32\n  fixed_sigma: true\n  lr: 0.01\n  block_size: 4\n")
    notes: list[str] = []
    cfg = config.load_config(path, [f"optimizer.name={name}"], note=notes.append)
    assert cfg.optimizer.name == name and cfg.optimizer.lr == 0.01 and cfg.optimizer.block_size == 4
    assert "popsize" not in config.to_dict(cfg)["optimizer"]
    assert len(notes) == 1 and "['popsize', 'fixed_sigma']" in notes[0] and "dropped" in notes[0]
    # a key of the other optimizer given on the command line is still refused, as in the file itself
    with pytest.raises(config.ConfigError, match="popsize: a key of pgpe"):
        config.load_config(path, [f"optimizer.name={name}", "optimizer.popsize=8"])
    path.write_text(f"optimizer:\n  name: {name}\n  popsize: 32\n")
    with pytest.raises(config.ConfigError, match="popsize: a key of pgpe"):
        config.load_config(path, [])
    # the same optimizer named again drops nothing
    path.write_text("optimizer:\n  name: pgpe\n  popsize: 32\n")
    assert config.load_config(path, ["optimizer.name=pgpe"], note=notes.append).optimizer.popsize == 32
    assert len(notes) == 1


def test_switching_a_shipped_pgpe_recipe_to_rgs():
    from mpigls import recipes

    cfg = config.load_config(recipes.resolve_config("quickstart"), ["optimizer.name=rgs"])
    assert cfg.optimizer.name == "rgs"


def test_train_switches_a_recipes_optimizer_from_the_command_line(capsys):
    from mpigls import cli

    assert cli.main(["train", "quickstart", "--out", "unused", "--print-config", "--set", "optimizer.name=rgs"]) == 0
    out, err = capsys.readouterr()
    section = yaml_load(out)["optimizer"]
    assert section["name"] == "rgs" and "popsize" not in section and "num_samples" in section
    assert "note: optimizer.name=rgs from --set" in err and "'popsize'" in err
