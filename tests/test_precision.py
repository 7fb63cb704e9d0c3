"""Numeric settings on every device, checked through the CPU build (the flags exist there):
certifying code runs with TF32 off and restores the caller's flags, training applies
train.deterministic / train.tf32, the certification margin rule, and one process never imports
mpi4py. The same code paths on a real GPU: tests/gpu/."""

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from mpigls import bounds, config, parallel
from mpigls.evaluation import certify
from mpigls.nn import models
from mpigls.numerics import precision
from mpigls.objectives import losses
from mpigls.run import train

from conftest import REPO, tiny_overrides

TF32_KEYS = ("cudnn_allow_tf32", "matmul_allow_tf32")


# tf32_on: the fixture in tests/conftest.py (shared with tests/gpu)


def _tf32(settings=None):
    s = settings or precision.current_settings()
    return {k: s[k] for k in TF32_KEYS} | {"float32_matmul_precision": s["float32_matmul_precision"]}


ON = {"cudnn_allow_tf32": True, "matmul_allow_tf32": True, "float32_matmul_precision": "high"}
OFF = {"cudnn_allow_tf32": False, "matmul_allow_tf32": False, "float32_matmul_precision": "highest"}


# ----------------------------------------------------------------------------- strict_fp32


def test_strict_fp32_switches_tf32_off_and_restores(tf32_on):
    assert _tf32() == ON
    with precision.strict_fp32():
        assert _tf32() == OFF
        with precision.strict_fp32():  # nested
            assert _tf32() == OFF
        assert _tf32() == OFF
    assert _tf32() == ON


def test_strict_fp32_restores_after_an_exception_and_as_decorator(tf32_on):
    with pytest.raises(KeyError), precision.strict_fp32():
        raise KeyError("boom")
    assert _tf32() == ON

    @precision.strict_fp32()
    def inner(depth):
        assert _tf32() == OFF
        return inner(depth - 1) if depth else _tf32()

    assert inner(3) == OFF  # recursion re-enters the same decorator
    assert _tf32() == ON
    assert precision._ACTIVE == [] and precision._SAVED == {}


def test_strict_fp32_wins_over_a_tf32_training_context_in_any_order(tf32_on):
    torch.backends.cudnn.allow_tf32 = False  # the caller's own value must come back exactly
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    with precision.training(tf32=True, deterministic=False):
        assert _tf32() == ON
        cm = precision.strict_fp32()
        cm.__enter__()
        assert _tf32() == OFF
    # the training context exited first; the certificate's context is still active
    assert _tf32() == OFF
    cm.__exit__(None, None, None)
    assert _tf32() == OFF and not precision.current_settings()["deterministic_algorithms"]
    assert precision._ACTIVE == []


def test_overlapping_threads_never_see_tf32_inside_strict_fp32(tf32_on):
    """Ranks as threads (parallel.run_threaded) enter and leave at different times."""
    seen, barrier = [], threading.Barrier(2)

    def rank(r):
        if r == 0:
            with precision.strict_fp32():
                barrier.wait()  # rank 1 enters and leaves while rank 0 is inside
                barrier.wait()
                seen.append(_tf32())
        else:
            barrier.wait()
            with precision.strict_fp32():
                pass
            barrier.wait()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [OFF]
    assert _tf32() == ON


# ----------------------------------------------------------------------------- training settings


def test_training_context_sets_determinism_and_tf32_then_restores(tf32_on):
    before = precision.current_settings()
    with precision.training(tf32=False, deterministic=True):
        s = precision.current_settings()
        assert s["deterministic_algorithms"] and not s["deterministic_warn_only"]
        assert s["cudnn_deterministic"] and not s["cudnn_benchmark"]
        assert _tf32(s) == OFF
    assert precision.current_settings() == before
    with precision.training(tf32=True, deterministic=False):
        s = precision.current_settings()
        assert _tf32(s) == ON and not s["deterministic_algorithms"]
    assert precision.current_settings() == before
    with pytest.raises(TypeError, match="booleans"), precision.training(tf32="yes"):
        pass


