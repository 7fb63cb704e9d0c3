"""Format-1 checkpoints (θ, σ and the generation stored twice) written by the OLD code (commit
027d07e) still load, migrate, resume to the θ the old code reached,
and are read by inspect / certify / analysis.

What is compared bit for bit and what to a tolerance: the fixtures' bytes (θ as stored, the
checksum) are read back, so they are exact on every machine. The θ the old code reached after
resuming is a float trajectory computed on one machine: another CPU or another torch / MKL build
rounds mlp-tiny's matrix products differently (one float32 ulp in one member's loss is enough), so
it is compared to a tolerance far below the distance the two resumed generations move θ. On one
machine, resuming the format-1 file and the same state re-saved as format 2 must agree bitwise."""

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mpigls import analysis, cli, config
from mpigls.run import checkpoint, train

GOLDEN = Path(__file__).parent / "golden"
EXPECTED = json.loads((GOLDEN / "format1_expected.json").read_text())
OPTIMIZERS = sorted(EXPECTED["runs"])
# θ after the old code resumed each fixture to generation `resumed_to` (float32, one machine)
RESUMED = dict(np.load(GOLDEN / EXPECTED["resumed_theta"]))
# across machines: float rounding of another BLAS build moves θ by ~1e-5 in two generations;
# the two generations themselves move it by ~2e-2, and a mis-migrated state (Adam's m and v
# swapped, the step counter off by one) by far more than this
CROSS_MACHINE_ATOL = 1e-4


def _fixture(opt: str) -> Path:
    return GOLDEN / f"format1_{opt}.h5"


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_format1_file_loads_migrated(opt):
    with h5py.File(_fixture(opt), "r", locking=False) as f:  # it really is an old file: state stored twice
        assert f.attrs["format_version"] == 1 and "center" in f["optimizer"]
    ckpt = checkpoint.load(_fixture(opt))
    run = EXPECTED["runs"][opt]
    assert ckpt.format_version == 1 and ckpt.generation == EXPECTED["first_generations"]
    assert checkpoint.theta_sha256(ckpt.theta) == run["theta_sha256_at_first"]
    assert not {"center", "sigma", "generation"} & set(ckpt.opt_state)
    assert {"step/t", "step/m", "step/v", "step/velocity"} == set(ckpt.opt_state)
    assert (ckpt.sigma is not None) == (opt == "pgpe")
    # the stored config holds every optimizer's keys; read as a stored config it builds a Config
    assert "num_samples" in ckpt.config["optimizer"] and "popsize" in ckpt.config["optimizer"]
    cfg = config.from_dict(config.stored_config(ckpt.config))
    assert cfg.optimizer.name == opt
    with pytest.raises(config.ConfigError, match=f"for optimizer '{opt}'; its valid keys"):
        config.from_dict(ckpt.config)  # a user's YAML with foreign keys is refused, never trimmed


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_format1_resumes_to_the_old_codes_theta(tmp_path, opt):
    run = EXPECTED["runs"][opt]
    shutil.copyfile(_fixture(opt), tmp_path / checkpoint.LATEST)
    cfg = config.load_config(None, run["overrides"])
    logs = []
    res = train.train(cfg, tmp_path, max_generations=EXPECTED["resumed_to"], log=logs.append)
    assert res.generation == EXPECTED["resumed_to"]
    old = RESUMED[opt]
    np.testing.assert_allclose(res.theta.numpy(), old, rtol=0, atol=CROSS_MACHINE_ATOL)
    moved = np.abs(old - checkpoint.load(_fixture(opt)).theta).max()
    assert moved > 100 * CROSS_MACHINE_ATOL  # the tolerance cannot hide the resumed generations
    assert any("checkpoint format 1, migrated" in m for m in logs), logs
    assert not any("config differs" in m for m in logs), logs  # foreign keys are not "changes"
    new = checkpoint.load(tmp_path / checkpoint.LATEST)  # the next save is format 2, θ once
    assert new.format_version == checkpoint.FORMAT_VERSION == 2
    with h5py.File(tmp_path / checkpoint.LATEST, "r", locking=False) as f:
        assert "center" not in f["optimizer"] and f.attrs["format_version"] == 2
    assert np.array_equal(new.metrics["generation"], np.arange(1, EXPECTED["resumed_to"] + 1))


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_format1_resume_equals_the_format2_resume_bitwise(tmp_path, opt):
    """The migration is lossless: the same state re-saved as format 2 resumes to the same θ bits."""
    run = EXPECTED["runs"][opt]
    cfg = config.load_config(None, run["overrides"])
    (tmp_path / "old").mkdir()
    shutil.copyfile(_fixture(opt), tmp_path / "old" / checkpoint.LATEST)
    checkpoint.save(tmp_path / "new", checkpoint.load(_fixture(opt)), keep_last=1)
    with h5py.File(tmp_path / "new" / checkpoint.LATEST, "r", locking=False) as f:
        assert f.attrs["format_version"] == 2
    quiet = lambda msg: None
    a = train.train(cfg, tmp_path / "old", max_generations=EXPECTED["resumed_to"], log=quiet)
    b = train.train(cfg, tmp_path / "new", max_generations=EXPECTED["resumed_to"], log=quiet)
    assert a.generation == b.generation == EXPECTED["resumed_to"]
    assert torch.equal(a.theta, b.theta)


