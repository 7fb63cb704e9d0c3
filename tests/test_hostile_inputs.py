"""Hostile inputs: every bad value ends in one paragraph with a defined exit
code, within a time limit, and no file of an earlier run is lost.

Most cases call ``cli.main`` in-process (as ``mpigls`` does) and check: the exit code, that stderr
holds one ``error:`` paragraph and no traceback, and, where files exist, that each earlier file
still exists (same bytes) in the output directory or in its ``aside-*`` folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpigls import argtypes, cli, config, parallel
from mpigls.run import checkpoint, rundir, train

from conftest import REPO, mpiexec, one_paragraph, run_cli, run_mpigls, tiny_overrides

pytestmark = pytest.mark.timeout(120)  # nothing here may hang


def _sets(**extra) -> list[str]:
    out = []
    for item in tiny_overrides(**extra):
        out += ["--set", item]
    return out


def hashes(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()
    }


def assert_nothing_lost(before: dict[str, str], d: Path) -> None:
    """Every file content of ``before`` still exists in ``d`` (same place or moved aside)."""
    now = set(hashes(d).values())
    lost = [name for name, h in before.items() if h not in now]
    assert not lost, f"lost {lost}"


def tiny_cfg(**extra) -> config.Config:
    return config.load_config(None, tiny_overrides(**extra))


@pytest.fixture(scope="module")
def run2(tmp_path_factory) -> Path:
    """A finished 2-generation run directory (copy it before changing anything)."""
    d = tmp_path_factory.mktemp("run2") / "r"
    train.train(tiny_cfg(), d, max_generations=2, log=lambda m: None)
    return d


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------- 1. never lose a run

BOTH = (checkpoint.LATEST, "ckpt_00000002.h5")  # latest.h5 and its copy


def _version_99(d: Path) -> None:
    for name in BOTH:
        with h5py.File(d / name, "r+") as f:
            f.attrs["format_version"] = 99


def _truncate(d: Path) -> None:
    for p in (d / name for name in BOTH):
        data = p.read_bytes()
        p.unlink()
        p.write_bytes(data[: len(data) // 3])


def _checksum(d: Path) -> None:
    for name in BOTH:
        with h5py.File(d / name, "r+") as f:
            f["theta"][0] = f["theta"][0] + 1.0


def _foreign(d: Path) -> None:
    for p in (d / name for name in BOTH):
        p.unlink()
        with h5py.File(p, "w") as f:
            f["data"] = np.arange(3)


@pytest.mark.parametrize(
    "damage, why",
    [
        (_version_99, "format version 99"),
        (_truncate, "truncated"),
        (_checksum, "checksum"),
        (_foreign, "not an mpigls checkpoint"),
    ],
)
def test_unloadable_checkpoints_refuse_the_run_and_restart_moves_them_aside(run2, tmp_path, capsys, damage, why):
    d = copy_run(run2, tmp_path / "r")
    damage(d)
    before = hashes(d)
    code, _, err = run_cli(
        capsys,
        "train",
        "--out",
        d,
        "--no-eval",
        "--max-generations",
        4,
        *_sets(**{"train.checkpoint_every": 1, "train.keep_last": 1}),
    )
    assert code == 2
    one_paragraph(err, "none of them can be resumed", "latest.h5", "ckpt_00000002.h5", why, "--restart")
    assert hashes(d) == before  # refused: nothing changed, nothing deleted
    # the dry run says the same
    code, _, err = run_cli(capsys, "train", "--out", d, "--dry-run", *_sets())
    assert code == 2
    one_paragraph(err, "none of them can be resumed")
    # --restart: the old files move aside (same bytes), the new run starts from generation 0
    code, out, err = run_cli(
        capsys,
        "train",
        "--out",
        d,
        "--no-eval",
        "--max-generations",
        3,
        "--restart",
        *_sets(**{"train.checkpoint_every": 1, "train.keep_last": 1}),
    )
    assert code == 0, err
    assert "moved 3 file(s)" in out  # ckpt, latest.h5, metrics.jsonl
    aside = [p for p in d.iterdir() if p.name.startswith(rundir.ASIDE_PREFIX)]
    assert len(aside) == 1 and hashes(aside[0]) == before
    assert checkpoint.load(d / checkpoint.LATEST).generation == 3
    assert [g for g, _ in checkpoint.list_checkpoints(d)] == [3]


def test_some_unloadable_resume_from_newest_loadable_and_keep_the_others(tmp_path, capsys):
    d = tmp_path / "r"
    train.train(
        tiny_cfg(**{"train.checkpoint_every": 1, "train.keep_last": 5}), d, max_generations=4, log=lambda m: None
    )
    for name in ("ckpt_00000004.h5", checkpoint.LATEST):  # latest.h5 is a copy of it: both unreadable
        with h5py.File(d / name, "r+") as f:
            f.attrs["format_version"] = 99
    old = d / "ckpt_00000001.h5"
    data = old.read_bytes()
    old.write_bytes(data[: len(data) // 2])  # an older one truncated: retention must not delete it either
    before = hashes(d)
    code, out, err = run_cli(
        capsys,
        "train",
        "--out",
        d,
        "--no-eval",
        "--max-generations",
        7,
        *_sets(**{"train.checkpoint_every": 1, "train.keep_last": 1}),
    )
    assert code == 0, err
    assert "resuming from generation 3" in out and "moved into" in out and "format version 99" in out
    # (metrics.jsonl is a live log, cut back to the resumed generation: not a checkpoint to keep)
    assert_nothing_lost(
        {
            k: v
            for k, v in before.items()
            if ("0000000" not in k or k.endswith(("1.h5", "4.h5"))) and k != "metrics.jsonl"
        },
        d,
    )
    aside = next(p for p in d.iterdir() if p.name.startswith(rundir.ASIDE_PREFIX))
    assert sorted(p.name for p in aside.iterdir()) == ["ckpt_00000001.h5", "ckpt_00000004.h5", "latest.h5"]
    assert hashes(aside) == {k: before[k] for k in ("ckpt_00000001.h5", "ckpt_00000004.h5", "latest.h5")}
    assert [g for g, _ in checkpoint.list_checkpoints(d)] == [7]
    assert checkpoint.load(d / checkpoint.LATEST).generation == 7


def test_retention_never_deletes_a_newer_checkpoint(run2, tmp_path):
    ck = checkpoint.load(run2 / checkpoint.LATEST)
    checkpoint.save(tmp_path, dataclasses.replace(ck, generation=50), keep_last=None)
    for g in (3, 4, 5):
        checkpoint.save(tmp_path, dataclasses.replace(ck, generation=g), keep_last=1)
    assert [g for g, _ in checkpoint.list_checkpoints(tmp_path)] == [5, 50]


# ---------------------------------------------------------------------- 2. YAML

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")
)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("extra", [[], ["--print-config"], ["--dry-run"]])
def test_yaml_alias_bomb_is_refused_fast(tmp_path, capsys, extra):
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(BOMB)
    assert len(BOMB) < 400
    t0 = time.perf_counter()
    code, out, err = run_cli(capsys, "train", cfg, "--out", tmp_path / "r", *extra)
    assert code == 2 and time.perf_counter() - t0 < 20
    one_paragraph(err, "bomb.yaml", "anchor &a", "not allowed")
    assert out == "" and not (tmp_path / "r").exists()


def test_yaml_duplicate_key_is_refused(tmp_path, capsys):
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("optimizer:\n  lr: 0.1\n  popsize: 8\n  lr: 0.2\n")
    code, _, err = run_cli(capsys, "train", cfg, "--out", tmp_path / "r", "--print-config")
    assert code == 2
    one_paragraph(err, "dup.yaml", "'lr' twice", "lines 2 and 4")


def test_every_float_spelling_is_a_float(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optimizer:\n  lr: 1e-3\n  sigma_init: 5E-3\n  adam_eps: 1.5e-8\n")
    c = config.load_config(cfg, ["optimizer.sigma_max=2e0", "bound.eps=1e-1"])
    assert (c.optimizer.lr, c.optimizer.sigma_init, c.optimizer.adam_eps) == (1e-3, 5e-3, 1.5e-8)
    assert (c.optimizer.sigma_max, c.bound.eps) == (2.0, 0.1)
    assert config.load_config(None, ["optimizer.lr=1e-3"]).optimizer.lr == 1e-3
    assert config.load_config(None, ["data.name=digits"]).data.name == "digits"  # strings stay strings


@pytest.mark.parametrize(
    "item, key",
    [
        ("data.name=" + "x" * 200_000, "data.name"),
        ("optimizer.lr_milestones=[" + ",".join(["-1"] * 5_000) + "]", "optimizer.lr_milestones"),
        ("optimizer.lr_milestones=[" + ",".join(["-1"] * 500) + "]", "optimizer.lr_milestones"),
    ],
)
def test_huge_value_is_not_printed_in_full(tmp_path, capsys, item, key):
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "r", "--set", item)
    assert code == 2
    one_paragraph(err, key)
    assert len(err) < 1000


# ---------------------------------------------------------------------- 3. sizes and signals


@pytest.mark.parametrize("mode", ["--dry-run", "--no-eval"])
def test_absurd_popsize_is_refused_before_training(tmp_path, capsys, mode):
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "r", mode, *_sets(**{"optimizer.popsize": 10**13}))
    assert code == 2
    one_paragraph(err, "optimizer.popsize", "exceeds 2**23")  # PGPEParams' own check, before any memory estimate
    assert not list(tmp_path.rglob("*.h5"))


def test_bound_memory_budget_beyond_the_machine_is_refused(tmp_path, capsys):
    extra = {"bound.method": "crown-ibp", "bound.options": "{memory_budget_mb: 1.0e+12}"}
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "r", "--dry-run", *_sets(**extra))
    assert code == 2
    one_paragraph(err, "GiB of memory", "bound memory_budget_mb")


def _raise_sigterm_at(monkeypatch, call: int) -> None:
    """SIGTERM this process inside the ``call``-th bound evaluation (a generation in progress)."""
    from mpigls.objectives import losses

    real, calls = losses.certified_loss, [0]

    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] == call:
            signal.raise_signal(signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(losses, "certified_loss", wrapped)


_STOP_EXTRA = {"optimizer.block_size": 1, "train.checkpoint_every": 100}  # popsize 10: 5 blocks per generation


def _stop_then_resume_bitwise(tmp_path, capsys, monkeypatch, arm, done: int) -> str:
    """A 4-generation reference run; then the CLI run with ``arm()`` installing a SIGTERM: it must
    exit 3 with the checkpoint at generation ``done``, and resuming without the signal must end on
    the reference's theta and state bit for bit. Returns the stopped run's stdout."""
    ref = train.train(tiny_cfg(**_STOP_EXTRA), tmp_path / "ref", max_generations=4, log=lambda m: None)
    arm()
    code, out, err = run_cli(
        capsys, "train", "--out", tmp_path / "r", "--no-eval", "--max-generations", 4, *_sets(**_STOP_EXTRA)
    )
    assert code == 3, err
    assert f"checkpoint written at generation {done}" in out
    assert checkpoint.load(tmp_path / "r" / checkpoint.LATEST).generation == done
    monkeypatch.undo()
    res = train.train(tiny_cfg(**_STOP_EXTRA), tmp_path / "r", max_generations=4, log=lambda m: None)
    assert res.generation == 4
    assert checkpoint.theta_sha256(res.theta.numpy()) == checkpoint.theta_sha256(ref.theta.numpy())
    a = checkpoint.load(tmp_path / "r" / checkpoint.LATEST)
    b = checkpoint.load(tmp_path / "ref" / checkpoint.LATEST)
    assert checkpoint.state_sha256(a) == checkpoint.state_sha256(b)
    return out


def test_signal_mid_generation_stops_at_once_and_resumes_bitwise(tmp_path, capsys, monkeypatch):
    # calls: 1 preflight trial, then 5 per generation; call 13 is block 2 of generation 3
    out = _stop_then_resume_bitwise(tmp_path, capsys, monkeypatch, lambda: _raise_sigterm_at(monkeypatch, 13), 2)
    assert "during generation 3" in out


@pytest.mark.parametrize("where", ["last block", "after the exchange"])
def test_signal_at_the_end_of_a_generation_rides_in_the_exchange(tmp_path, capsys, monkeypatch, where):
    """The stop flags ride in the loss all-gather (unit.Control). A signal during the LAST block of
    generation 3 is agreed in that generation's exchange: generation 3 completes and is the checkpoint.
    A signal after the exchange (here: in generation 2's validation) is seen by generation 3's
    evaluation, which is dropped: the checkpoint is generation 2. Either way the run resumes bitwise."""
    from mpigls.run import monitor

    def after_the_exchange():
        real, calls = monitor.Monitor.update, [0]

        def update(self, *a, **k):
            calls[0] += 1
            if calls[0] == 2:  # generation 2, after its exchange
                signal.raise_signal(signal.SIGTERM)
            return real(self, *a, **k)

        monkeypatch.setattr(monitor.Monitor, "update", update)

    if where == "last block":  # preflight trial, generations 1-2, block 5 of 3
        arm, done = (lambda: _raise_sigterm_at(monkeypatch, 1 + 5 * 2 + 5)), 3
    else:
        arm, done = after_the_exchange, 2
    out = _stop_then_resume_bitwise(tmp_path, capsys, monkeypatch, arm, done)
    assert ("during generation 3" in out) == (where == "after the exchange")


def test_stoppable_blocks_stop_between_blocks_and_stay_stopped():
    class Stop:
        requested = False

    class Comm:
        def agree_any(self, flag):
            return flag

    stop = Stop()
    blocks = parallel.StoppableBlocks([3, 4, 5], stop)
    assert list(blocks) == [3, 4, 5] and len(blocks) == 3 and blocks[1] == 4
    assert not blocks.agree_stop(Comm())
    seen = []
    for b in blocks:
        seen.append(b)
        stop.requested = True
    assert seen == [3] and blocks.cut_short and blocks.agree_stop(Comm()) and blocks.stopped
    stop.requested = False
    assert list(blocks) == []  # sticky: the run is stopping


def _env(tag: str) -> dict[str, str]:
    drop = ("PMI_", "PMIX_", "HYDRA_", "MPIR_", "OMPI_", "I_MPI_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        MPIGLS_TEST_TAG=tag,
    )
    return env


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_sigterm_interrupts_a_generation_that_would_take_hours(tmp_path, ranks):
    """popsize 2e6 with one pair per block: one generation is ~1e6 blocks; SIGTERM ends it in seconds."""
    cmd = [
        sys.executable,
        "-m",
        "mpi4py",
        "-m",
        "mpigls",
        "train",
        "--out",
        str(tmp_path / "r"),
        "--no-eval",
        *_sets(**{"optimizer.popsize": 2_000_000, "optimizer.block_size": 1}),
    ]
    if ranks > 1:
        exe = mpiexec()
        if exe is None:
            pytest.skip("mpiexec not found")
        cmd = [exe, "-n", str(ranks), *cmd]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(uuid.uuid4().hex), cwd=REPO
    )
    try:
        line = ""
        while "work blocks per generation" not in line:
            line = proc.stdout.readline()
            assert line, f"ended early: {proc.stderr.read()}"
        time.sleep(1.0)  # well inside generation 1
        proc.send_signal(signal.SIGTERM)  # mpiexec forwards it to every rank (as SLURM's scancel does)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 3, err
    assert "during generation 1" in out and "checkpoint written at generation 0" in out
    assert "Traceback" not in err
    assert checkpoint.load(tmp_path / "r" / checkpoint.LATEST).generation == 0


# ---------------------------------------------------------------------- 4. no tracebacks for user errors


def test_out_is_a_file_or_under_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("keep me")
    code, _, err = run_cli(capsys, "train", "--out", f, *_sets())
    assert code == 2
    one_paragraph(err, "exists and is a file")
    code, _, err = run_cli(capsys, "train", "--out", f / "sub" / "dir", *_sets())
    assert code == 2
    one_paragraph(err, "is a file, not a directory")
    code, _, err = run_cli(capsys, "train", "--out", f / "sub", "--dry-run", *_sets())
    assert code == 2
    one_paragraph(err, "is a file, not a directory")
    assert f.read_text() == "keep me"


def test_unwritable_out_is_refused_before_training(tmp_path, capsys, monkeypatch):
    d = tmp_path / "ro"
    d.mkdir()
    real = rundir.tempfile.mkstemp

    def mkstemp(*a, dir=None, **k):  # what a read-only directory does (also for root, unlike chmod)
        if dir is not None and Path(dir) == d:
            raise PermissionError(errno.EACCES, "Permission denied", str(d))
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(rundir.tempfile, "mkstemp", mkstemp)
    for mode in ("--dry-run", "--no-eval"):
        code, out, err = run_cli(capsys, "train", "--out", d, mode, *_sets())
        assert code == 2
        one_paragraph(err, "is not writable", "Permission denied")
        assert "gen " not in out
    assert list(d.iterdir()) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only dirs")
def test_read_only_out_directory(tmp_path, capsys):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        code, _, err = run_cli(capsys, "train", "--out", d, *_sets())
    finally:
        d.chmod(0o755)
    assert code == 2
    one_paragraph(err, "is not writable")


def test_too_many_threads(tmp_path, capsys):
    for mode in ("--dry-run", "--no-eval"):
        code, _, err = run_cli(capsys, "train", "--out", tmp_path / "r", mode, *_sets(**{"train.threads": 100000}))
        assert code == 2
        one_paragraph(err, "train.threads=100000", "CPU cores")


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    real, calls = checkpoint._write_file, [0]

    def write_file(path, ckpt):
        calls[0] += 1
        if calls[0] == 2:
            with open(path, "wb") as f:
                f.write(b"\0" * 100)  # a partial file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, ckpt)

    monkeypatch.setattr(checkpoint, "_write_file", write_file)
    d = tmp_path / "r"
    code, _, err = run_cli(capsys, "train", "--out", d, "--no-eval", "--max-generations", 6, *_sets())
    assert code == 2
    one_paragraph(err, "could not write checkpoint ckpt_00000004.h5", "No space left on device", "intact")
    assert checkpoint.load(d / checkpoint.LATEST).generation == 2
    assert sorted(p.name for p in d.iterdir()) == ["ckpt_00000002.h5", "latest.h5", "metrics.jsonl"]  # no temp file


def test_h5py_style_disk_full_message_names_the_os_error(tmp_path):
    exc = OSError(
        "Unable to synchronously create dataset (file write failed: time = Mon, errno = 28, "
        "error message = 'No space left on device')"
    )
    msg = checkpoint._write_failure(tmp_path, tmp_path / "ckpt_00000001.h5", exc)
    assert msg.startswith("could not write checkpoint ckpt_00000001.h5") and "No space left on device" in msg


def _save_variant(run2: Path, dst: Path, **changes) -> Path:
    ck = checkpoint.load(run2 / checkpoint.LATEST)
    checkpoint.save(dst, dataclasses.replace(ck, **changes), keep_last=None)
    return dst / checkpoint.LATEST


def test_certify_checkpoint_whose_config_is_not_a_mapping(run2, tmp_path, capsys):
    path = _save_variant(run2, tmp_path)
    with h5py.File(path, "r+") as f:
        del f[checkpoint.DS_CONFIG]
        f[checkpoint.DS_CONFIG] = json.dumps([1, 2, 3])
    code, _, err = run_cli(capsys, "certify", path)  # the config checksum catches the edit
    assert code == 2
    one_paragraph(err, "config or architecture does not match its checksum")
    with h5py.File(path, "r+") as f:  # without its checksum the file is damaged, not old
        del f.attrs["config_sha256"]
    code, _, err = run_cli(capsys, "certify", path)
    assert code == 2
    one_paragraph(err, "without its config checksum")


def test_edited_eps_in_the_stored_config_is_refused(run2, tmp_path, capsys):
    """Editing eps 0.05 -> 0.09 in the file's bytes (same length) must not certify at 0.09 silently."""
    path = tmp_path / "edited.h5"
    path.write_bytes((run2 / checkpoint.LATEST).read_bytes())
    data = path.read_bytes()
    assert data.count(b'"eps": 0.05') == 1
    path.write_bytes(data.replace(b'"eps": 0.05', b'"eps": 0.09'))
    with pytest.raises(checkpoint.CheckpointError, match="config or architecture does not match its checksum"):
        checkpoint.load(path)
    code, out, err = run_cli(capsys, "certify", path, "--num-test", 4)
    assert code == 2 and "certified" not in out
    one_paragraph(err, "edited or damaged")
    assert checkpoint.load(run2 / checkpoint.LATEST).config["bound"]["eps"] == 0.05  # the intact file loads


# ---------------------------------------------------------------------- 5. --dry-run validates like train

DRY_RUN_CASES = [
    ({"optimizer.lr": ".inf"}, "optimizer.lr must be a finite number"),
    ({"optimizer.beta1": 1.5}, "optimizer.beta1 must lie in [0, 1)"),
    ({"optimizer.beta2": ".nan"}, "optimizer.beta2 must be a finite number"),
    ({"optimizer.weight_decay": -1}, "optimizer.weight_decay must be >= 0"),
    ({"train.batch_size": 100000}, "larger than the training set"),
    ({"model.init_from": "/nonexistent/ckpt.h5"}, "/nonexistent/ckpt.h5"),
    ({"bound.options": "{foo: 1}"}, "bound.options"),
    ({"bound.method": "staps", "bound.options": "{staps_mix: 5}"}, "staps_mix"),
]


@pytest.mark.parametrize("extra, message", DRY_RUN_CASES)
def test_dry_run_rejects_what_train_rejects(tmp_path, capsys, extra, message):
    code, out, err = run_cli(capsys, "train", "--out", tmp_path / "r", "--dry-run", *_sets(**extra))
    assert code == 2 and "config ok" not in out
    dry = one_paragraph(err, message)
    code, out, err = run_cli(capsys, "train", "--out", tmp_path / "r", "--no-eval", *_sets(**extra))
    assert code == 2
    assert one_paragraph(err, message).replace("mpigls train: ", "") == dry.replace("mpigls train: ", "")
    assert not list(tmp_path.rglob("*.h5"))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_dry_run_rejects_cuda_without_gpu(tmp_path, capsys):
    for mode in ("--dry-run", "--no-eval"):
        code, _, err = run_cli(capsys, "train", "--out", tmp_path / "r", mode, *_sets(**{"train.device": "cuda"}))
        assert code == 2
        one_paragraph(err, "train.device=cuda", "no CUDA GPU")


def test_dry_run_of_a_good_config_says_what_it_would_do(run2, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "train", "--out", tmp_path / "new", "--dry-run", *_sets())
    assert code == 0 and "config ok" in out and "would start a new run" in out and not (tmp_path / "new").exists()
    d = copy_run(run2, tmp_path / "r")
    code, out, _ = run_cli(capsys, "train", "--out", d, "--dry-run", *_sets())
    assert code == 0 and "would resume" in out and "generation 2" in out


# ---------------------------------------------------------------------- 6. nonsense


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"bound.eps": 1000}, "bound.eps must lie in [0, 1]"),
        ({"eval.num_test": 0}, "eval.num_test must be >= 1"),
    ],
)
def test_nonsense_values(tmp_path, capsys, extra, message):
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "r", *_sets(**extra))
    assert code == 2
    one_paragraph(err, message)


