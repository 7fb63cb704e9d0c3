"""Hostile files, class "outputs aimed at inputs": an output option may not name a checkpoint, a
file a run or a study keeps, a non-regular file, or an input of the same command; an output that
cannot be written is refused before any work, and a failure half-way leaves nothing behind
(``export``: no ONNX file without its VNN-LIB properties).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from mpigls import cli, config
from mpigls.interop import vnnlib
from mpigls.run import checkpoint, rundir, train

from conftest import one_paragraph, run_cli, tiny_overrides

pytest.importorskip("onnx", reason="needs the onnx extra: pip install mpigls[onnx]")
pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install mpigls[onnx]")
pytestmark = pytest.mark.timeout(120)


def listing(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run2(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("outputs") / "r"
    train.train(config.load_config(None, tiny_overrides()), d, max_generations=2, log=lambda m: None)
    return d


# ----------------------------------------------------------------------------- rundir.refuse_output


@pytest.mark.parametrize(
    "name", ["latest.h5", "ckpt_00000002.h5", "metrics.jsonl", "eval.json", "config.yaml", "mpigls.lock", "x.h5"]
)
def test_an_output_named_like_a_run_file_is_refused(tmp_path, name):
    with pytest.raises(rundir.RunDirError, match=f"names '{name}'.*Nothing was written"):
        rundir.refuse_output(tmp_path / name, "--out")


def test_an_output_that_is_a_checkpoint_by_content_is_refused(run2, tmp_path):
    disguised = tmp_path / "table.txt"
    disguised.write_bytes((run2 / checkpoint.LATEST).read_bytes())
    with pytest.raises(rundir.RunDirError, match="is an HDF5 file"):
        rundir.refuse_output(disguised, "report --out")
    (tmp_path / "link.txt").symlink_to(run2 / checkpoint.LATEST)  # a harmless name linking to a checkpoint
    with pytest.raises(rundir.RunDirError, match="names 'latest.h5'"):
        rundir.refuse_output(tmp_path / "link.txt", "report --out")


def test_an_output_that_is_an_input_of_the_command_is_refused(tmp_path):
    given = tmp_path / "cfg.yaml.txt"
    given.write_text("x")
    (tmp_path / "alias.txt").symlink_to(given)
    for out in (given, tmp_path / "alias.txt", tmp_path / "sub" / ".." / "cfg.yaml.txt"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(rundir.RunDirError, match="same file as this command's input"):
            rundir.refuse_output(out, "--results", inputs=[given])


def test_an_output_that_is_a_fifo_is_refused_and_plain_outputs_pass(tmp_path):
    os.mkfifo(tmp_path / "pipe.json")
    with pytest.raises(rundir.RunDirError, match=r"is a FIFO \(named pipe\), not a regular file"):
        rundir.refuse_output(tmp_path / "pipe.json", "--results")
    (tmp_path / "old.json").write_text("{}")
    assert rundir.refuse_output(tmp_path / "old.json", "--results", inputs=[tmp_path / "x.h5"]) == tmp_path / "old.json"
    assert rundir.refuse_output(tmp_path / "new.txt", "--out") == tmp_path / "new.txt"
    assert rundir.refuse_output(tmp_path, "--out") == tmp_path  # a directory: the caller names the file
    with pytest.raises(rundir.RunDirError, match="is empty"):
        rundir.refuse_output(" ", "--out")


# ----------------------------------------------------------------------------- export: all or nothing


def test_export_onto_a_directory_or_a_properties_file_is_refused(run2, tmp_path, capsys):
    ck = run2 / checkpoint.LATEST
    (tmp_path / "here").mkdir()
    code, _, err = run_cli(capsys, "export", ck, "--onnx", tmp_path / "here")
    assert code == 2
    one_paragraph(err, "is a directory; name the file to write in it")
    (tmp_path / "props.txt").write_text("keep")
    code, _, err = run_cli(capsys, "export", ck, "--onnx", tmp_path / "n.onnx", "--vnnlib", tmp_path / "props.txt")
    assert code == 2
    one_paragraph(err, "is a file, not a directory")
    code, _, err = run_cli(
        capsys, "export", ck, "--onnx", tmp_path / "n.onnx", "--vnnlib", tmp_path / "props.txt" / "deeper"
    )
    assert code == 2
    one_paragraph(err, "cannot be created")
    assert listing(tmp_path) == {"props.txt": b"keep"}


def test_export_into_a_read_only_place_is_refused_before_any_work(run2, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:  # root writes anywhere: the refusal is then shown with a failing probe below
        ro.chmod(0o555)
        code, _, err = run_cli(capsys, "export", run2 / checkpoint.LATEST, "--onnx", ro / "n.onnx")
        ro.chmod(0o755)
        assert code == 2
        one_paragraph(err, "is not writable")
    import tempfile

    real = tempfile.mkstemp

    def refusing(*a, **k):
        if Path(k.get("dir", "")) == ro:
            raise PermissionError(errno.EROFS, os.strerror(errno.EROFS))
        return real(*a, **k)

    monkeypatch.setattr(tempfile, "mkstemp", refusing)
    code, _, err = run_cli(capsys, "export", run2 / checkpoint.LATEST, "--onnx", ro / "n.onnx")
    assert code == 2
    one_paragraph(err, "is not writable", "nothing was written")
    code, _, err = run_cli(
        capsys, "export", run2 / checkpoint.LATEST, "--onnx", tmp_path / "n.onnx", "--vnnlib", ro / "props"
    )
    assert code == 2
    one_paragraph(err, "--vnnlib", "is not writable")
    assert listing(tmp_path) == {}


def test_a_vnnlib_failure_leaves_no_onnx_file_and_no_properties(run2, tmp_path, capsys, monkeypatch):
    real, calls = vnnlib.render, []

    def full_disk(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*a, **k)

    monkeypatch.setattr(vnnlib, "render", full_disk)
    argv = ["export", run2 / checkpoint.LATEST, "--onnx", tmp_path / "n.onnx", "--vnnlib", tmp_path / "p"]
    code, _, err = run_cli(capsys, *argv, "--num-test", 4)
    assert code == 1 and "No space left on device" in err  # a failure of the machine, not a user error
    assert listing(tmp_path) == {} and not any(tmp_path.iterdir())
    monkeypatch.setattr(vnnlib, "render", real)
    assert cli.main([str(a) for a in [*argv, "--num-test", 4]]) == 0
    assert sorted(listing(tmp_path)) == [
        "n.onnx",
        "p/instances.csv",
        "p/prop_0.vnnlib",
        "p/prop_1.vnnlib",
        "p/prop_2.vnnlib",
        "p/prop_3.vnnlib",
    ]
    assert (tmp_path / "p" / "instances.csv").read_text().splitlines()[0] == "../n.onnx,prop_0.vnnlib,60"


# ----------------------------------------------------------------------------- every output option of every command


def test_output_options_aimed_at_a_run_are_refused_and_change_nothing(run2, tmp_path, capsys):
    """report --out RUN/latest.h5, certify --results RUN/ckpt_X.h5, and the other output options aimed at a
    checkpoint, a run's own file or the command's input: exit 2 before any work, every file unchanged."""
    import shutil

    d = shutil.copytree(run2, tmp_path / "r")
    ck, latest = d / "ckpt_00000002.h5", d / checkpoint.LATEST
    (tmp_path / "notes.txt").write_bytes(latest.read_bytes())  # a checkpoint under another name
    before = listing(tmp_path)
    cases = [
        (["report", d, "--out", latest], "names 'latest.h5'"),
        (["report", d, "--out", tmp_path / "notes.txt"], "is an HDF5 file"),
        (["certify", ck, "--results", ck, "--num-test", 4], "names 'ckpt_00000002.h5'"),
        (["certify", latest, "--results", d / "metrics.jsonl", "--num-test", 4], "names 'metrics.jsonl'"),
        (["plot", d, "--out", latest], "names 'latest.h5'"),
        (["tightness", latest, "--out", ck], "names 'ckpt_00000002.h5'"),
        (["landscape", latest, "--out", latest], "names 'latest.h5'"),
        (["export", latest, "--onnx", ck], "names 'ckpt_00000002.h5'"),
        (["export", latest, "--onnx", tmp_path / "notes.txt"], "is an HDF5 file"),
        (["export", latest, "--onnx", tmp_path / "n.onnx", "--vnnlib", latest], "names 'latest.h5'"),
    ]
    for argv, needle in cases:
        code, out, err = run_cli(capsys, *argv)
        assert code == 2, (argv, err)
        one_paragraph(err, needle, "Nothing was written")
        assert "certified" not in out
    assert listing(tmp_path) == before


def test_certify_results_onto_its_own_config_is_refused(run2, tmp_path, capsys):
    import torch
    import yaml

    from mpigls.interop import onnx_io
    from mpigls.nn import models

    cfg = config.load_config(None, tiny_overrides())
    _, model, _ = train.build_problem(cfg)
    models.load_flat_(model, torch.from_numpy(checkpoint.load(run2 / checkpoint.LATEST).theta))
    onnx_io.save_onnx(model, (1, 8, 8), tmp_path / "net.onnx")
    (tmp_path / "cfg.json").write_text(yaml.safe_dump(config.to_dict(cfg)))
    before = listing(tmp_path)
    for target in ("cfg.json", "net.onnx"):
        code, _, err = run_cli(
            capsys, "certify", tmp_path / "net.onnx", "--config", tmp_path / "cfg.json", "--results", tmp_path / target
        )
        assert code == 2
        one_paragraph(err, "same file as this command's input")
    assert listing(tmp_path) == before