def test_inspect_certify_and_analysis_read_format1(tmp_path, capsys):
    path = tmp_path / "run" / checkpoint.LATEST
    path.parent.mkdir()
    shutil.copyfile(_fixture("pgpe"), path)
    summary = checkpoint.summary(path)
    assert summary["format_version"] == 1 and summary["migrated"] is True
    assert cli.main(["inspect", str(path)]) == 0
    assert "format_version" in capsys.readouterr().out
    assert (
        cli.main(
            ["certify", str(path), "--results", str(tmp_path / "cert.json"), "--methods", "ibp", "--num-test", "8"]
        )
        == 0
    )
    capsys.readouterr()
    assert json.loads((tmp_path / "cert.json").read_text())["generation"] == 3
    run = analysis.load_run(path.parent)
    assert run.config["optimizer"]["name"] == "pgpe" and list(run.generations) == [1, 2, 3]


def _rewrite(path: Path, edit) -> None:
    """Apply ``edit(h5 file)`` and re-seal the checksum, as a bug in an old writer would have."""
    with h5py.File(path, "r+", locking=False) as f:
        edit(f)
        f.attrs["state_sha256"] = checkpoint._raw_sha256(checkpoint._read_raw(f))


def test_format1_copies_that_disagree_are_refused(tmp_path):
    bad = tmp_path / "bad.h5"
    shutil.copyfile(_fixture("pgpe"), bad)

    def shift_theta(f):
        f["theta"][0] = f["theta"][0] + 1.0

    _rewrite(bad, shift_theta)
    with pytest.raises(checkpoint.CheckpointError, match="cannot migrate checkpoint format 1 to 2.*centre differs"):
        checkpoint.load(bad)
    shutil.copyfile(_fixture("rgs"), bad)
    _rewrite(bad, lambda f: f["optimizer"].attrs.__setitem__("generation", 7))
    with pytest.raises(checkpoint.CheckpointError, match="generation 7 differs"):
        checkpoint.load(bad)


def test_format1_clipup_velocity_moves_to_its_own_slot(tmp_path):
    """Format 1 kept ClipUp's velocity in ``step/m``; format 2 has ``step/velocity``."""
    path = tmp_path / "clipup.h5"
    shutil.copyfile(_fixture("grad"), path)
    velocity = np.linspace(-1, 1, checkpoint.load(path).theta.size, dtype=np.float32)

    def as_clipup(f):  # what the old code wrote for step_rule=clipup: m = velocity, v empty
        cfg = json.loads(f["config"][()])
        cfg["optimizer"]["step_rule"] = "clipup"
        del f["config"], f["optimizer/step%2Fm"], f["optimizer/step%2Fv"]
        f["config"] = json.dumps(cfg)
        f["optimizer"].create_dataset("step%2Fm", data=velocity).attrs["key"] = "step/m"
        f["optimizer"].create_dataset("step%2Fv", data=np.zeros(0, np.float32)).attrs["key"] = "step/v"

    _rewrite(path, as_clipup)
    state = checkpoint.load(path).opt_state
    assert np.array_equal(state["step/velocity"], velocity)
    assert state["step/m"].shape == (0,) and state["step/v"].shape == (0,)
    adam = checkpoint.load(_fixture("grad")).opt_state
    assert adam["step/velocity"].shape == (0,) and adam["step/m"].shape == adam["step/v"].shape == velocity.shape
