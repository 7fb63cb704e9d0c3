"""The GPU as a first-class device: sound bounds, GPU == CPU to float32 rounding,
bitwise-reproducible training run to run and across ranks sharing one GPU, certify on GPU ==
certify on CPU, device binding with several ranks per GPU.

Marked ``gpu`` and skipped without CUDA. Run them with ``bash tools/test.sh --gpu`` (which also
works on an offline GPU node, see tools/test_gpu.sh).

``MPIGLS_GPU_TEST_DEVICE=cpu`` runs the same tests with the CPU standing in for the GPU (the device
paths: ``train.device``/``--set train.device=cpu``, ``bind_device``, models and data moved to the
device, the precision switches around every certifying call): it checks the tests' logic and the
device-generic code, not a GPU (CPU vs CPU equality is trivially bitwise). The CUDA-only checks
(TF32 really changes GPU results, CUDA device indices, the several-ranks-per-GPU warning) skip
with a reason. ``bash tools/test.sh`` runs this CPU lane; ``bash tools/test.sh --gpu`` the real one.

Every test starts from TF32 *enabled* (torch's cuDNN default, and matmul too), as a user's process
would be: the certifying paths must switch it off themselves. Shapes: B batch, K classes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from mpigls import bounds, cli, config, data, parallel
from mpigls.evaluation import certify, landscape
from mpigls.nn import models
from mpigls.nn.attacks import margins, pgd
from mpigls.numerics import noise, philox, precision
from mpigls.optim import pgpe, unit
from mpigls.run import checkpoint, train

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from conftest import tiny_overrides  # noqa: E402

_STANDIN = os.environ.get("MPIGLS_GPU_TEST_DEVICE") == "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() or _STANDIN), reason="needs a CUDA GPU"),
]
GPU = torch.device("cpu") if _STANDIN else torch.device("cuda", 0)
CPU = torch.device("cpu")
DEVICE_NAME = "cpu" if _STANDIN else "cuda"
CUDA_ONLY = pytest.mark.skipif(_STANDIN, reason="CUDA only: checks what the CPU stand-in has not (TF32, CUDA devices)")

SOUND = ["ibp", "hbox", "crown-ibp", "deeppoly", "alpha-crown"]
NETS = [("cnn3", (1, 28, 28)), ("cnn5", (3, 32, 32))]

# GPU vs CPU bounds, both in true fp32, differed by <= 3e-7 at magnitudes 0.2-0.5 (H100);
# TF32 moved them by 1.2e-4 .. 4.7e-3. The tolerance sits ~13x above the first, 30x below the second.
REL_TOL = 4e-6


@pytest.fixture(autouse=True)
def tf32_enabled(tf32_on):
    """Every GPU test starts from TF32 allowed (tests/conftest.py tf32_on): what mpigls must undo."""
    yield


def _net(name, shape, seed=0, k=10, batch=6):
    torch.manual_seed(seed)
    model = models.build(name, shape, k, mean=[0.4] * shape[0], std=[0.3] * shape[0])
    g = torch.Generator().manual_seed(seed)
    return model, torch.rand(batch, *shape, generator=g), torch.randint(0, k, (batch,), generator=g)


def _strict(settings: dict) -> bool:
    return not (
        settings["cudnn_allow_tf32"]
        or settings["matmul_allow_tf32"]
        or settings["float32_matmul_precision"] != "highest"
    )


def _certifying_bounds(model, x, y, eps, method, device, **opts):
    """Margin lower bounds as ``certify.evaluate`` computes them (captured from the real call), which
    must run them in true fp32 and restore the caller's TF32 afterwards. SABR certifies nothing (a
    training loss): its bounds are computed directly, in true fp32 too."""
    model = model.to(device)
    before = precision.current_settings()
    if method not in bounds.SOUND_METHODS:
        with precision.strict_fp32():
            return bounds.margin_lower_bounds(model, x.to(device), y.to(device), eps, method, **opts).detach().to(CPU)
    seen = []
    real = bounds.margin_lower_bounds

    def spy(*args, **kwargs):
        assert _strict(precision.current_settings()), "a certifying bound ran with TF32 allowed"
        out = real(*args, **{**kwargs, **opts})
        seen.append(out.detach().to(CPU))
        return out

    bounds.margin_lower_bounds = spy
    try:
        certify.evaluate(model, models.flat_params(model), x, y, eps, [method], batch_size=len(y), pgd_steps=0)
    finally:
        bounds.margin_lower_bounds = real
    assert precision.current_settings() == before and not _strict(before)  # TF32 allowed again (the fixture)
    (lb,) = seen
    return lb


def _worst_margin(model, x, y, eps, num=64, seed=0):
    """Smallest margin over uniform samples (drawn on the CPU) and a PGD attack, on the model's device."""
    dev = next(model.parameters()).device
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    u = torch.rand(num, *x.shape, generator=torch.Generator().manual_seed(seed))
    pts = (lo + (hi - lo) * u).to(dev)
    with torch.no_grad():
        worst = margins(model(pts.flatten(0, 1)).view(num, x.shape[0], -1), y.to(dev)).min(0).values
    adv = pgd(
        model,
        x.to(dev),
        y.to(dev),
        eps,
        20,
        2.5 * eps / 20,
        loss="margin",
        generator=noise.torch_generator(seed, noise.STREAM_ATTACK, 0),
    )
    with torch.no_grad():
        return torch.minimum(worst, margins(model(adv), y.to(dev))).to(CPU)