def test_empty_out_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for mode in ("--dry-run", "--no-eval"):
        code, _, err = run_cli(capsys, "train", "--out", "", mode, *_sets())
        assert code == 2
        one_paragraph(err, "--out is empty")
    assert list(tmp_path.iterdir()) == []


def test_certify_refuses_nan_theta(run2, tmp_path, capsys):
    ck = checkpoint.load(run2 / checkpoint.LATEST)
    theta = ck.theta.copy()
    theta[::7] = np.nan
    path = _save_variant(run2, tmp_path, theta=theta)
    code, out, err = run_cli(capsys, "certify", path)
    assert code == 2 and "%" not in out
    one_paragraph(err, "non-finite parameter", "NaN")


def test_inspect_json_is_valid_json_with_null_for_nan(run2, tmp_path, capsys):
    ck = checkpoint.load(run2 / checkpoint.LATEST)
    metrics = dict(ck.metrics, **{"loss/mean": np.array([1.0, math.nan]), "x/inf": np.array([math.inf])})
    path = _save_variant(run2, tmp_path, metrics=metrics)
    code, out, _ = run_cli(capsys, "inspect", path, "--json")
    assert code == 0

    def no_constants(name):
        raise AssertionError(f"bare {name} in JSON output")

    data = json.loads(out, parse_constant=no_constants)
    assert data["metrics"]["loss/mean"] is None and data["metrics"]["x/inf"] is None


