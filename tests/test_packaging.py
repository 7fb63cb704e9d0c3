"""Built-in recipes and the version: `mpigls train NAME` resolves a shipped config when no file of
that name exists (a file always wins), unknown names are refused with close names, `mpigls recipes`
lists, shows and copies them (and the job scripts), every shipped recipe is a valid config, and the
version is one value everywhere (package, pyproject, `mpigls --version`, CITATION.cff, CHANGELOG,
checkpoints). tools/release_check.sh checks the same from a wheel installed outside the checkout."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import mpigls
from mpigls import cli, config as config_mod, recipes
from mpigls.run import checkpoint

REPO = Path(__file__).resolve().parents[1]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_names_are_the_files_of_configs_and_jobs():
    configs = {p.relative_to(REPO / "configs").with_suffix("").as_posix() for p in (REPO / "configs").rglob("*.yaml")}
    configs = {c for c in configs if not c.startswith("studies/")}  # study files are not train configs
    assert set(recipes.names()) == configs and len(configs) >= 50
    assert not any(n.startswith("studies/") for n in recipes.names())
    assert {"quickstart", "paper/mnist-0.1-cnn3-deeppoly-pgpe", "digits-paradox/grad-ibp"} <= configs
    jobs = {p.name for p in (REPO / "jobs").iterdir() if p.suffix in (".sh", ".sbatch")}
    assert set(recipes.names(recipes.JOBS)) == jobs and "paper.sh" in jobs
    assert recipes.names()[0].count("/") == 0 and recipes.names()[-1].count("/") == 1  # top level first


def test_an_installed_package_reads_its_own_copy_a_checkout_its_folders(tmp_path, monkeypatch):
    """Installed from a wheel, the recipes lie in mpigls/_recipes (preferred); in a checkout, in
    configs/ beside the package folder; with neither, the error says how to get them."""
    package = tmp_path / "site" / "mpigls"
    package.mkdir(parents=True)
    monkeypatch.setattr(recipes, "__file__", str(package / "recipes.py"))
    with pytest.raises(FileNotFoundError, match="reinstall mpigls from its wheel"):
        recipes.names()
    (tmp_path / "site" / "configs" / "paper").mkdir(parents=True)
    (tmp_path / "site" / "configs" / "paper" / "row.yaml").write_text("# a row\n")
    assert recipes.names() == ["paper/row"]
    (package / "_recipes").mkdir()
    (package / "_recipes" / "quickstart.yaml").write_text("# packaged\n")
    (package / "_recipes" / "_draft.yaml").write_text("")  # private names are not recipes
    assert recipes.names() == ["quickstart"] and recipes.describe("quickstart") == "packaged"


def test_a_name_resolves_to_the_shipped_file_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(recipes.resolve_config("quickstart")) == REPO / "configs" / "quickstart.yaml"
    assert Path(recipes.resolve_config("quickstart.yaml")) == REPO / "configs" / "quickstart.yaml"
    row = "paper/mnist-0.1-cnn3-deeppoly-pgpe"
    assert Path(recipes.resolve_config(row)) == REPO / "configs" / f"{row}.yaml"
    assert recipes.path("paper.sh", recipes.JOBS) == REPO / "jobs" / "paper.sh"


def test_a_file_always_wins_over_a_recipe_of_the_same_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").write_text("optimizer: {name: grad, lr: 0.5}\n")
    assert recipes.resolve_config("quickstart") == "quickstart"
    code, out, _ = run(capsys, "train", "quickstart", "--out", tmp_path / "r", "--print-config")
    assert code == 0 and yaml.safe_load(out)["optimizer"]["lr"] == 0.5
    (tmp_path / "quickstart").unlink()
    code, out, _ = run(capsys, "train", "quickstart", "--out", tmp_path / "r", "--print-config")
    shipped = config_mod.load_config(REPO / "configs" / "quickstart.yaml")
    assert code == 0 and yaml.safe_load(out) == config_mod.to_dict(shipped)
    (tmp_path / "paper").mkdir()  # a directory in the way is reported as one, not silently bypassed
    code, _, err = run(capsys, "train", "paper", "--out", tmp_path / "r")
    assert code == 2 and "is a directory" in err


def test_an_unknown_name_is_refused_with_close_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "train", "quikstart", "--out", tmp_path / "r")
    assert code == 2
    assert "'quikstart'" in err and "close names: quickstart" in err and "`mpigls recipes`" in err
    assert not (tmp_path / "r").exists()
    # the checkout's path to a recipe, given where no checkout is, points at the recipe's name
    with pytest.raises(
        FileNotFoundError, match=r"'configs/quickstart\.yaml' does not exist.*; close names: quickstart;"
    ):
        recipes.resolve_config("configs/quickstart.yaml")
    # the leaf of a row in a subfolder points at it
    with pytest.raises(FileNotFoundError, match=r"close names: paper/mnist-0\.1-cnn3-deeppoly-pgpe\b"):
        recipes.path("mnist-0.1-cnn3-deeppoly-pgpe")
    code, _, err = run(capsys, "recipes", "--jobs", "show", "paper")
    assert code == 2 and "paper.sh" in err and "mpigls recipes --jobs" in err
    code, _, err = run(capsys, "recipes", "show")
    assert code == 2 and "needs a NAME" in err


def test_recipes_lists_every_name_with_its_description(capsys):
    code, out, _ = run(capsys, "recipes")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith(f"{len(recipes.names())} built-in recipes")
    listed = [line.split()[0] for line in lines[1:]]
    assert listed == recipes.names()
    quick = next(line for line in lines if line.split()[0] == "quickstart")
    assert "scikit-learn's bundled digits" in quick
    code, out, _ = run(capsys, "recipes", "--jobs")
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == recipes.names(recipes.JOBS)


def test_describe_joins_the_opening_comment_and_drops_a_repeated_name():
    assert recipes.describe("paper/mnist-0.1-cnn3-ibp-grad") == "paper App. B.1 (GRAD)."
    text = recipes.describe("mnist-cnn3-deeppoly-pgpe", width=60)
    assert text.startswith("Paper setting (App. B.2): PGPE + DeepPoly") and len(text) == 60 and text.endswith("…")
    assert recipes.describe("paper.sh", recipes.JOBS).startswith("Reproduce one row")  # after the shebang


def test_show_prints_and_copy_writes_the_shipped_bytes(tmp_path, capsys):
    code, out, _ = run(capsys, "recipes", "show", "digits-paradox/grad-ibp")
    source = REPO / "configs" / "digits-paradox" / "grad-ibp.yaml"
    assert code == 0 and out == source.read_text()
    code, out, _ = run(capsys, "recipes", "copy", "digits-paradox/grad-ibp", tmp_path / "mine")
    target = tmp_path / "mine" / "grad-ibp.yaml"
    assert code == 0 and out.strip() == f"wrote {target}" and target.read_bytes() == source.read_bytes()
    target.write_text("# edited\n")
    code, _, err = run(capsys, "recipes", "copy", "digits-paradox/grad-ibp", tmp_path / "mine")
    assert code == 2 and "--force" in err and target.read_text() == "# edited\n"  # an edit is never lost
    assert run(capsys, "recipes", "copy", "digits-paradox/grad-ibp", tmp_path / "mine", "--force")[0] == 0
    assert target.read_bytes() == source.read_bytes()
    code, _, _ = run(capsys, "recipes", "--jobs", "copy", "slurm.sbatch", tmp_path)
    script = tmp_path / "slurm.sbatch"
    assert code == 0 and script.read_bytes() == (REPO / "jobs" / "slurm.sbatch").read_bytes()
    assert os.access(script, os.X_OK)
    code, out, _ = run(capsys, "recipes", "path", "quickstart")
    assert code == 0 and Path(out.strip()) == REPO / "configs" / "quickstart.yaml"


def test_every_shipped_recipe_is_a_valid_config():
    for name in recipes.names():
        cfg = config_mod.load_config(recipes.resolve_config(name), [])
        assert cfg.optimizer.name in ("pgpe", "rgs", "grad"), name


def test_the_version_is_one_value_everywhere(tmp_path, capsys):
    version = mpigls.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?(a|b|rc|dev|post)\d*)*", version)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^dynamic = \["version"\]', pyproject, re.M)
    assert re.search(r'^version = \{ ?attr = "mpigls\.__version__" ?\}', pyproject, re.M)
    assert not re.search(r'^version = "', pyproject, re.M)  # no second literal
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out == f"mpigls {version}\n"
    assert str(yaml.safe_load((REPO / "CITATION.cff").read_text())["version"]) == version
    assert re.search(rf"^## {re.escape(version)}\b", (REPO / "CHANGELOG.md").read_text(), re.M)
    theta = np.arange(5, dtype=np.float32)
    path = checkpoint.save(tmp_path, checkpoint.Checkpoint(3, 0, 0, theta, None, {}, {}, {}, {}, "n"))
    assert checkpoint.load(path).mpigls_version == version
    code, out, _ = run(capsys, "inspect", path)
    assert code == 0 and re.search(rf"^mpigls_version\s+{re.escape(version)}$", out, re.M)


def test_citation_names_the_software_and_the_paper():
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software" and cff["license"] == "MIT"
    paper = cff["preferred-citation"]
    assert paper["doi"] == "10.48550/arXiv.2403.07095" and paper["authors"][0]["family-names"] == "Balauca"
    assert "MIT License" in (REPO / "LICENSE").read_text()
    assert re.search(r'^license = "MIT"', (REPO / "pyproject.toml").read_text(), re.M)


@pytest.mark.slow  # three mpigls processes
def test_a_copied_paper_sh_runs_the_shipped_rows(tmp_path, capsys):
    """Copied out of the package, jobs/paper.sh finds its rows through `mpigls recipes path` (a
    stand-in PYTHON runs that for real and records the train/certify commands instead of running them)."""
    assert run(capsys, "recipes", "--jobs", "copy", "paper.sh", tmp_path)[0] == 0
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\n[ "$3" = recipes ] && exec "{sys.executable}" "$@"\necho "RAN $*"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), RUNS=str(tmp_path / "runs"), PYTHONPATH=str(REPO))
    cmd = ["bash", str(tmp_path / "paper.sh")]
    res = subprocess.run([*cmd, "mnist-0.1-cnn3-ibp-pgpe"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    ran = [line.split()[3:5] for line in res.stdout.splitlines() if line.startswith("RAN")]
    paper = REPO / "configs" / "paper"
    assert ran[0] == ["train", str(paper / "mnist-0.1-cnn3-pgd-grad.yaml")]  # the warm start first
    assert ran[1] == ["train", str(paper / "mnist-0.1-cnn3-ibp-pgpe.yaml")] and ran[2][0] == "certify"
    bad = subprocess.run([*cmd, "no-such-row"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "no built-in recipe is named 'paper/no-such-row'" in bad.stderr


@pytest.mark.parametrize("launcher", [[], ["-m", "mpi4py"]], ids=["python", "mpi4py"])
def test_python_m_mpigls_from_the_checkouts_parent_folder(tmp_path, launcher):
    """A folder named mpigls in the current directory (the checkout, seen from its parent folder) is
    a namespace package to Python's path finder, which is asked before an editable install's finder:
    ``python -m mpigls`` must still run the installed package."""
    if launcher:
        pytest.importorskip("mpi4py")
    import importlib.metadata

    try:
        importlib.metadata.distribution("mpigls")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("mpigls is not installed in this interpreter (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the package as installed
    cmd = [sys.executable, *launcher, "-m", "mpigls", "--version"]
    (tmp_path / "mpigls").mkdir()
    (tmp_path / "mpigls" / "README.md").write_text("a checkout\n")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"mpigls {mpigls.__version__}", proc.stderr
