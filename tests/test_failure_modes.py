"""Failure modes of a run and of its readers: a disk that fills during HDF5's flush, certify where the
results cannot be saved, latest.h5 as an independent copy, run directories accepted by inspect and
certify, --max-generations at or below the current generation, and whole (never cut) messages."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import h5py
import pytest

from mpigls import cli, config
from mpigls.run import checkpoint, monitor, rundir, train

from conftest import tiny_overrides

pytestmark = pytest.mark.timeout(120)

H5_DISK_FULL = (
    "Unable to synchronously flush file (file write failed: time = Sun Dec  6 01:00:00 2026, filename = "
    "'x.h5', file descriptor = 5, errno = 28, error message = 'No space left on device', buf = 0x1, "
    "total write size = 4096, bytes this sub-write = 4096, bytes actually written = 18446744073709551615, "
    "offset = 0)"
)


def _sets(**extra) -> list[str]:
    out = []
    for item in tiny_overrides(**extra):
        out += ["--set", item]
    return out


def _cfg(**extra) -> config.Config:
    return config.load_config(None, tiny_overrides(**extra))


@pytest.fixture(scope="module")
def run2(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("run2") / "r"
    train.train(_cfg(), d, max_generations=2, log=lambda m: None)
    return d


def _temps(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith(checkpoint.TEMP_PREFIX))


def test_disk_full_during_the_hdf5_flush_is_the_documented_paragraph(tmp_path, capsys, monkeypatch):
    d = tmp_path / "r"
    assert cli.main(["train", "--out", str(d), "--no-eval", "--max-generations", "2", *_sets()]) == 0
    capsys.readouterr()

    def full(self):
        raise RuntimeError(H5_DISK_FULL)

    monkeypatch.setattr(h5py.File, "flush", full)
    code = cli.main(["train", "--out", str(d), "--no-eval", "--max-generations", "4", *_sets()])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "Can't destroy cache" not in err
    assert "could not write checkpoint ckpt_00000004.h5" in err and "No space left on device" in err
    assert "intact" in err and "run the same command to resume" in err
    monkeypatch.undo()
    assert _temps(d) == []
    assert checkpoint.load(d / checkpoint.LATEST).generation == 2


def test_a_full_disk_while_cutting_the_metrics_log_leaves_no_temp_file(tmp_path, monkeypatch):
    log = tmp_path / monitor.METRICS_FILE
    lines = [b'{"schema": "mpigls-metrics"}\n'] + [b'{"generation": %d, "loss": 1.0}\n' % g for g in (1, 2, 3)]
    log.write_bytes(b"".join(lines))
    real_write = Path.write_bytes

    def half_then_full(self, data):
        real_write(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        monitor.truncate_log(log, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [monitor.METRICS_FILE]
    assert log.read_bytes() == b"".join(lines)  # untouched
    said: list[str] = []
    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    monitor.MetricsLog(log, 2, say=said.append).close()  # training goes on without the log
    monkeypatch.undo()
    assert len(said) == 1 and "disabled" in said[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [monitor.METRICS_FILE]


def test_certify_prints_first_then_says_where_it_could_not_save(run2, tmp_path, capsys, monkeypatch):
    def read_only(path, obj):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(rundir, "write_json", read_only)
    code = cli.main(["certify", str(run2), "--num-test", "8", "--methods", "ibp"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "natural" in cap.out and "certified/ibp" in cap.out  # the answer is out
    assert "Traceback" not in cap.err
    expected = run2 / f"{checkpoint.LATEST[:-3]}.certify-eps0.05.json"
    assert f"could not be saved to {expected}" in cap.err and "Read-only file system" in cap.err
    assert "--results FILE" in cap.err
    elsewhere = tmp_path / "ro" / "cert.json"
    code = cli.main(["certify", str(run2), "--num-test", "8", "--methods", "ibp", "--results", str(elsewhere)])
    cap = capsys.readouterr()
    assert code == 2 and "certified/ibp" in cap.out
    assert f"error: the per-sample results could not be saved to {elsewhere}" in cap.err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only (0555) directory anyway")
def test_certify_in_a_real_read_only_directory(run2, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / checkpoint.LATEST).write_bytes((run2 / checkpoint.LATEST).read_bytes())
    ro.chmod(0o555)
    try:
        code = cli.main(["certify", str(ro / checkpoint.LATEST), "--num-test", "8", "--methods", "ibp"])
    finally:
        ro.chmod(0o755)
    cap = capsys.readouterr()
    assert code == 0 and "certified/ibp" in cap.out and "Traceback" not in cap.err
    assert "could not be saved to" in cap.err and "--results FILE" in cap.err


def test_inspect_and_certify_accept_a_run_directory(run2, tmp_path, capsys):
    assert cli.main(["inspect", str(run2), "--json"]) == 0
    assert '"generation": 2' in capsys.readouterr().out
    results = tmp_path / "c.json"
    assert cli.main(["certify", str(run2), "--num-test", "4", "--methods", "ibp", "--results", str(results)]) == 0
    assert str(run2 / checkpoint.LATEST) in results.read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert cli.main(["inspect", str(empty)]) == 2
    assert "directory without a loadable checkpoint" in capsys.readouterr().err


def test_latest_is_a_copy_so_one_damaged_file_leaves_the_other(run2, tmp_path, capsys):
    d = tmp_path / "r"
    train.train(_cfg(**{"train.checkpoint_every": 1}), d, max_generations=2, log=lambda m: None)
    assert not (d / checkpoint.LATEST).samefile(d / "ckpt_00000002.h5")
    with h5py.File(d / "ckpt_00000002.h5", "r+") as f:
        f["theta"][0] = f["theta"][0] + 1.0  # one damaged block
    assert checkpoint.load(d / checkpoint.LATEST).generation == 2
    logs: list[str] = []
    res = train.train(_cfg(**{"train.checkpoint_every": 1}), d, max_generations=3, log=logs.append)
    assert res.generation == 3 and any("resuming from generation 2" in m for m in logs)


def test_max_generations_below_the_run_says_it_did_nothing(run2, tmp_path):
    d = tmp_path / "r"
    train.train(_cfg(), d, max_generations=3, log=lambda m: None)
    before = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    logs: list[str] = []
    res = train.train(_cfg(), d, max_generations=2, log=logs.append)
    assert res.generation == 3
    assert any("nothing to do" in m and "already at generation 3" in m and "nothing was written" in m for m in logs)
    assert not any("3->2" in m for m in logs), logs
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()} == before  # the log too


def test_max_generations_zero_writes_the_initial_checkpoint(tmp_path):
    d = tmp_path / "r"
    res = train.train(_cfg(), d, max_generations=0, log=lambda m: None)
    assert res.generation == 0 and res.checkpoint_path == str(d / "ckpt_00000000.h5")
    ckpt = checkpoint.load(d / checkpoint.LATEST)
    assert ckpt.generation == 0
    again = train.train(_cfg(), d, max_generations=1, log=lambda m: None)  # and it resumes from there
    straight = train.train(_cfg(), tmp_path / "s", max_generations=1, log=lambda m: None)
    assert again.theta.equal(straight.theta)


def test_odd_popsize_names_valid_sizes():
    with pytest.raises(ValueError, match=r"got 1; use 2$"):
        config.load_config(None, ["optimizer.popsize=1"])
    with pytest.raises(ValueError, match=r"got 7; use 6 or 8$"):
        config.load_config(None, ["optimizer.popsize=7"])


def test_warnings_about_unreadable_checkpoints_are_whole(tmp_path):
    d = tmp_path / ("a-long-directory-name-" * 4) / "r"
    train.train(_cfg(**{"train.checkpoint_every": 1}), d, max_generations=2, log=lambda m: None)
    for name in ("ckpt_00000002.h5", checkpoint.LATEST):
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: len(data) // 3])
    logs: list[str] = []
    train.train(_cfg(**{"train.checkpoint_every": 1}), d, max_generations=3, log=logs.append)
    warning = next(m for m in logs if m.startswith("warning:"))
    assert "chars" not in warning and "..." not in warning
    assert warning.count("use an older checkpoint (find_latest falls back automatically)") == 2, warning