# ---------------------------------------------------------------------- 7. messages that mislead


def test_config_path_that_is_a_directory_or_a_device(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", tmp_path, "--out", tmp_path / "r")
    assert code == 2
    one_paragraph(err, "is a directory, not a YAML file")
    if Path("/dev/null").exists():
        code, _, err = run_cli(capsys, "train", "/dev/null", "--out", tmp_path / "r")
        assert code == 2
        one_paragraph(err, "/dev/null", "not a regular file")
    code, _, err = run_cli(capsys, "train", tmp_path / "missing.yaml", "--out", tmp_path / "r")
    assert code == 2
    one_paragraph(err, "missing.yaml", "does not exist")


def test_binary_config_names_the_file(tmp_path, capsys):
    cfg = tmp_path / "model.bin"
    cfg.write_bytes(bytes(range(256)) * 4)
    code, _, err = run_cli(capsys, "train", cfg, "--out", tmp_path / "r")
    assert code == 2
    one_paragraph(err, "model.bin", "not a UTF-8 text file")


@pytest.mark.parametrize(
    "seed, message", [("1e23", "must be of type int"), (str(10**23), "[0, 2**63 - 1]"), ("-1", "[0, 2**63 - 1]")]
)
def test_seed_out_of_range(tmp_path, capsys, seed, message):
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "r", "--dry-run", *_sets(**{"train.seed": seed}))
    assert code == 2
    one_paragraph(err, "train.seed", message)


