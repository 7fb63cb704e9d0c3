"""Tests of mpigls.run.checkpoint: round trip, atomic replacement, fallbacks and clear errors."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mpigls.run import checkpoint as C, rundir as R

h5py = C.h5py  # only checkpoint.py imports h5py; tests borrow it to craft damaged files
REPO = Path(__file__).resolve().parents[1]
ARCH = {"name": "cnn3", "in_shape": [1, 8, 8], "num_classes": 10, "mean": None, "std": None}


def make(generation=5, d=37, seed=0, sigma=True) -> C.Checkpoint:
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal(d).astype(np.float32)
    theta[:3] = [np.float32(1e-40), -0.0, np.float32(3.4e38)]  # subnormal, signed zero, huge
    return C.Checkpoint(
        generation=generation,
        epoch=2,
        batch_in_epoch=7,
        theta=theta,
        sigma=rng.random(d).astype(np.float32) if sigma else None,
        opt_state={
            "m": rng.standard_normal(d),
            "v": rng.random(d).astype(np.float32),
            "step/count": 11,
            "lr": 0.125,
            "nesterov": False,
            "rule": "clipup",
            "ranks": np.arange(6, dtype=np.int64).reshape(2, 3),
            "scalar0d": np.array(2.5),
        },
        config={"model": {"name": "cnn3"}, "train": {"seed": 3, "eps": [0.1, 0.2]}, "note": None},
        arch=dict(ARCH),
        metrics={
            "loss": np.linspace(3, 1, generation),
            "pgpe/grad_norm": np.arange(generation, dtype=np.float32),
            "eval/cert acc%": np.array([0.5]),
        },
        noise_scheme="philox4x64-seedseq-v1",
        world_size=3,
        extra={"cert/eps": np.array([0.1, 0.3]), "cert/method": "deeppoly", "cert/n": 4},
    )


def assert_same(a: C.Checkpoint, b: C.Checkpoint) -> None:
    assert (a.generation, a.epoch, a.batch_in_epoch, a.noise_scheme, a.world_size) == (
        b.generation,
        b.epoch,
        b.batch_in_epoch,
        b.noise_scheme,
        b.world_size,
    )
    assert a.theta.dtype == b.theta.dtype == np.float32
    assert a.theta.tobytes() == b.theta.tobytes()
    assert (a.sigma is None and b.sigma is None) or a.sigma.tobytes() == b.sigma.tobytes()
    assert_same_state(a.opt_state, b.opt_state)
    assert a.config == b.config and a.arch == b.arch
    assert a.metrics.keys() == b.metrics.keys()
    for k in a.metrics:
        assert np.array_equal(a.metrics[k], b.metrics[k]) and a.metrics[k].dtype == b.metrics[k].dtype
    assert_same_state(a.extra, b.extra)


def assert_same_state(a: C.StateDict, b: C.StateDict) -> None:
    """Same keys, and per key the same type and value (arrays: dtype, shape and bits)."""
    assert a.keys() == b.keys()
    for k, v in a.items():
        w = b[k]
        if isinstance(v, np.ndarray):
            assert isinstance(w, np.ndarray) and v.dtype == w.dtype and v.shape == w.shape, k
            assert v.tobytes() == w.tobytes(), k
        else:
            assert type(v) is type(w) and v == w, k


# ----------------------------------------------------------------------------- round trip


def test_assert_same_compares_values_not_just_keys():
    c = make()
    for changed in (
        {"extra": {**c.extra, "cert/eps": np.array([0.1, 0.4])}},
        {"extra": {**c.extra, "cert/n": 5}},
        {"opt_state": {**c.opt_state, "lr": 0.25}},
    ):
        with pytest.raises(AssertionError):
            assert_same(c, dataclasses.replace(c, **changed))


def test_round_trip_bitwise(tmp_path):
    c = make()
    path = C.save(tmp_path, c)
    assert path == tmp_path / "ckpt_00000005.h5"
    for p in (path, tmp_path / C.LATEST):
        got = C.load(p)
        assert_same(c, got)
        assert got.host and got.created.endswith("+00:00")
    assert sorted(os.listdir(tmp_path)) == ["ckpt_00000005.h5", "latest.h5"]


def test_round_trip_without_sigma_and_empty_state(tmp_path):
    c = C.Checkpoint(0, 0, 0, np.zeros(0, np.float32), None, {}, {}, {}, {}, "n")
    assert_same(c, C.load(C.save(tmp_path, c)))
    assert C.summary(tmp_path / C.LATEST)["sigma"] is None


@settings(max_examples=10, deadline=None)
@given(d=st.integers(3, 50), seed=st.integers(0, 1000), gen=st.integers(1, 10**9))
def test_round_trip_property(tmp_path_factory, d, seed, gen):
    tmp = tmp_path_factory.mktemp("rt")
    c = make(generation=gen % 40 + 1, d=d, seed=seed)
    c.generation = gen
    assert_same(c, C.load(C.save(tmp, c)))


def test_torch_tensors_and_float64_theta_are_accepted(tmp_path):
    torch = pytest.importorskip("torch")
    c = make()
    c.theta = c.theta.astype(np.float64)
    c.opt_state = {"m": torch.arange(3.0)}
    got = C.load(C.save(tmp_path, c))
    assert got.theta.dtype == np.float32 and np.array_equal(got.opt_state["m"], np.arange(3.0, dtype=np.float32))


def test_save_rejects_bad_values(tmp_path):
    with pytest.raises(TypeError, match="opt_state\\['x'\\]"):
        C.save(tmp_path, make().__class__(**{**make().__dict__, "opt_state": {"x": object()}}))
    c = make()
    c.sigma = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="sigma"):
        C.save(tmp_path, c)
    with pytest.raises(ValueError, match="keep_last"):
        C.save(tmp_path, make(), keep_last=0)
    c = make()
    c.generation = -1
    with pytest.raises(ValueError, match="generation"):
        C.save(tmp_path, c)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- latest / pruning


def test_keep_last_prunes_and_latest_survives(tmp_path):
    for g in range(1, 7):
        C.save(tmp_path, make(generation=g, seed=g), keep_last=2)
    assert [g for g, _ in C.list_checkpoints(tmp_path)] == [5, 6]
    assert C.load(tmp_path / C.LATEST).generation == 6
    # latest.h5 is its own link: deleting ckpt files never breaks it
    for _, p in C.list_checkpoints(tmp_path):
        p.unlink()
    assert C.load(tmp_path / C.LATEST).generation == 6
    assert R.find_latest(tmp_path) == tmp_path / C.LATEST


def test_keep_all_and_resave_same_generation(tmp_path):
    for g in (1, 2, 2, 3):
        C.save(tmp_path, make(generation=g, seed=g), keep_last=None)
    assert [g for g, _ in C.list_checkpoints(tmp_path)] == [1, 2, 3]
    assert not any(p.startswith(C.TEMP_PREFIX) for p in os.listdir(tmp_path))


def test_latest_falls_back_to_copy_without_hardlinks(tmp_path, monkeypatch):
    def no_link(*a, **k):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    C.save(tmp_path, make(generation=1))
    C.save(tmp_path, make(generation=2, seed=2))
    assert C.load(tmp_path / C.LATEST).generation == 2
    assert not (tmp_path / C.LATEST).samefile(tmp_path / "ckpt_00000002.h5")


def test_find_latest_empty_and_missing(tmp_path):
    assert R.find_latest(tmp_path) is None
    assert R.find_latest(tmp_path / "nope") is None


def test_find_latest_prefers_newer_ckpt_after_crash_before_relink(tmp_path):
    C.save(tmp_path, make(generation=1))
    latest = (tmp_path / C.LATEST).read_bytes()
    C.save(tmp_path, make(generation=2, seed=2))
    (tmp_path / C.LATEST).write_bytes(latest)  # as if killed between rename and relink
    assert R.find_latest(tmp_path) == tmp_path / "ckpt_00000002.h5"


def test_find_latest_skips_corrupt_newest_with_warning(tmp_path):
    C.save(tmp_path, make(generation=1), keep_last=None)
    C.save(tmp_path, make(generation=2, seed=2), keep_last=None)
    for name in ("ckpt_00000002.h5", C.LATEST):  # newest and latest both damaged
        p = tmp_path / name
        p.unlink()
        p.write_bytes((tmp_path / "ckpt_00000001.h5").read_bytes()[:900])
    with pytest.warns(RuntimeWarning, match="skipping unreadable checkpoint"):
        assert R.find_latest(tmp_path) == tmp_path / "ckpt_00000001.h5"


def test_crash_mid_write_leaves_latest_readable_and_temp_is_cleaned(tmp_path, monkeypatch):
    C.save(tmp_path, make(generation=1))

    def crash(path, ckpt):
        Path(path).write_bytes(b"\x89HDF\r\n\x1a\n partial")
        raise KeyboardInterrupt  # stands in for a kill during the write

    monkeypatch.setattr(C, "_write_file", crash)
    with pytest.raises(KeyboardInterrupt):
        C.save(tmp_path, make(generation=2))
    monkeypatch.undo()
    # a real kill leaves the temp behind (the finally clause never runs): simulate it
    (tmp_path / ".tmp-ckpt_00000002-abc.h5").write_bytes(b"\x89HDF\r\n\x1a\n partial")
    assert C.load(R.find_latest(tmp_path)).generation == 1
    removed = R.clean_stale_temps(tmp_path)
    assert [p.name for p in removed] == [".tmp-ckpt_00000002-abc.h5"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt_00000001.h5", "latest.h5"]


_LOOP = """
import sys, numpy as np
from mpigls.run import checkpoint as C
d, g = sys.argv[1], 0
theta = np.random.default_rng(0).standard_normal(200_000).astype(np.float32)
while True:
    g += 1
    C.save(d, C.Checkpoint(g, 0, 0, theta + g, theta, {"m": theta}, {"g": g}, {"name": "x"},
                           {"loss": np.arange(g, dtype=np.float64)}, "n"), keep_last=2)
    print(g, flush=True)
