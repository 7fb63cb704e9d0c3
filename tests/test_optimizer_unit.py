"""Adding an optimizer touches its own module and ONE registry line: a toy random-direction
finite-difference optimizer, defined here, trains through mpigls.run.train.train (config section,
checkpoint, resume, 1 and 2 ranks with the same θ bits) without any other change."""

from __future__ import annotations

import dataclasses
import math
import threading

import numpy as np
import pytest
import torch

from mpigls import config, parallel
from mpigls.nn import models
from mpigls.numerics import noise
from mpigls.optim import registry, unit
from mpigls.run import checkpoint, train

from conftest import tiny_overrides

# ----------------------------------------------------------------------------- the toy optimizer's module


@dataclasses.dataclass(frozen=True, kw_only=True)
class FDParams:
    """Central finite differences along random directions z_k: g = 1/n sum_k (L(θ+h z_k) - L(θ-h z_k)) / 2h z_k."""

    lr: float = unit.param(0.05, "step size")
    h: float = unit.param(0.01, "finite-difference step along each direction")
    directions: int = unit.param(6, "random directions per generation")

    def __post_init__(self):
        if not (self.h > 0 and math.isfinite(self.h)):
            raise ValueError(f"optimizer.h must be > 0, got {self.h}")
        if self.directions < 1:
            raise ValueError(f"optimizer.directions must be >= 1, got {self.directions}")


@dataclasses.dataclass(frozen=True)
class FDState:
    center: torch.Tensor
    generation: int


def _directions(seed, generation, items, num_params):
    return noise.noise_block(seed, generation, list(items), num_params, noise.STREAM_RGS)


def _evaluate(work, state, params, blocks):
    out = []
    for block in blocks:
        items = unit.block_items(block, work.block_size, params.directions)
        z = _directions(work.seed, state.generation, items, state.center.numel())
        points = torch.stack([state.center + params.h * z, state.center - params.h * z], 1).reshape(-1, z.shape[1])
        with torch.no_grad():
            out.append(work.loss(points.to(work.device)).to("cpu", torch.float64))
    return out


def _exchange(comm, work, state, params, local, control):
    losses, agreed, _ = unit.gather_losses(comm, local, control)  # all 2n losses in global order
    return losses, None, agreed


def _tell(work, state, params, all_losses, _reduced, lr):
    z = _directions(work.seed, state.generation, range(params.directions), state.center.numel()).double()
    diff = (all_losses[0::2] - all_losses[1::2]) / (2 * params.h)
    grad = (diff[:, None] * z).sum(0) / params.directions
    center = (state.center.double() - lr * grad).float()
    return FDState(center, state.generation + 1), {"fd/grad_norm": float(grad.norm())}


TOY = unit.Optimizer(
    name="fd",
    Params=FDParams,
    init=lambda params, theta0: FDState(theta0.detach().float().clone(), 0),
    num_items=lambda params, batch_size: params.directions,
    evaluate=_evaluate,
    exchange=_exchange,
    tell=_tell,
    state_to_dict=lambda s: {"center": s.center.numpy().copy(), "generation": s.generation},
    state_from_dict=lambda d: FDState(torch.as_tensor(np.asarray(d["center"], dtype=np.float32)), int(d["generation"])),
)


# ----------------------------------------------------------------------------- the tests


@pytest.fixture
def fd(monkeypatch):
    monkeypatch.setitem(registry.OPTIMIZERS, "fd", TOY)  # the one registry line


def _cfg(**extra):
    return config.load_config(
        None,
        tiny_overrides(
            **{
                "optimizer.name": "fd",
                "optimizer.block_size": 4,
                "model.name": "mlp-tiny",
                "optimizer.lr": 0.05,
                "optimizer.h": 0.01,
                **extra,
            }
        ),
    )


def test_toy_config_section_comes_from_its_params(fd):
    cfg = _cfg(**{"optimizer.directions": 8})
    assert cfg.optimizer.directions == 8 and cfg.optimizer.h == 0.01 and isinstance(cfg.optimizer.params, FDParams)
    assert config.to_dict(cfg)["optimizer"] == {
        "name": "fd",
        "lr_milestones": [],
        "lr_factor": 0.4,
        "block_size": 4,
        "batch_chunks": 1,
        "lr": 0.05,
        "h": 0.01,
        "directions": 8,
    }
    with pytest.raises(config.ConfigError, match="'popsize'.*for optimizer 'fd'; its valid keys are .*'directions'"):
        _cfg(**{"optimizer.popsize": 8})
    with pytest.raises(config.ConfigError, match="optimizer.h must be > 0"):
        _cfg(**{"optimizer.h": 0})
    assert ("optimizer.directions", "6", "[fd] random directions per generation") in config.describe()


def test_toy_trains_resumes_and_stores_theta_once(fd, tmp_path):
    cfg = _cfg(**{"train.epochs": 1})  # 8 generations of 32 examples
    straight = train.train(cfg, tmp_path / "a", log=lambda m: None)
    assert straight.generation == 8
    hist = checkpoint.load(tmp_path / "a" / checkpoint.LATEST).metrics["loss/mean"]
    assert np.isfinite(hist).all() and hist[-2:].mean() < hist[:2].mean()  # it descends
    train.train(cfg, tmp_path / "b", max_generations=3, log=lambda m: None)
    resumed = train.train(cfg, tmp_path / "b", log=lambda m: None)
    assert torch.equal(resumed.theta, straight.theta)
    ckpt = checkpoint.load(tmp_path / "b" / checkpoint.LATEST)
    assert ckpt.opt_state == {} and ckpt.sigma is None and np.array_equal(ckpt.theta, straight.theta.numpy())


def test_toy_on_two_ranks_gives_the_same_bits(fd, tmp_path, monkeypatch):
    monkeypatch.setattr(parallel.StopSignal, "install", lambda self: self)  # signal handlers: main thread only
    lock, build = threading.Lock(), train.build_problem

    def build_in_turn(cfg):  # build_problem seeds torch's process-wide RNG: threads take turns
        with lock:
            return build(cfg)

    monkeypatch.setattr(train, "build_problem", build_in_turn)
    cfg = _cfg(**{"train.epochs": 0.5, "optimizer.directions": 7, "optimizer.block_size": 2})  # 4 blocks, ragged
    one = train.train(cfg, tmp_path / "w1", log=lambda m: None)
    two = parallel.run_threaded(lambda comm: train.train(cfg, tmp_path / "w2", comm, log=lambda m: None), 2)
    assert one.generation == 4 and not torch.equal(one.theta, models.flat_params(build(cfg)[1]))  # it moved
    for r in two:
        assert torch.equal(r.theta, one.theta)