def test_plot_says_the_file_it_wrote(run2, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    outdir = tmp_path / "figs"
    outdir.mkdir()
    code, out, _ = run_cli(capsys, "plot", run2 / checkpoint.LATEST, "--out", outdir)
    assert code == 0 and out.strip() == f"wrote {outdir / 'metrics.png'}"
    assert (outdir / "metrics.png").stat().st_size > 0
    code, out, _ = run_cli(capsys, "plot", run2 / checkpoint.LATEST, "--out", tmp_path / "curve")
    assert code == 0 and out.strip() == f"wrote {tmp_path / 'curve.png'}" and (tmp_path / "curve.png").exists()


def test_certify_architecture_advice_does_not_mention_out(run2, capsys):
    code, _, err = run_cli(capsys, "certify", run2 / checkpoint.LATEST, "--set", "model.name=mlp")
    assert code == 2
    line = one_paragraph(err, "different architecture", "--set")
    assert "--out" not in line


@pytest.mark.slow
def test_refusal_under_mpi_is_one_paragraph_from_every_rank(run2, tmp_path):
    from conftest import run_mpigls

    d = copy_run(run2, tmp_path / "r")
    _version_99(d)
    before = hashes(d)
    res = run_mpigls(["train", "--out", str(d), "--no-eval", *_sets()], ranks=2, timeout=120, check=False)
    assert res.returncode == 2, res.stderr
    one_paragraph(res.stderr, "none of them can be resumed", "--restart")
    assert hashes(d) == before


# --------------------------------------------------- values that parse but mean nothing: the config

# (key, YAML value) pairs that look hostile but mean something documented
_MEANINGFUL = {
    ("optimizer.lr_milestones", "[]"),  # no lr decay
    ("bound.options", "{}"),  # the method's defaults
}
_HOSTILE_ANY = ["-5", "-0.5", ".nan", ".inf", "-.inf", "''", "'  '", '"a\\0b"']
_HOSTILE_INT = [str(2**64), str(-(2**64))]
_HOSTILE_CONTAINER = ["[]", "{}"]


def _every_key() -> list[tuple[str, str]]:
    """(optimizer, key) for every config key of every section, each optimizer's keys under it."""
    from mpigls.optim import registry as optimizers

    out = [("pgpe", k) for k, _, _ in config.describe() if not k.startswith("optimizer.")]
    for name in optimizers.OPTIMIZERS:
        out += [(name, f"optimizer.{k}") for k in config.optimizer_keys(name) if k != "name"]
    return out


def _annotation_of(opt: str, key: str) -> str:
    """The declared type of a key, as text (e.g. "int | None")."""
    import typing

    from mpigls.optim import registry as optimizers
    from mpigls.optim.unit import LoopParams

    section, name = key.split(".")
    classes = (
        [LoopParams, optimizers.get(opt).Params]
        if section == "optimizer"
        else [typing.get_type_hints(config.Config)[section]]
    )
    hints = {k: v for cls in classes for k, v in typing.get_type_hints(cls).items()}
    return str(hints[name])


@pytest.mark.parametrize("opt, key", _every_key(), ids=lambda v: v)
def test_every_config_key_refuses_values_that_mean_nothing(opt, key):
    """Negative counts, NaN and infinities, blank strings, NUL bytes, integers beyond 64 bits and
    empty containers are refused for every key of every section (each optimizer's own keys too),
    unless the value is documented to mean something (``_MEANINGFUL``)."""
    kind = _annotation_of(opt, key)
    values = list(_HOSTILE_ANY)
    if "int" in kind:
        values += _HOSTILE_INT
    if "list" in kind or "dict" in kind:
        values += _HOSTILE_CONTAINER
    accepted = []
    for value in values:
        if (key, value) in _MEANINGFUL:
            continue
        try:
            config.load_config(None, [f"optimizer.name={opt}", f"{key}={value}"])
        except config.ConfigError as exc:
            assert key.split(".")[-1] in str(exc), (key, value, str(exc))
        else:
            accepted.append(value)
    assert not accepted, f"{key} ({opt}) accepts {accepted}"


@pytest.mark.parametrize(
    "item, message",
    [
        ("eval.methods=[]", "eval.methods must name each bound method once, at least one"),
        ("eval.methods=[ibp, ibp]", "eval.methods must name each bound method once"),
        ("data.root=''", "data.root is an empty string"),
        ("model.init_from=' '", "model.init_from is an empty string"),
        ("track.wandb_name=''", "track.wandb_name is an empty string"),
        (f"train.batch_size={2**64}", "beyond the 64-bit integers"),
        (f"data.num_test={2**70}", "beyond the 64-bit integers"),
    ],
)
def test_values_that_mean_nothing_are_refused_in_one_paragraph(tmp_path, capsys, item, message):
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "r", "--dry-run", *_sets(), "--set", item)
    assert code == 2
    one_paragraph(err, message)
    assert not (tmp_path / "r").exists()