# ----------------------------------------------------------------------------- bounds


@pytest.mark.parametrize("name,shape", NETS)
@pytest.mark.parametrize("method", SOUND)
def test_gpu_bounds_are_sound(method, name, shape):
    model, x, y = _net(name, shape)
    for eps in (1 / 255, 4 / 255):
        lb = _certifying_bounds(model, x, y, eps, method, GPU)
        worst = _worst_margin(model.to(GPU), x, y, eps)
        assert (lb <= worst + 1e-5).all(), (method, eps, float((lb - worst).max()))


@pytest.mark.parametrize("name,shape", NETS)
@pytest.mark.parametrize("method", [*SOUND, "sabr"])
def test_gpu_bounds_equal_cpu_bounds_to_float32_rounding(method, name, shape):
    """Fails with TF32 on (the old code): the certifying path must run in true fp32 on the GPU."""
    model, x, y = _net(name, shape, seed=1)
    opts = {"pgd_steps": 0, "generator": noise.torch_generator(0, noise.STREAM_ATTACK, 0)} if method == "sabr" else {}
    for eps in (0.0, 2 / 255):
        if method == "sabr":  # the same CPU generator state for both devices: the random start must agree
            opts["generator"] = noise.torch_generator(0, noise.STREAM_ATTACK, 0)
        cpu = _certifying_bounds(model, x, y, eps, method, CPU, **opts)
        if method == "sabr":
            opts["generator"] = noise.torch_generator(0, noise.STREAM_ATTACK, 0)
        gpu = _certifying_bounds(model, x, y, eps, method, GPU, **opts)
        scale = max(1.0, float(cpu.abs().max()))
        # alpha-crown optimises its slopes by gradient steps, which may amplify rounding differences
        tol = REL_TOL * scale * (25 if method == "alpha-crown" else 1)
        gap = float((gpu - cpu).abs().max())
        assert gap <= tol, f"{method} {name} eps={eps}: max |GPU - CPU| = {gap:.3g} > {tol:.3g}"


