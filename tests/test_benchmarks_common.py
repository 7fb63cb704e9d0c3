"""benchmarks/common.py (median, range and paired ratios of interleaved repeats, peak memory, the
JSON record), the result files generated from records, and the benchmarks package's layout."""

import argparse
import datetime as dt
import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import common, make_results
from mpigls.nn import models
from mpigls.optim import pgpe

from conftest import REPO

BENCHMARKS = REPO / "benchmarks"


def test_spread_is_median_and_range():
    s = common.spread([3.0, 1.0, 2.0])
    assert (s.median, s.low, s.high, s.n) == (2.0, 1.0, 3.0, 3)
    assert common.spread([4, 1, 3, 2]).median == 2.5  # even count: mean of the middle two
    assert common.spread([0.7]).as_dict() == {"median": 0.7, "low": 0.7, "high": 0.7, "n": 1}
    with pytest.raises(ValueError, match="repeats"):
        common.spread([])


def test_paired_ratios_cancel_a_slow_round():
    # round 2 ran while the machine was three times slower for both peers
    peer = [1.0, 3.0, 1.2]
    ours = [0.5, 1.5, 0.7]
    assert common.paired_ratios(peer, ours) == pytest.approx([2.0, 2.0, 1.2 / 0.7])
    r = common.ratio_spread(peer, ours)
    assert r.median == pytest.approx(2.0) and (r.low, r.high) == pytest.approx((1.2 / 0.7, 2.0))
    # the ratio of the medians mixes rounds: 1.2 / 0.7, not the 2 most rounds show
    assert common.spread(peer).median / common.spread(ours).median == pytest.approx(1.2 / 0.7)
    with pytest.raises(ValueError, match="as many rounds"):
        common.paired_ratios([1.0, 2.0], [1.0])


@pytest.mark.parametrize("alternate,order", [(False, "ABCABCABC"), (True, "ABCCBAABC")])
def test_interleave_runs_one_call_per_peer_per_round(alternate, order):
    log = []

    def peer(name):
        def call():
            log.append(name)
            return log.count(name)  # this peer's call number

        return call

    out = common.interleave({n: peer(n) for n in "ABC"}, 3, alternate=alternate)
    assert "".join(log) == order
    assert out == {"A": [1, 2, 3], "B": [1, 2, 3], "C": [1, 2, 3]}
    with pytest.raises(ValueError, match="repeats"):
        common.interleave({"A": peer("A")}, 0)


def test_timer_and_time_peers_read_the_clock_around_each_timed_call():
    ticks = iter([10.0, 10.5, 20.0, 20.25, 30.0, 31.0, 40.0, 40.5, 50.0, 50.5])
    calls, syncs = [], []
    run = common.timer(lambda: calls.append(1), clock=lambda: next(ticks), sync=lambda: syncs.append(1))
    assert run() == 0.5 and len(calls) == 1 and len(syncs) == 2
    counts = {"a": 0, "b": 0}

    def bump(name):
        def call():
            counts[name] += 1

        return call

    times = common.time_peers({"a": bump("a"), "b": bump("b")}, 2, clock=lambda: next(ticks), warmup=2)
    # two untimed warm-up calls each, then rounds a b a b read the clock pairs in that order
    assert counts == {"a": 4, "b": 4}
    assert times == {"a": [0.25, 0.5], "b": [1.0, 0.5]}


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_sees_a_block_s_allocation():
    # a fresh process: no freed memory of other tests that the allocation could reuse
    code = (
        "import torch; from benchmarks.common import PeakMemory\n"
        "with PeakMemory() as m:\n    x = torch.ones(64 << 18)\n"  # 64 MiB, touched
        "del x\nwith PeakMemory() as n:\n    pass\nprint(m.mb, n.mb)"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, check=True)
    grown, idle = map(float, out.stdout.split())
    assert 60 < grown < 200
    assert idle < 8  # the peak was reset at entry: the earlier 64 MiB do not count


def test_command_line_names_python_and_the_environment():
    argv = ["/some/venv/bin/python3", "-m", "benchmarks.bench_x", "--methods", "ibp,deeppoly", "--note", "a b"]
    cmd = common.command_line(argv, {"OMP_NUM_THREADS": "1"})
    assert cmd == "OMP_NUM_THREADS=1 python -m benchmarks.bench_x --methods ibp,deeppoly --note 'a b'"


def test_record_fields(tmp_path):
    args = argparse.Namespace(batch=8, methods="ibp", out=str(tmp_path / "r.json"), note="shared machine")
    results = {"rows": [{"method": "ibp", "s": np.float64(0.5), "theta": torch.tensor([1.0, 2.0])}]}
    path = common.write_record("bench_x", args, results, args.out, args.note)
    assert path == tmp_path / "r.json"
    rec = common.load_record(path)
    assert rec["schema"] == common.SCHEMA and rec["benchmark"] == "bench_x"
    assert dt.datetime.fromisoformat(rec["date"]).tzinfo is not None
    assert rec["params"] == {"batch": 8, "methods": "ibp"}  # where the record lies and the note are not parameters
    assert rec["results"] == {"rows": [{"method": "ibp", "s": 0.5, "theta": [1.0, 2.0]}]}
    assert rec["machine"]["note"] == "shared machine" and rec["machine"]["cpus"] == os.cpu_count()
    assert rec["torch"] == torch.__version__ and rec["threads"] == torch.get_num_threads()
    assert rec["command"].split(" -m ")[0].endswith("python") or rec["command"].startswith("python")
    assert rec["commit"] is None or (len(rec["commit"]) == 40 and isinstance(rec["dirty"], bool))
    default = common.default_path("bench_x", "2026-01-02T03:04:05+00:00")
    assert default == common.RECORDS / "2026-01-02T030405Z-bench_x.json"
    (tmp_path / "other.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a benchmark record"):
        common.load_record(tmp_path / "other.json")