def test_user_error_at_one_rank_under_python_m_mpi4py_exits_2_without_abort(tmp_path):
    """``python -m mpi4py`` turns a non-zero SystemExit into MPI_Abort; a one-rank user error is
    still one paragraph and exit code 2, with no abort line after it."""
    pytest.importorskip("mpi4py")
    proc = run_mpigls(["train", "--out", str(tmp_path / "r"), "--set", "train.epochs=-1"], check=False)
    assert proc.returncode == 2, proc.stderr
    one_paragraph(proc.stderr, "train.epochs must be > 0")
    assert "Abort" not in proc.stderr and not (tmp_path / "r").exists()


def _strict_json(text: str):
    def refuse(token):
        raise AssertionError(f"bare {token} in JSON output")

    return json.loads(text, parse_constant=refuse)


def test_every_json_writer_is_strict(tmp_path):
    """No results file or JSON output holds a bare NaN/Infinity (JSON has none; strict readers fail)."""
    from mpigls.analysis import report as analysis_report
    from mpigls.studies import report as study_report

    with pytest.raises(RuntimeError, match="non-finite"):
        rundir.write_json(tmp_path / "r.json", {"time_limit": math.nan})
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left
    rundir.write_json(tmp_path / "r.json", rundir.json_safe({"time_limit": math.nan}))
    assert _strict_json((tmp_path / "r.json").read_text()) == {"time_limit": None}
    table = {"metrics": ["natural"], "rows": [{"natural": math.nan, "eps": math.inf}]}
    assert _strict_json(analysis_report.format_table(table, "json"))["rows"][0] == {"natural": None, "eps": None}
    stats = {"mean": study_report.Stat(math.nan, None, 0), "std": study_report.Stat(0.5, math.inf, 2)}
    assert _strict_json(study_report.to_json(stats)) == {
        "mean": {"mean": None, "std": None, "n": 0},
        "std": {"mean": 0.5, "std": None, "n": 2},
    }