@CUDA_ONLY
@pytest.mark.skipif(
    not _STANDIN and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8,
    reason="TF32 exists from compute capability 8.0 (Ampere)",
)
def test_tf32_would_break_the_equality_test():
    """The equality test above is sensitive enough to catch TF32 (what the old code computed)."""
    model, x, y = _net("cnn5", (3, 32, 32), seed=1)
    cpu = _certifying_bounds(model, x, y, 2 / 255, "deeppoly", CPU)
    with precision.training(tf32=True, deterministic=True):  # TF32 on, as torch's cuDNN default
        gpu = bounds.margin_lower_bounds(model.to(GPU), x.to(GPU), y.to(GPU), 2 / 255, "deeppoly").to(CPU)
    assert float((gpu - cpu).abs().max()) > REL_TOL * max(1.0, float(cpu.abs().max()))


# ----------------------------------------------------------------------------- certify


def _small_digits_model():
    ds = data.load("digits", None, num_train=64, num_test=200)
    torch.manual_seed(0)
    model = models.build("cnn3", ds.in_shape, ds.num_classes, ds.mean, ds.std)
    return ds, model


def test_certify_on_gpu_equals_certify_on_cpu():
    ds, model = _small_digits_model()
    theta = models.flat_params(model)
    methods = ["ibp", "hbox", "crown-ibp", "deeppoly"]
    for eps in (0.0, 0.002, 0.01):
        cpu, gpu = (
            certify.evaluate(model.to(dev), theta, ds.test_x, ds.test_y, eps, methods, batch_size=50, pgd_steps=5)
            for dev in (CPU, GPU)
        )
        assert cpu["natural"] > 0 and cpu["certified/ibp"] > 0 or eps > 0, cpu  # not a vacuous comparison
        for key in ("natural", *(f"certified/{m}" for m in methods)):
            assert gpu[key] == cpu[key], (eps, key, cpu, gpu)
        # PGD steps by the sign of a gradient; an entry that is exactly 0 in one arithmetic can flip
        assert abs(gpu["pgd"] - cpu["pgd"]) <= 2 / len(ds.test_y), (cpu, gpu)


def test_certify_cli_on_gpu_equals_cpu(tmp_path, capsys):
    assert (
        cli.main(
            [
                "train",
                "--out",
                str(tmp_path),
                "--max-generations",
                "2",
                "--no-eval",
                *[a for o in tiny_overrides(**{"train.device": "cpu"}) for a in ("--set", o)],
            ]
        )
        == 0
    )
    capsys.readouterr()
    out = {}
    for dev in ("cpu", DEVICE_NAME):
        assert (
            cli.main(
                [
                    "certify",
                    str(tmp_path / "latest.h5"),
                    "--json",
                    "--eps",
                    "0.01",
                    "--methods",
                    "ibp,crown-ibp,deeppoly",
                    "--set",
                    f"train.device={dev}",
                ]
            )
            == 0
        )
        out[dev] = json.loads(capsys.readouterr().out)
    a, b = out["cpu"], out[DEVICE_NAME]
    assert {k: v for k, v in a.items() if k != "pgd"} == {k: v for k, v in b.items() if k != "pgd"}


# ----------------------------------------------------------------------------- training


def _train_cfg(optimizer, **extra):
    opts = {
        "pgpe": {"optimizer.popsize": 16, "optimizer.block_size": 2},
        # optimizer.noise: device: noise generated on the GPU, state and update there too
        "pgpe-device-noise": {"optimizer.popsize": 16, "optimizer.block_size": 2, "optimizer.noise": "device"},
        "rgs": {"optimizer.num_samples": 6, "optimizer.block_size": 2},
        "grad": {"optimizer.block_size": 16},
    }[optimizer]
    return config.load_config(
        None,
        tiny_overrides(
            **{
                "optimizer.name": optimizer.split("-")[0],
                "bound.method": "crown-ibp",
                "data.num_train": 512,
                "train.batch_size": 64,
                "train.device": DEVICE_NAME,
                "train.epochs": 0.75,
                **opts,
                **extra,
            }
        ),
    )