def test_results_file_traces_every_row_to_its_record(tmp_path):
    records = tmp_path / "records"
    rows = [
        {"device": "cpu", "model": "cnn3", "method": "ibp", "bound_s": 0.012344, "bound_s_range": [0.01, 0.02]},
        {"device": "cpu", "model": "cnn3", "method": "deeppoly", "bound_s": float("nan"), "bound_s_range": [1, 2]},
    ]
    path = common.write_record("bench_x", {"batch": 8}, {"rows": rows}, records / "g.json", "shared")
    rec = common.load_record(path)
    (written,) = make_results.write_results([path], tmp_path / "results")
    assert written.name == f"{rec['date'][:10]}-bench_x.md"
    text = written.read_text()
    assert "[`g.json`](../records/g.json)" in text
    assert f"`{rec['command']}`" in text
    if rec["commit"]:  # a git checkout
        assert f"`{rec['commit'][:12]}`" in text
    assert "note: shared" in text
    header = next(line for line in text.splitlines() if line.startswith("| device"))
    assert header.split(" | ")[:4] == ["| device", "model", "method", "bound_s"]
    assert "| cpu | cnn3 | ibp | 0.01234 | 0.01–0.02 |" in text
    assert "| cpu | cnn3 | deeppoly | – | 1–2 |" in text
    assert f"]({written.name})" in (tmp_path / "results" / "README.md").read_text()


def test_every_benchmark_is_a_module_of_the_package_writing_a_record():
    names = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem not in ("__init__", "common"))
    assert {"bench_bounds", "bench_generation", "scaling", "scaling_model", "make_results"} <= set(names)
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        source = Path(module.__file__).read_text()
        assert "sys.path" not in source, name
        if name.startswith(("bench_", "scaling")):
            assert hasattr(module, "main") and "common.write_record(" in source, name
    for script in (REPO / "tools").glob("*.py"):
        assert "sys.path.insert" not in script.read_text(), script.name


def test_train_generation_is_a_pgpe_generation():
    """bench_generation's timed generation (evaluate, exchange on one rank, tell) moves theta exactly
    as the serial PGPE step on the same losses does."""
    from benchmarks import bench_generation as bg

    torch.manual_seed(0)
    model = models.build("mlp-tiny", (1, 8, 8), 10, [0.0], [1.0])
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    theta = models.flat_params(model).detach()
    with bg.TrainGeneration(model, x, y, 0.05, "ibp", 8, 0.01, 2, {}, torch.device("cpu")) as gen:
        losses = gen()
        after = gen.state.center.clone()
    params = pgpe.PGPEParams(popsize=8, sigma_init=0.01, lr=1e-3)
    serial, _ = pgpe.tell(pgpe.init(params, theta), params, 0, losses, lr=1e-3)
    assert gen.state.generation == 1 and losses.shape == (8,)
    assert torch.equal(after, serial.center) and not torch.equal(after, theta)


def test_control_variate_generation_is_the_optimizer_step():
    """bench_control_variate's timed "grad" generation is the unit's step: the serial PGPE tell with g
    the backpropagated gradient at theta, on the same losses."""
    import contextlib

    from benchmarks import bench_control_variate as bcv
    from mpigls import config
    from mpigls.objectives import losses as losses_mod

    torch.manual_seed(0)
    model = models.build("mlp-tiny", (1, 8, 8), 10, [0.0], [1.0])
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    theta = models.flat_params(model).detach().clone()
    params = pgpe.PGPEParams(popsize=8, sigma_init=0.01, lr=1e-3, fitness_shaping="raw", control_variate="grad")
    cfg = config.from_dict({"model": {"name": "mlp-tiny"}, "bound": {"method": "ibp", "eps": 0.05},
                            "optimizer": {"name": "pgpe", "block_size": 2}})  # fmt: skip
    with contextlib.ExitStack() as stack:
        gen = bcv.Generation(cfg, model, theta, x, y, params, stack)
        state0 = gen.state
        gen()
    point = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(losses_mod.certified_loss(model, x, y, 0.05, "ibp", weights=point[None]).sum(), point)
    rows = pgpe.ask(state0, params, 0, range(4))
    with torch.no_grad():
        all_losses = losses_mod.certified_loss(model, x, y, 0.05, "ibp", weights=rows).double()
    serial, _ = pgpe.tell(state0, params, 0, all_losses, lr=1e-3, g=pgpe.control_variate(state0, params, g))
    assert torch.equal(gen.state.center, serial.center) and not torch.equal(serial.center, theta)