def test_cublas_workspace_is_set_on_import_and_checked(monkeypatch):
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    with pytest.raises(ValueError, match="CUBLAS_WORKSPACE_CONFIG"), precision.training(deterministic=True):
        pass
    with precision.training(deterministic=False):  # allowed: the user gave up bitwise reproducibility
        pass
    with precision.training(deterministic=True, device="cpu"):  # cuBLAS plays no part on a CPU
        pass
    with (
        pytest.raises(ValueError, match="CUBLAS_WORKSPACE_CONFIG"),
        precision.training(deterministic=True, device="cuda"),
    ):
        pass


@pytest.mark.parametrize("det,tf32", [(True, False), (False, True)])
def test_train_runs_under_the_configured_settings_and_restores_them(tmp_path, monkeypatch, tf32_on, det, tf32):
    seen = []
    real = train.bound_options  # called once per generation, inside the training loop

    def spy(*args, **kwargs):
        seen.append(precision.current_settings())
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "bound_options", spy)
    before = precision.current_settings()
    cfg = config.load_config(
        None, tiny_overrides(**{"train.deterministic": str(det).lower(), "train.tf32": str(tf32).lower()})
    )
    train.train(cfg, tmp_path, max_generations=2, log=lambda m: None)
    assert seen
    for s in seen:
        assert s["deterministic_algorithms"] is det and s["cudnn_deterministic"] is det
        assert _tf32(s) == (ON if tf32 else OFF)
    assert precision.current_settings() == before


def test_deterministic_training_gives_the_same_bits_as_before_on_cpu(tmp_path):
    """On CPU the deterministic switch changes no kernel used here: same theta either way."""
    res = [
        train.train(
            config.load_config(None, tiny_overrides(**{"train.deterministic": d})),
            tmp_path / d,
            max_generations=3,
            log=lambda m: None,
        ).theta
        for d in ("true", "false")
    ]
    assert torch.equal(res[0], res[1])


# ----------------------------------------------------------------------------- certification rule


def test_certified_needs_every_margin_above_the_safety_margin():
    m = precision.CERTIFY_MARGIN
    lb = torch.tensor([[2 * m, 1.0], [m, 1.0], [0.5 * m, 1.0], [float("nan"), 1.0], [-1.0, 1.0], [1e-3, 5e-3]])
    assert precision.certified(lb).tolist() == [True, False, False, False, False, True]
    assert precision.certified(lb, margin=0.0).tolist() == [True, True, True, False, False, True]
    assert precision.certified(lb[None]).shape == (1, 6)  # (P, B, K-1) -> (P, B)
    with pytest.raises(ValueError, match="margin"):
        precision.certified(lb, margin=-1.0)


def _tiny_model(k=4):
    torch.manual_seed(0)
    model = models.build("mlp-tiny", (1, 3, 3), k, mean=[0.5], std=[0.25])
    x = torch.rand(6, 1, 3, 3)
    return model, models.flat_params(model), x, torch.arange(6) % k


def test_certify_evaluate_uses_strict_fp32_and_the_margin_rule(monkeypatch, tf32_on):
    model, theta, x, y = _tiny_model()
    seen, fake = [], {}

    def fake_bounds(model, xb, yb, eps, method, **opts):
        seen.append(_tf32())
        return torch.full((xb.shape[0], 3), fake["value"])

    monkeypatch.setattr(bounds, "margin_lower_bounds", fake_bounds)
    m = precision.CERTIFY_MARGIN
    for value, expected in ((0.5 * m, 0.0), (m, 0.0), (2 * m, 1.0)):
        fake["value"] = value
        res = certify.evaluate(model, theta, x, y, 0.01, ["ibp"], batch_size=4, pgd_steps=0)
        assert res["certified/ibp"] == expected, value
    assert seen and all(s == OFF for s in seen)
    assert _tf32() == ON


