"""Hostile files, class "non-regular files and symlinks": a FIFO, a device or a directory given
where mpigls reads a file is refused at once (exit 2, one paragraph), never opened (opening a FIFO
blocks until a writer comes: a hang, under the run lock for ``train``); a run file that links into
another run is refused before it is resumed or read. Inputs tried: checkpoints (certify, inspect,
export, model.init_from, a run directory's latest.h5 / ckpt_*.h5 / metrics.jsonl), ONNX files,
PyTorch state dicts, config files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mpigls import config, files
from mpigls.interop import onnx_io
from mpigls.nn import models
from mpigls.run import checkpoint, rundir, runlock, train

from conftest import one_paragraph, run_cli, tiny_overrides

pytestmark = [
    pytest.mark.timeout(180),  # a FIFO that is opened blocks forever: the timeout is the failure
    pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs"),
]


def _sets(**extra) -> list[str]:
    return [a for item in tiny_overrides(**extra) for a in ("--set", item)]


def _fifo(d: Path, name: str) -> Path:
    path = d / name
    os.mkfifo(path)
    return path


@pytest.fixture(scope="module")
def run2(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("special") / "r"
    train.train(config.load_config(None, tiny_overrides()), d, max_generations=2, log=lambda m: None)
    return d


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "cfg.yaml"
    path.write_text(yaml.safe_dump(config.to_dict(config.load_config(None, tiny_overrides()))))
    return path


def test_input_file_stats_and_never_opens(tmp_path):
    fifo = _fifo(tmp_path, "p")
    with pytest.raises(files.InputFileError, match=r"is a FIFO \(named pipe\), not a regular file"):
        files.input_file(fifo, "checkpoint")
    with pytest.raises(files.InputFileError, match="is a directory"):
        files.input_file(tmp_path, "checkpoint")
    if Path("/dev/null").exists():
        with pytest.raises(files.InputFileError, match="is a character device"):
            files.input_file("/dev/null", "checkpoint")
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="a symlink whose target does not exist"):
        files.input_file(tmp_path / "link", "checkpoint")
    (tmp_path / "real").write_bytes(b"x")
    (tmp_path / "ok").symlink_to(tmp_path / "real")
    assert files.input_file(tmp_path / "ok", "checkpoint") == tmp_path / "ok"


@pytest.mark.parametrize("name", ["net.h5", "net.onnx", "net.pt"])
def test_certify_a_fifo_is_refused_not_waited_for(tmp_path, capsys, cfg_file, name):
    fifo = _fifo(tmp_path, name)
    extra = [] if name.endswith(".h5") else ["--config", cfg_file]
    code, out, err = run_cli(capsys, "certify", fifo, *extra, "--num-test", 4)
    assert code == 2 and "certified" not in out
    one_paragraph(err, "FIFO")


@pytest.mark.parametrize("command", ["inspect", "export"])
def test_inspect_and_export_of_a_fifo_or_device_are_refused(tmp_path, capsys, command):
    extra = ["--onnx", tmp_path / "n.onnx"] if command == "export" else []
    code, _, err = run_cli(capsys, command, _fifo(tmp_path, "c.h5"), *extra)
    assert code == 2
    one_paragraph(err, "FIFO")
    if Path("/dev/zero").exists():  # a device that never ends
        code, _, err = run_cli(capsys, command, "/dev/zero", *extra)
        assert code == 2
        one_paragraph(err, "character device")
    assert not (tmp_path / "n.onnx").exists()


@pytest.mark.parametrize("name", ["init.h5", "init.onnx", "init.pt"])
def test_train_with_a_fifo_as_init_from_is_refused_and_frees_the_lock(tmp_path, capsys, name):
    fifo = _fifo(tmp_path, name)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--out", out, *_sets(**{"model.init_from": str(fifo)}))
    assert code == 2
    one_paragraph(err, "FIFO")
    assert not (out / runlock.LOCK_NAME).exists()
    assert not list(out.glob("*.h5"))


def test_a_fifo_as_the_config_file_is_refused(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", _fifo(tmp_path, "c.yaml"), "--out", tmp_path / "r")
    assert code == 2
    one_paragraph(err, "not a regular file")


def test_a_fifo_as_latest_in_a_run_directory_is_skipped_and_set_aside(run2, tmp_path, capsys):
    d = shutil.copytree(run2, tmp_path / "r")
    (d / checkpoint.LATEST).unlink()
    os.mkfifo(d / checkpoint.LATEST)
    assert rundir.find_latest(d) == d / "ckpt_00000002.h5"  # with a warning, without opening the FIFO
    code, out, _ = run_cli(capsys, "inspect", d, "--json")
    assert code == 0 and '"generation": 2' in out
    resumed = train.train(config.load_config(None, tiny_overrides()), d, max_generations=3, log=lambda m: None)
    assert resumed.generation == 3
    aside = [p for p in d.iterdir() if p.name.startswith(rundir.ASIDE_PREFIX)]
    assert len(aside) == 1 and (aside[0] / checkpoint.LATEST).is_fifo()


# ----------------------------------------------------------------------------- symlinks


def test_latest_linking_into_another_run_is_refused(run2, tmp_path, capsys):
    other = shutil.copytree(run2, tmp_path / "other")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / checkpoint.LATEST).symlink_to(other / checkpoint.LATEST)
    before = sorted(p.name for p in mine.iterdir())
    with pytest.raises(rundir.RunDirError, match="outside the run directory"):
        rundir.prepare(mine, say=lambda m: None)
    code, _, err = run_cli(capsys, "train", "--out", mine, *_sets())
    assert code == 2
    one_paragraph(err, "is a symlink to", "outside the run directory")
    for command in ("inspect", "certify"):
        code, out, err = run_cli(capsys, command, mine)
        assert code == 2 and "certified" not in out
        one_paragraph(err, "outside the run directory")
    assert sorted(p.name for p in mine.iterdir()) == before
    assert checkpoint.load(other / checkpoint.LATEST).generation == 2  # the other run untouched


def test_metrics_linking_into_another_run_is_refused(run2, tmp_path):
    d = shutil.copytree(run2, tmp_path / "r")
    other = shutil.copytree(run2, tmp_path / "other")
    (d / "metrics.jsonl").unlink()
    (d / "metrics.jsonl").symlink_to(other / "metrics.jsonl")
    with pytest.raises(rundir.RunDirError, match="metrics.jsonl is a symlink"):
        rundir.prepare(d, say=lambda m: None)


def test_links_inside_the_run_and_linked_inputs_are_followed(run2, tmp_path, capsys):
    d = shutil.copytree(run2, tmp_path / "r")
    (d / checkpoint.LATEST).unlink()
    (d / checkpoint.LATEST).symlink_to("ckpt_00000002.h5")  # relative, inside the run
    assert rundir.prepare(d, say=lambda m: None).generation == 2
    (tmp_path / "ck.h5").symlink_to(run2 / checkpoint.LATEST)  # an input named through a link
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "ck.h5", "--json")
    assert code == 0 and '"generation": 2' in out
    with models.private_rng(0):
        net = models.build("cnn3", (1, 8, 8), 10)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    (tmp_path / "w-link.pt").symlink_to(tmp_path / "w.pt")
    arch = models.architecture_dict("cnn3", (1, 8, 8), 10, None, None)
    assert onnx_io.load_foreign(tmp_path / "w-link.pt", arch).shape == (models.num_params(net),)


def test_a_checkpoint_whose_data_lives_in_another_file_is_refused_unread(run2, tmp_path):
    """An external link or external raw storage (here: a FIFO that would never answer) is refused
    before any dataset is read."""
    h5py = checkpoint.h5py
    fifo = _fifo(tmp_path, "theta.raw")
    for kind in ("external storage", "external link", "soft link"):
        path = tmp_path / f"{kind.replace(' ', '_')}.h5"
        shutil.copyfile(run2 / checkpoint.LATEST, path)
        with h5py.File(path, "r+") as f:
            n = f[checkpoint.DS_THETA].shape[0]
            del f[checkpoint.DS_THETA]
            if kind == "external storage":
                f.create_dataset(checkpoint.DS_THETA, (n,), "<f4", external=[(str(fifo), 0, 4 * n)])
            elif kind == "external link":
                f[checkpoint.DS_THETA] = h5py.ExternalLink(str(run2 / "ckpt_00000002.h5"), "/theta")
            else:
                f[checkpoint.DS_THETA] = h5py.SoftLink(f"/{checkpoint.DS_SIGMA}")
        with pytest.raises(checkpoint.CheckpointError, match="self-contained"):
            checkpoint.load(path)


def test_a_fifo_as_the_metrics_log_is_refused_by_train_plot_and_report(run2, tmp_path, capsys):
    d = shutil.copytree(run2, tmp_path / "r")
    (d / "metrics.jsonl").unlink()
    os.mkfifo(d / "metrics.jsonl")
    for argv in (["train", "--out", d, *_sets()], ["plot", d, "--out", tmp_path / "m.png"], ["report", d]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2, argv
        one_paragraph(err, "metrics.jsonl", "FIFO")
    assert (d / "metrics.jsonl").is_fifo() and not (tmp_path / "m.png").exists()
    assert checkpoint.load(d / checkpoint.LATEST).generation == 2  # the run was not resumed