def _sha(theta: torch.Tensor) -> str:
    return hashlib.sha256(theta.numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("optimizer", ["pgpe", "pgpe-device-noise", "rgs", "grad"])
def test_gpu_training_is_bitwise_reproducible_run_to_run(tmp_path, optimizer):
    cfg = _train_cfg(optimizer)
    before = precision.current_settings()
    runs = [train.train(cfg, tmp_path / str(i), log=lambda m: None) for i in range(2)]
    assert precision.current_settings() == before  # training's numeric settings are undone on return
    assert runs[0].device.type == GPU.type and runs[0].generation == 6
    assert _sha(runs[0].theta) == _sha(runs[1].theta)
    assert not torch.equal(runs[0].theta, models.flat_params(train.build_problem(cfg)[1]))  # it trained


@pytest.mark.parametrize("optimizer", ["pgpe", "pgpe-device-noise", "rgs", "grad"])
def test_gpu_training_same_bits_for_1_2_3_ranks_sharing_one_gpu(tmp_path, monkeypatch, optimizer):
    """Ranks as threads of one process (ThreadComm), all bound to the same GPU."""
    monkeypatch.setattr(parallel.StopSignal, "install", lambda self: self)  # signal handlers: main thread only
    # build_problem seeds torch's global (process-wide) RNG for the initial weights: threads must take turns
    lock, build = threading.Lock(), train.build_problem

    def build_in_turn(cfg):
        with lock:
            return build(cfg)

    monkeypatch.setattr(train, "build_problem", build_in_turn)
    cfg = _train_cfg(optimizer)
    shas = {}
    for world in (1, 2, 3):
        out = tmp_path / f"w{world}"
        results = parallel.run_threaded(lambda comm, out=out: train.train(cfg, out, comm, log=lambda m: None), world)
        assert len({_sha(r.theta) for r in results}) == 1  # every rank holds the same state
        assert all(r.device.type == GPU.type for r in results)
        shas[world] = _sha(results[0].theta)
    assert len(set(shas.values())) == 1, shas


def test_device_noise_same_bits_on_gpu_and_cpu():
    """optimizer.noise: device (mpigls.numerics.philox): integer Philox and IEEE-exact float64 steps, so the
    GPU's numbers are the CPU's bit for bit (the GPU also takes other chunk sizes)."""
    for seed, stream, gen, members, dim in [
        (0, 0, 0, [0], 9),
        (7, 0, 3, range(8), 165_850),
        (2**40, 1, 99, [5, 1], 70_001),
    ]:
        cpu = philox.gaussian(seed, stream, gen, members, dim, CPU)
        assert torch.equal(philox.gaussian(seed, stream, gen, members, dim, GPU).cpu(), cpu)


def test_pgpe_update_with_device_noise_same_bits_on_gpu_and_cpu():
    """Given the same losses, the whole PGPE update (noise, fixed-point sums, Adam, the sigma step)
    runs on the GPU and gives the CPU's bits."""
    params = pgpe.PGPEParams(popsize=24, lr=0.05, sigma_init=0.02, fixed_sigma=False, sigma_lr=0.2, noise="device")
    state = pgpe.init(params, torch.linspace(-1.0, 1.0, 5000))
    losses = torch.linspace(0.0, 1.0, 24, dtype=torch.float64).flip(0).sin()
    on_cpu, on_gpu = state, unit.to_device(state, GPU)
    for generation in range(3):
        on_cpu, _ = pgpe.tell(on_cpu, params, 11, losses.roll(generation))
        on_gpu, _ = pgpe.tell(on_gpu, params, 11, losses.roll(generation))
        assert on_gpu.center.device.type == GPU.type
        for a, b in [(on_cpu.center, on_gpu.center), (on_cpu.sigma, on_gpu.sigma)]:
            assert torch.equal(a, b.cpu())
        assert torch.equal(on_cpu.step_state.m, on_gpu.step_state.m.cpu())
        assert torch.equal(on_cpu.step_state.v, on_gpu.step_state.v.cpu())


MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")


def _mpi_ready() -> bool:
    return MPIEXEC is not None and importlib.util.find_spec("mpi4py") is not None


@pytest.mark.skipif(not _mpi_ready(), reason="mpiexec / mpi4py not available")
def test_gpu_training_same_bits_for_1_and_2_mpi_processes_sharing_one_gpu(tmp_path):
    sets = [
        a
        for o in tiny_overrides(
            **{
                "optimizer.name": "grad",
                "optimizer.block_size": 16,
                "bound.method": "crown-ibp",
                "data.num_train": 512,
                "train.batch_size": 64,
                "train.epochs": 0.75,
                "train.device": DEVICE_NAME,
            }
        )
        for a in ("--set", o)
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    shas = []
    for ranks in (1, 2):
        out = tmp_path / f"n{ranks}"
        cmd = [sys.executable, "-m", "mpigls", "train", "--out", str(out), "--no-eval", *sets]
        if ranks > 1:
            cmd = [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpi4py", *cmd[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        shas.append(checkpoint.theta_sha256(checkpoint.load(out / "latest.h5").theta))
    assert shas[0] == shas[1]


# ----------------------------------------------------------------------------- landscape


def test_landscape_on_gpu_equals_cpu():
    """The landscape's bounds (certified losses, paper Fig. 6) on the device: true fp32, = CPU to rounding."""
    model, x, y = _net("cnn3", (1, 28, 28), seed=2, batch=4)
    direction = torch.randn(models.flat_params(model).numel(), generator=torch.Generator().manual_seed(3))
    direction /= direction.norm()
    out = {}
    for key, dev in (("cpu", CPU), ("device", GPU)):
        model = model.to(dev)
        out[key] = landscape.landscape(
            model,
            x.to(dev),
            y.to(dev),
            2 / 255,
            direction.to(dev),
            alphas=[-0.5, 0.0, 0.5],
            sigmas=[0.05],
            methods=("ibp", "deeppoly"),
            num_samples=4,
            chunk_size=8,
        )
    a, b = out["cpu"], out["device"]
    for key in ("original", "smoothed_mean"):
        assert a[key].shape == b[key].shape and (a[key] > 0).all(), key
        tol = REL_TOL * max(1.0, float(abs(a[key]).max()))
        assert float(abs(a[key] - b[key]).max()) <= tol, (key, a[key], b[key])


# ----------------------------------------------------------------------------- binding


def _bind_rows(world: int, fake_nodes: int) -> list:
    """(local_rank, device, current CUDA device or None, threads) of every ThreadComm rank."""

    def bind(comm):
        dev = parallel.bind_device(comm, device=DEVICE_NAME, threads=1)
        current = torch.cuda.current_device() if dev.type == "cuda" else None
        return comm.local_rank, dev, current, torch.get_num_threads()

    before = torch.get_num_threads()
    try:
        return parallel.run_threaded(bind, world, fake_nodes=fake_nodes)
    finally:
        torch.set_num_threads(before)


def test_device_binding_with_several_ranks_per_device():
    count = 1 if _STANDIN else torch.cuda.device_count()
    rows = _bind_rows(2 * count + 1, fake_nodes=1)  # more ranks than GPUs on one node
    assert [r[0] for r in rows] == list(range(2 * count + 1))
    for local_rank, dev, current, threads in rows:
        assert threads == 1
        assert dev == (CPU if _STANDIN else torch.device("cuda", local_rank % count)), (local_rank, dev)
        assert current == (None if _STANDIN else dev.index)
    rows = _bind_rows(4, fake_nodes=2)  # 2 simulated nodes of 2 ranks: local ranks 0, 1
    assert [r[0] for r in rows] == [0, 1, 0, 1]
    assert [r[1] for r in rows] == (
        [CPU] * 4 if _STANDIN else [torch.device("cuda", lr % count) for lr in (0, 1, 0, 1)]
    )


@CUDA_ONLY
def test_several_ranks_per_gpu_warn_about_contention(caplog):
    with caplog.at_level("WARNING", logger="mpigls.parallel"):
        _bind_rows(2 * torch.cuda.device_count() + 1, fake_nodes=1)
    assert "share" in caplog.text