def test_certify_evaluate_counts_match_a_direct_computation(tf32_on):
    """The real bounds: certified counts equal the rule applied to margin_lower_bounds directly."""
    model, theta, x, y = _tiny_model()
    for eps in (0.0, 0.02, 0.3):
        res = certify.evaluate(model, theta, x, y, eps, ["ibp", "deeppoly"], batch_size=4, pgd_steps=0)
        for method in ("ibp", "deeppoly"):
            with precision.strict_fp32():
                lb = bounds.margin_lower_bounds(model, x, y, eps, method)
            assert res[f"certified/{method}"] == float(precision.certified(lb).sum()) / len(y)


def test_landscape_runs_in_strict_fp32(monkeypatch, tf32_on):
    from mpigls.evaluation import landscape

    model, _, x, y = _tiny_model()
    seen = []
    real = losses.certified_loss

    def spy(*args, **kwargs):
        seen.append(_tf32())
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, "certified_loss", spy)
    d = landscape.deeppoly_gradient_direction(model, x, y, 0.05)
    landscape.landscape(model, x, y, 0.05, d, [0.0, 0.1], [1e-2], ["ibp"], num_samples=2)
    assert seen and all(s == OFF for s in seen)
    assert _tf32() == ON


# ----------------------------------------------------------------------------- no MPI for one process

_NO_MPI_SCRIPT = """
import json, sys
from mpigls import cli
out = sys.argv[1]
codes = [cli.main(["train", "--out", out, *sys.argv[2:]]), cli.main(["certify", out + "/latest.h5", "--json"])]
print("RESULT " + json.dumps({"codes": codes, "mpi4py": sorted(m for m in sys.modules if m.startswith("mpi4py"))}))
"""

_LAUNCHER_VARS = (
    *parallel.LAUNCHER_SIZE_VARS,
    *parallel.LAUNCHER_RANK_VARS,
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS",
)


def _clean_env(**extra):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCHER_VARS and not k.startswith(("PMI_", "PMIX_", "OMPI_", "HYDRA_"))
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    return env


@pytest.mark.slow
def test_one_process_train_and_certify_never_import_mpi4py(tmp_path):
    sets = [a for o in tiny_overrides(**{"train.epochs": 0.25}) for a in ("--set", o)]
    proc = subprocess.run(
        [sys.executable, "-c", _NO_MPI_SCRIPT, str(tmp_path), *sets],
        capture_output=True,
        text=True,
        timeout=300,
        env=_clean_env(),
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result == {"codes": [0, 0], "mpi4py": []}
    assert (tmp_path / "eval.json").exists()  # the final evaluation ran too


def test_launcher_detection_from_the_environment(monkeypatch):
    for var in _LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # `import mpi4py` fails, as if not installed
    assert not parallel.launched_by_mpi()
    assert isinstance(parallel.init_comm(), parallel.SerialComm)
    monkeypatch.setenv("PMI_SIZE", "1")  # mpiexec -n 1 without mpi4py: one process is fine
    assert parallel.launched_by_mpi() and isinstance(parallel.init_comm(), parallel.SerialComm)
    monkeypatch.delenv("PMI_SIZE")
    for var, value in (("PMIX_RANK", "0"), ("MPI_LOCALNRANKS", "2"), ("OMPI_COMM_WORLD_SIZE", "3")):
        monkeypatch.setenv(var, value)
        assert parallel.launched_by_mpi()
        with pytest.raises(RuntimeError, match=r"mpigls\[mpi\]"):
            parallel.init_comm()
        monkeypatch.delenv(var)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not parallel.launched_by_mpi()  # one SLURM task, e.g. a single-GPU job
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert parallel.launched_by_mpi()


def test_init_comm_without_a_launcher_does_not_import_mpi4py():
    code = (
        "import sys; from mpigls import cli, parallel; c = parallel.init_comm(); "
        "print(type(c).__name__, 'mpi4py' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_clean_env(), cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "SerialComm False"
