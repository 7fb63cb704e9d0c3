"""Format-1 checkpoints (θ, σ and the generation stored twice) written by the OLD code (commit
027d07e) still load, migrate, resume to the same θ bits the old code reached, and are read by
inspect / certify / analysis. The fixtures under tests/golden/ were written once by that commit:
per optimizer, 3 generations of digits / mlp-tiny with the overrides stored in
format1_expected.json (``latest.h5`` copied to format1_<opt>.h5), then resumed to generation 5 for
the expected θ sha256; a newer mpigls writes format 2, so they cannot be regenerated."""

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpigls import analysis, cli, config
from mpigls.run import checkpoint, train

GOLDEN = Path(__file__).parent / "golden"
EXPECTED = json.loads((GOLDEN / "format1_expected.json").read_text())
OPTIMIZERS = sorted(EXPECTED["runs"])


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
    assert checkpoint.theta_sha256(res.theta.numpy()) == run["theta_sha256_resumed"]
    assert any("checkpoint format 1, migrated" in m for m in logs), logs
    assert not any("config differs" in m for m in logs), logs  # foreign keys are not "changes"
    new = checkpoint.load(tmp_path / checkpoint.LATEST)  # the next save is format 2, θ once
    assert new.format_version == checkpoint.FORMAT_VERSION == 2
    with h5py.File(tmp_path / checkpoint.LATEST, "r", locking=False) as f:
        assert "center" not in f["optimizer"] and f.attrs["format_version"] == 2
    assert np.array_equal(new.metrics["generation"], np.arange(1, EXPECTED["resumed_to"] + 1))


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