@pytest.mark.parametrize("pgd_steps, pgd_restarts", [(0, 1), (5, 0)])
def test_no_attack_reports_no_adversarial_accuracy(pgd_steps, pgd_restarts):
    """Without a PGD attack (0 steps or 0 restarts) there is no adversarial accuracy: it is left out,
    never reported as the natural accuracy."""
    from mpigls.evaluation import certify
    from mpigls.nn import models

    dataset, model, _ = train.build_problem(tiny_cfg())
    x, y = dataset.test_x[:16], dataset.test_y[:16]
    theta = models.flat_params(model)
    kw = {"pgd_steps": pgd_steps, "pgd_restarts": pgd_restarts, "batch_size": 8}
    summary, samples = certify.certify(model, theta, x, y, 0.05, ["ibp"], **kw)
    assert "adversarial" not in summary and "adversarial" not in samples
    assert summary["natural"] >= summary["certified"]
    attacked, _ = certify.certify(model, theta, x, y, 0.05, ["ibp"], pgd_steps=5, pgd_restarts=1, batch_size=8)
    assert attacked["certified"] <= attacked["adversarial"] <= attacked["natural"]


# ------------------------------------------ values that parse but mean nothing: the command line


def _options() -> list[tuple[str, argparse.Action]]:
    """(command, action) of every option of every command and subcommand."""
    found = []

    def walk(parser: argparse.ArgumentParser, prog: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{prog} {name}".strip())
            elif action.option_strings:
                found.append((prog, action))

    walk(cli.build_parser(), "")
    return found


def _numeric_options() -> list[tuple[str, argparse.Action]]:
    return [(prog, a) for prog, a in _options() if getattr(a.type, "__module__", None) == argtypes.__name__]


def test_every_numeric_option_has_a_checked_type():
    """A bare int or float type would let NaN, inf or a negative count through to the command."""
    bare = [f"{prog} {a.option_strings[0]}" for prog, a in _options() if a.type in (int, float)]
    assert not bare, f"use mpigls.commands.argtypes for {bare}"
    assert len(_numeric_options()) >= 15


@pytest.mark.parametrize("prog, action", _numeric_options(), ids=lambda v: getattr(v, "dest", v))
def test_every_numeric_option_refuses_values_that_mean_nothing(prog, action):
    for text in ("nan", "inf", "-inf", "NaN", "1e999", "-1", "", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            action.type(text)
    if action.default is not None and not isinstance(action.default, str):
        assert action.type(str(action.default).strip("[]")) is not None  # the default itself passes


@pytest.mark.parametrize(
    "args, needle",
    [
        (["certify", "CKPT", "--time-limit", "nan"], "argument --time-limit: 'nan' is not a finite number"),
        (["certify", "CKPT", "--pgd-restarts", "0"], "argument --pgd-restarts: '0' is below 1"),
        (["certify", "CKPT", "--eps", "inf"], "argument --eps: 'inf' is not a finite number"),
        (["certify", "CKPT", "--num-test", "-5"], "argument --num-test: '-5' is below 1"),
        (["export", "CKPT", "--onnx", "o.onnx", "--timeout", "nan"], "argument --timeout"),
        (["landscape", "CKPT", "--sigmas", "1e-3,nan"], "argument --sigmas"),
        (["tightness", "CKPT", "--max-eps", "-0.1"], "argument --max-eps"),
    ],
)
def test_nonsense_numbers_on_the_command_line_are_refused_at_parse_time(capsys, args, needle):
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_certify_results_file_is_strict_json_and_has_no_adversarial_without_attack(run2, tmp_path, capsys):
    out = tmp_path / "res.json"
    code, _, err = run_cli(
        capsys, "certify", run2 / checkpoint.LATEST, "--results", out, "--json", "--set", "eval.pgd_steps=0"
    )
    assert code == 0, err
    data = _strict_json(out.read_text())
    assert "adversarial" not in data["summary"] and data["time_limit"] == 60.0


def _pipe_to_closed_reader(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``python -m mpigls ARGS`` with stdout a pipe whose reader has already gone (``| head -0``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    read, write = os.pipe()
    os.close(read)  # the reader goes away before the command prints anything
    try:
        return subprocess.run(
            [sys.executable, "-m", "mpigls", *args],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
            env=env,
            cwd=cwd,
        )
    finally:
        os.close(write)


@pytest.mark.timeout(600)  # two subprocesses that import torch, on a busy machine
def test_output_into_a_closed_pipe_ends_quietly_and_keeps_the_files(run2, tmp_path):
    """``inspect --json | head -1`` and ``certify --json | head``: no BrokenPipe traceback, exit 0, and
    certify still writes its per-sample results after printing."""
    d = copy_run(run2, tmp_path / "r")
    proc = _pipe_to_closed_reader(["inspect", "--json", str(d)], tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "Broken" not in proc.stderr, proc.stderr
    out = tmp_path / "res.json"
    cheap = ["--num-test", "8", "--set", "eval.pgd_steps=0", "--set", "eval.methods=[ibp]"]
    proc = _pipe_to_closed_reader(["certify", str(d), "--json", "--results", str(out), *cheap], tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "Broken" not in proc.stderr, proc.stderr
    assert _strict_json(out.read_text())["summary"]["num_examples"] == 8