"""


@pytest.mark.slow
def test_kill9_during_save_loop_never_breaks_latest(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rng = np.random.default_rng(0)
    for trial in range(4):
        d = tmp_path / f"t{trial}"
        proc = subprocess.Popen(
            [sys.executable, "-c", _LOOP, str(d)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout.readline().strip() == "1"  # at least one complete checkpoint
            time.sleep(float(rng.uniform(0.0, 0.4)))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
        latest = R.find_latest(d)
        assert latest is not None
        got = C.load(latest)
        assert got.theta.tobytes() == (C.load(latest).theta).tobytes()
        assert got.config == {"g": got.generation} and got.metrics["loss"].shape == (got.generation,)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # latest.h5 itself must be valid: no fallback needed
            assert C.load(d / C.LATEST).generation >= 1
        R.clean_stale_temps(d)
        assert not any(p.startswith(C.TEMP_PREFIX) for p in os.listdir(d))


# ----------------------------------------------------------------------------- clear errors


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        C.load(tmp_path / "none.h5")


def test_directory_given(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        C.load(tmp_path)


def test_not_hdf5(tmp_path):
    p = tmp_path / "x.h5"
    p.write_text("model: cnn3\n")
    with pytest.raises(C.CheckpointError, match="not an HDF5 file"):
        C.load(p)


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.9, 0.999])
def test_truncated(tmp_path, keep):
    src = C.save(tmp_path / "a", make(d=4000))
    data = src.read_bytes()
    p = tmp_path / "trunc.h5"
    p.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(C.CheckpointError, match="truncated|corrupt|damaged|not an HDF5") as info:
        C.load(p)
    assert "\n" not in str(info.value)


def test_hdf5_but_not_ours(tmp_path):
    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(C.CheckpointError, match="not an mpigls checkpoint"):
        C.load(p)


def _set_attr(path: Path, key: str, value) -> None:
    with h5py.File(path, "r+") as f:
        f.attrs[key] = value


def test_newer_format_version(tmp_path):
    p = C.save(tmp_path, make())
    _set_attr(p, "format_version", C.FORMAT_VERSION + 1)
    with pytest.raises(C.CheckpointError, match=f"version {C.FORMAT_VERSION + 1}.*upgrade"):
        C.load(p)


def test_older_format_version_without_and_with_migration(tmp_path, monkeypatch):
    p = C.save(tmp_path, make())
    monkeypatch.setattr(C, "FORMAT_VERSION", C.FORMAT_VERSION + 1)
    with pytest.raises(C.CheckpointError, match="no migration"):
        C.load(p)
    calls = []

    def migrate(raw):
        calls.append(raw["attrs"]["format_version"])
        raw["config"]["migrated"] = True
        return raw

    monkeypatch.setitem(C.MIGRATIONS, C.FORMAT_VERSION - 1, migrate)
    assert C.load(p).config["migrated"] is True and calls == [C.FORMAT_VERSION - 1]


@pytest.mark.parametrize("what", ["theta", "sigma", "opt"])
def test_checksum_tampered(tmp_path, what):
    c = make()
    p = C.save(tmp_path, c)
    with h5py.File(p, "r+") as f:
        ds = {"theta": f[C.DS_THETA], "sigma": f[C.DS_SIGMA], "opt": f[C.GRP_OPTIMIZER]["m"]}[what]
        a = ds[()]
        a[5] = np.nextafter(a[5], a.dtype.type(np.inf))  # a one-ulp change
        ds[...] = a
    with pytest.raises(C.CheckpointError, match="checksum"):
        C.load(p)
    assert C.load(p, verify=False).generation == c.generation
    # latest.h5 is a copy, not a second name of the damaged file: it still loads
    assert R.find_latest(tmp_path) == tmp_path / C.LATEST
    assert C.load(tmp_path / C.LATEST).generation == c.generation


def test_checksum_tampered_raw_bytes(tmp_path):
    c = make(d=64)
    p = C.save(tmp_path / "a", c)
    data = bytearray(p.read_bytes())
    at = bytes(data).find(c.theta[10:20].tobytes())
    assert at > 0
    data[at] ^= 0x01
    q = tmp_path / "flipped.h5"
    q.write_bytes(bytes(data))
    with pytest.raises(C.CheckpointError, match="checksum"):
        C.load(q)


def test_missing_dataset(tmp_path):
    p = C.save(tmp_path, make())
    with h5py.File(p, "r+") as f:
        del f[C.GRP_METRICS]
    with pytest.raises(C.CheckpointError, match="lacks a required dataset.*metrics"):
        C.load(p)


def test_missing_attribute(tmp_path):
    p = C.save(tmp_path, make())
    with h5py.File(p, "r+") as f:
        del f.attrs["generation"]
    with pytest.raises(C.CheckpointError, match="generation"):
        C.load(p)


def test_check_compatible():
    c = make()
    C.check_compatible(c, ARCH, num_params=c.theta.shape[0])
    C.check_compatible(c, {**ARCH, "in_shape": (1, 8, 8)})  # tuples compare like stored lists
    with pytest.raises(ValueError, match="name: checkpoint 'cnn3' vs now 'cnn5'"):
        C.check_compatible(c, {**ARCH, "name": "cnn5"})
    with pytest.raises(ValueError, match="num_params"):
        C.check_compatible(c, ARCH, num_params=5)


# ----------------------------------------------------------------------------- summary


def test_summary_is_json_and_hashes_theta(tmp_path):
    c = make()
    s = C.summary(C.save(tmp_path, c))
    json.dumps(s)
    assert s["generation"] == 5 and s["epoch"] == 2 and s["num_params"] == 37
    import hashlib

    assert s["theta_sha256"] == hashlib.sha256(c.theta.astype("<f4").tobytes()).hexdigest()
    assert s["theta_sha256"] == C.theta_sha256(c.theta.astype(np.float64).astype(np.float32))
    assert s["metrics"] == {"loss": 1.0, "pgpe/grad_norm": 4.0, "eval/cert acc%": 0.5}
    assert s["sigma"]["min"] == float(c.sigma.min())
    assert s["config"] == c.config and s["arch"] == c.arch


def test_copied_directory_still_loads(tmp_path):
    C.save(tmp_path / "a", make())
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert C.load(R.find_latest(tmp_path / "b")).generation == 5


def test_load_latest_and_permissions(tmp_path):
    assert R.load_latest(tmp_path) is None
    C.save(tmp_path, make(generation=1))
    C.save(tmp_path, make(generation=2, seed=2))
    assert R.load_latest(tmp_path).generation == 2
    mask = os.umask(0)
    os.umask(mask)
    for name in ("ckpt_00000002.h5", C.LATEST):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask
    (tmp_path / "ckpt_00000002.h5").unlink()
    (tmp_path / C.LATEST).unlink()
    (tmp_path / C.LATEST).write_bytes(b"garbage")
    assert R.load_latest(tmp_path).generation == 1  # unreadable latest.h5 ranks last
    assert C.summary(tmp_path / "ckpt_00000001.h5")["format_version"] == C.FORMAT_VERSION


def test_write_json_is_atomic_and_its_stale_temps_are_cleaned(tmp_path, monkeypatch):
    target = R.write_json(tmp_path / "eval.json", {"natural": 0.5, "generation": 3})
    assert json.loads(target.read_text()) == {"natural": 0.5, "generation": 3}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(C.os, "replace", boom)
    with pytest.raises(OSError):
        R.write_json(tmp_path / "eval.json", {"natural": 0.9})
    monkeypatch.undo()
    assert json.loads(target.read_text())["natural"] == 0.5  # the old result is intact
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(C.TEMP_PREFIX)]
    (tmp_path / f"{C.TEMP_PREFIX}eval-x.json").write_text("{")  # as a kill -9 would leave it
    assert [p.name for p in R.clean_stale_temps(tmp_path)] == [f"{C.TEMP_PREFIX}eval-x.json"]
