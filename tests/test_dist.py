"""Serial and in-process (threaded) tests of mpigls.parallel: no mpiexec needed."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mpigls import parallel

# ----------------------------------------------------------------------------- serial comm


def test_serial_comm_is_identity():
    c = parallel.SerialComm()
    assert (c.rank, c.world_size, c.is_root, c.local_rank, c.local_size, c.node, c.num_nodes) == (
        0,
        1,
        True,
        0,
        1,
        0,
        1,
    )
    assert isinstance(c, parallel.Comm)
    t = torch.arange(4, dtype=torch.float32)
    assert torch.equal(c.allgather_concat(t), t)
    assert c.allgather_obj({"a": 1}) == [{"a": 1}]
    assert c.bcast_obj([1, 2]) == [1, 2]
    assert c.agree_any(True) and not c.agree_any(False)
    assert c.all_arrive(0.0)
    assert c.allreduce_max(2.5) == 2.5
    assert torch.equal(c.allreduce_sum_int(torch.tensor([1, -2], dtype=torch.int64)), torch.tensor([1, -2]))
    c.barrier()
    c.check_consistent("x", b"anything")
    with pytest.raises(ValueError, match="root"):
        c.bcast_obj(1, root=1)
    with pytest.raises(ValueError, match="1-D"):
        c.allgather_concat(torch.zeros(2, 2))


def test_serial_exact_sum_close_to_float64_sum():
    rows = torch.randn(50, 33, generator=torch.Generator().manual_seed(1)) * 1e3
    got = parallel.SerialComm().allreduce_sum_exact(rows)
    assert got.dtype == torch.float32 and got.shape == (33,)
    ref = rows.double().sum(0)
    # quantisation error <= n * max * 2**-41, then one float32 rounding
    bound = 50 * rows.abs().max().item() * 2.0**-41 + ref.abs() * 2.0**-24
    assert torch.all((got.double() - ref).abs() <= bound)


def test_exact_sum_of_zeros_and_1d():
    c = parallel.SerialComm()
    assert torch.equal(c.allreduce_sum_exact(torch.zeros(3)), torch.zeros(3))
    t = torch.tensor([1.5, -2.25, 1e-30])
    assert torch.equal(c.allreduce_sum_exact(t)[:2], t[:2])


def test_exact_sum_rejects_nonfinite():
    with pytest.raises(FloatingPointError, match="rank 0: 1"):
        parallel.SerialComm().allreduce_sum_exact(torch.tensor([1.0, float("nan")]))


def test_fixed_point_round_trip_and_errors():
    t = torch.tensor([0.75, -0.5, 2.0**-41, 3 * 2.0**-41])
    e = parallel.fixed_point_exponent(float(t.abs().max()))
    assert e == 0
    q = parallel.fixed_point(t, e)
    assert q.dtype == torch.int64
    assert q.tolist() == [3 * 2**38, -(2**39), 0, 2]  # half to even: 0.5 -> 0, 1.5 -> 2
    assert torch.equal(parallel.from_fixed_point(q[:2], e), t[:2])
    with pytest.raises(ValueError, match="exceeds"):
        parallel.fixed_point(torch.tensor([4.0]), 1)
    with pytest.raises(ValueError, match="finite"):
        parallel.fixed_point_exponent(float("inf"))


# ----------------------------------------------------------------------------- threaded ranks


def _rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # mixed magnitudes make float summation order-dependent
    return torch.randn(n, d, generator=g) * torch.logspace(-6, 4, d)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(0, 23), seed=st.integers(0, 2**16), world=st.integers(2, 4))
def test_exact_sum_is_world_size_invariant(n, seed, world):
    rows = _rows(n, 9, seed)
    want = parallel.SerialComm().allreduce_sum_exact(rows)

    def body(comm):
        r = parallel.block_range(n, comm.rank, comm.world_size)
        return comm.allreduce_sum_exact(rows[r.start : r.stop])

    for got in parallel.run_threaded(body, world):
        assert got.numpy().tobytes() == want.numpy().tobytes()


def test_exact_sum_invariant_to_row_order_and_uneven_split():
    rows = _rows(10, 5, 3)
    want = parallel.SerialComm().allreduce_sum_exact(rows)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    splits = [[0, 1, 2, 3, 4, 5, 6], [], [7, 8], [9]]

    def body(comm):
        return comm.allreduce_sum_exact(rows[perm[splits[comm.rank]]])

    for got in parallel.run_threaded(body, 4):
        assert torch.equal(got, want)
    # an independent reference in exact rational arithmetic, following the documented scheme:
    # quantise to multiples of 2**(e - FRACTION_BITS) (half to even) with max|x| <= 2**e, add, round once
    e = math.frexp(float(rows.abs().max()))[1]
    scale = Fraction(2) ** (parallel.FRACTION_BITS - e)
    exact = [sum(round(Fraction(v) * scale) for v in col) / scale for col in rows.double().T.tolist()]
    assert torch.equal(want, torch.tensor([float(x) for x in exact], dtype=torch.float64).float())
    assert torch.allclose(want.double(), rows.double().sum(0), rtol=1e-6, atol=1e-6)


def test_manual_fixed_point_path_matches_allreduce_sum_exact():
    rows = _rows(12, 6, 7)
    want = parallel.SerialComm().allreduce_sum_exact(rows)

    def body(comm):
        r = parallel.block_range(12, comm.rank, comm.world_size)
        mine = rows[r.start : r.stop]
        e = parallel.fixed_point_exponent(comm.allreduce_max(float(mine.abs().max()) if len(mine) else 0.0))
        q = parallel.fixed_point(mine, e).sum(0)
        return parallel.from_fixed_point(comm.allreduce_sum_int(q), e)

    for got in parallel.run_threaded(body, 3):
        assert torch.equal(got, want)


def test_nonfinite_on_one_rank_raises_on_all():
    def body(comm):
        t = torch.ones(3) if comm.rank != 2 else torch.tensor([1.0, float("inf"), 1.0])
        try:
            comm.allreduce_sum_exact(t)
        except FloatingPointError as exc:
            return str(exc)
        return "no error"

    msgs = parallel.run_threaded(body, 3)
    assert all("rank 2: 1" in m for m in msgs)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_allgather_head_one_collective_for_flags_scalars_and_losses(n):
    """allgather_head: column-wise max of the heads (flags OR, max |z|) and the bodies concatenated in
    rank order with their bits kept (lengths differ per rank, one rank may have none), in ONE
    collective on every comm; SerialComm returns its own."""

    def body(comm):
        r = comm.rank
        calls = []
        orig = comm._allgather_array
        comm._allgather_array = lambda a: calls.append(a.size) or orig(a)
        losses = torch.arange(r, dtype=torch.float64) / 3 + r
        top, cat = comm.allgather_head([float(r == n - 1), 0.0, 0.5 * r - 7], losses)
        return top, cat, len(calls)

    out = parallel.run_threaded(body, n)
    want = torch.cat([torch.arange(r, dtype=torch.float64) / 3 + r for r in range(n)])
    for top, cat, calls in out:
        assert top == [1.0, 0.0, 0.5 * (n - 1) - 7] and calls == 1
        assert cat.dtype == torch.float64 and torch.equal(cat, want)
    serial_top, serial_cat = parallel.SerialComm().allgather_head([], torch.tensor([1.5], dtype=torch.float64))
    assert serial_top == [] and serial_cat.tolist() == [1.5]
    with pytest.raises(ValueError, match="1-D body"):
        parallel.SerialComm().allgather_head([0.0], torch.zeros(2, 2))


def test_thread_comm_collectives_and_fake_nodes():
    def body(comm):
        cat = comm.allgather_concat(torch.full((comm.rank,), float(comm.rank), dtype=torch.float64))
        return (
            comm.node,
            comm.num_nodes,
            comm.local_rank,
            comm.local_size,
            cat.tolist(),
            comm.bcast_obj(comm.rank * 10, root=2),
            comm.agree_any(comm.rank == 3),
            comm.agree_any(False),
            comm.allreduce_max(float(comm.rank)),
        )

    out = parallel.run_threaded(body, 4, fake_nodes=2)
    assert [o[:4] for o in out] == [(0, 2, 0, 2), (0, 2, 1, 2), (1, 2, 0, 2), (1, 2, 1, 2)]
    assert all(o[4] == [1.0, 2.0, 2.0, 3.0, 3.0, 3.0] for o in out)
    assert all(o[5:] == (20, True, False, 3.0) for o in out)
    # 3 ranks on 2 fake nodes: ceil(3/2) = 2 per node -> [0, 1] and [2]
    out = parallel.run_threaded(lambda c: (c.node, c.local_rank, c.local_size, c.num_nodes), 3, fake_nodes=2)
    assert out == [(0, 0, 2, 2), (0, 1, 2, 2), (1, 0, 1, 2)]
    # more fake nodes than ranks: one rank per node
    out = parallel.run_threaded(lambda c: (c.node, c.num_nodes), 2, fake_nodes=5)
    assert out == [(0, 2), (1, 2)]


def test_check_consistent_names_differing_ranks():
    def body(comm):
        try:
            comm.check_consistent("theta@gen7", b"a" if comm.rank in (0, 2) else b"b")
        except RuntimeError as exc:
            return str(exc)
        return ""

    msgs = parallel.run_threaded(body, 4)
    assert all("theta@gen7" in m and "rank(s) [1, 3] (host(s)" in m and "than rank(s) [0, 2]" in m for m in msgs)

    def odd_one(comm):  # the largest agreeing group is named as the reference, even without rank 0
        try:
            comm.check_consistent("theta", b"a" if comm.rank == 0 else b"b", generation=9)
        except RuntimeError as exc:
            return str(exc)
        return ""

    assert all(
        "failed at generation 9: rank(s) [0] (host(s)" in m and "than rank(s) [1, 2]" in m
        for m in parallel.run_threaded(odd_one, 3)
    )
    assert parallel.run_threaded(lambda c: c.check_consistent("ok", b"x"), 3) == [None] * 3


def test_run_threaded_failure_does_not_hang():
    def body(comm):
        if comm.rank == 1:
            raise KeyError("rank one broke")
        comm.barrier()

    with pytest.raises(RuntimeError, match="rank 1 of 3") as info:
        parallel.run_threaded(body, 3)
    assert isinstance(info.value.__cause__, KeyError)


# ----------------------------------------------------------------------------- blocks


def _block_owner(block: int, num_blocks: int, world: int) -> int:
    """The owner of ``block`` by a closed formula, independent of ``my_blocks``'s code."""
    base, extra = divmod(num_blocks, world)
    if block < extra * (base + 1):
        return block // (base + 1)
    return extra + (block - extra * (base + 1)) // base


@settings(max_examples=60, deadline=None)
@given(num_blocks=st.integers(0, 40), world=st.integers(1, 9))
def test_my_blocks_partition(num_blocks, world):
    parts = [parallel.my_blocks(num_blocks, r, world) for r in range(world)]
    assert sum(parts, []) == list(range(num_blocks))  # contiguous, in rank order, complete
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)
    for r, p in enumerate(parts):
        assert all(_block_owner(b, num_blocks, world) == r for b in p)


def test_my_blocks_errors():
    with pytest.raises(ValueError, match="rank"):
        parallel.my_blocks(4, 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        parallel.my_blocks(4, 0, 0)
    with pytest.raises(ValueError, match="num_blocks"):
        parallel.my_blocks(-1, 0, 1)


# ----------------------------------------------------------------------------- init / devices


def test_init_comm_without_mpi4py(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # makes `import mpi4py` fail
    for var in parallel.LAUNCHER_SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    assert isinstance(parallel.init_comm(), parallel.SerialComm)
    monkeypatch.setenv("PMI_SIZE", "4")
    with pytest.raises(RuntimeError, match="mpi4py"):
        parallel.init_comm()


def test_init_comm_validates_fake_nodes():
    with pytest.raises(ValueError, match="fake_nodes"):
        parallel.init_comm(fake_nodes=0)


def test_bind_device_cpu_and_logs_mapping(caplog):
    before = torch.get_num_threads()
    try:
        with caplog.at_level("INFO", logger="mpigls.parallel"):
            dev = parallel.bind_device(parallel.SerialComm(), device="cpu", threads=1)
        assert dev == torch.device("cpu") and torch.get_num_threads() == 1
        assert "rank 0: node 0" in caplog.text and "threads 1" in caplog.text
        out = parallel.run_threaded(lambda c: parallel.bind_device(c, device="cpu", threads=1), 2)
        assert out == [torch.device("cpu")] * 2
        with pytest.raises(ValueError, match="device"):
            parallel.bind_device(parallel.SerialComm(), device="tpu")
        with pytest.raises(ValueError, match="threads"):
            parallel.bind_device(parallel.SerialComm(), threads=0)
        if not torch.cuda.is_available():
            with pytest.raises(ValueError, match="cuda"):
                parallel.bind_device(parallel.SerialComm(), device="cuda")
            assert parallel.bind_device(parallel.SerialComm(), device="auto").type == "cpu"
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- signals / faults


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_stop_signal_sets_flag_and_restores_handler(signum):
    previous = signal.getsignal(signum)
    with parallel.StopSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signum)
        assert stop.requested and stop.signum == signum
        assert parallel.SerialComm().agree_any(stop.requested)
        assert stop.name == signal.Signals(signum).name
    assert signal.getsignal(signum) == previous


def test_second_ctrl_c_interrupts_at_once():
    with parallel.StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # the first asks for a clean stop at the next boundary
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes
                time.sleep(0.001)


def test_exit_codes_are_distinct():
    codes = [parallel.EXIT_OK, parallel.EXIT_FAILURE, parallel.EXIT_USER_ERROR, parallel.EXIT_PREEMPTED]
    assert codes == [0, 1, 2, 3]


def test_run_guarded_serial(capsys):
    assert parallel.run_guarded(lambda: None) == 0
    assert parallel.run_guarded(lambda: 3) == 3

    def user_error():
        raise ValueError("optimizer.popsize must be even, got 255;\n  use 254 or 256")

    assert parallel.run_guarded(user_error) == parallel.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.strip() == "error: optimizer.popsize must be even, got 255; use 254 or 256"

    def missing():
        Path("/nonexistent/dir/file.yaml").read_text()

    assert parallel.run_guarded(missing) == parallel.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err and "/nonexistent/dir/file.yaml" in err

    def bug():
        raise RuntimeError("internal failure")

    assert parallel.run_guarded(bug, parallel.SerialComm()) == parallel.EXIT_FAILURE
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: internal failure" in err
    assert parallel.run_guarded(bug, user_errors=(RuntimeError,)) == parallel.EXIT_USER_ERROR


def test_run_guarded_label_and_system_exit(capsys):
    def bad():
        raise ValueError("x")

    assert parallel.run_guarded(bad, label="mpigls train") == 2
    assert capsys.readouterr().err.strip() == "mpigls train: error: x"
    assert parallel.run_guarded(lambda: (_ for _ in ()).throw(SystemExit(3))) == 3
    assert parallel.run_guarded(lambda: (_ for _ in ()).throw(KeyboardInterrupt())) == 130


# ----------------------------------------------------------------------------- run_guarded, several ranks


def _guarded_codes(body, world: int = 3, grace_s: float = 2.0) -> list:
    """Each ThreadComm rank's ending under run_guarded: the returned code, or ("exit", code) when
    it ended the job (SystemExit, what MPI ranks do with os._exit / MPI_Abort)."""

    def rank(comm):
        try:
            return parallel.run_guarded(lambda: body(comm), comm, grace_s=grace_s, label="mpigls train")
        except SystemExit as exc:
            return ("exit", exc.code)

    return parallel.run_threaded(rank, world)


def test_run_guarded_several_ranks_success_returns_zero(capsys):
    assert _guarded_codes(lambda comm: comm.barrier()) == [0, 0, 0]
    assert capsys.readouterr().err == ""


def test_run_guarded_several_ranks_agreed_stop_exits_together(capsys):
    assert _guarded_codes(lambda comm: parallel.EXIT_PREEMPTED) == [("exit", parallel.EXIT_PREEMPTED)] * 3
    assert capsys.readouterr().err == ""


def test_run_guarded_same_user_error_everywhere_is_said_once(capsys):
    def body(comm):
        raise ValueError("optimizer.popsize must be even, got 255")

    assert _guarded_codes(body) == [("exit", parallel.EXIT_USER_ERROR)] * 3
    assert capsys.readouterr().err.splitlines() == ["mpigls train: error: optimizer.popsize must be even, got 255"]


def test_run_guarded_user_error_on_one_rank_aborts_the_job(capsys):
    def body(comm):
        if comm.rank == 1:
            raise FileNotFoundError("data.root /nowhere does not exist")
        comm.barrier()  # the others wait in a collective that rank 1 never joins

    codes = _guarded_codes(body, grace_s=0.2)
    assert codes[1] == ("exit", parallel.EXIT_USER_ERROR)
    assert all(c[0] == "exit" and c[1] != 0 for c in codes)  # nobody hangs, nobody returns normally
    assert "[rank 1] mpigls train: error: data.root /nowhere does not exist" in capsys.readouterr().err


def test_run_guarded_runtime_failure_on_one_rank_aborts_with_its_traceback(capsys):
    def body(comm):
        if comm.rank == 2:
            raise RuntimeError("boom on rank two")
        comm.barrier()

    codes = _guarded_codes(body)
    assert codes[2] == ("exit", parallel.EXIT_FAILURE) and all(c[0] == "exit" for c in codes)
    err = capsys.readouterr().err
    assert "[rank 2] Traceback (most recent call last):" in err and "[rank 2] RuntimeError: boom on rank two" in err


# ----------------------------------------------------------------------------- package structure


def test_every_communicator_implements_the_whole_protocol():
    members = [
        n for n, v in vars(parallel.Comm).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))
    ]
    members += list(parallel.Comm.__annotations__)
    assert {"all_arrive", "exit_together", "abort", "agree_any", "allreduce_sum_exact"} <= set(members)
    for cls in (parallel.SerialComm, parallel.ThreadComm, parallel.MPIComm):
        missing = [
            n
            for n in members
            if not hasattr(cls, n) and n not in ("rank", "world_size", "local_rank", "local_size", "node", "num_nodes")
        ]
        assert not missing, (cls.__name__, missing)
    assert isinstance(parallel.SerialComm(), parallel.Comm)
    assert all(parallel.run_threaded(lambda c: isinstance(c, parallel.Comm), 2))


def test_only_parallel_mpi_imports_mpi4py():
    import ast

    root = Path(parallel.__file__).resolve().parents[1]
    importers = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n == "mpi4py" or n.startswith("mpi4py.") for n in names):
                importers.append((path.relative_to(root).as_posix(), node.col_offset))
    # only inside functions (indented), never at module level: importing mpigls never loads MPI
    assert {p for p, _ in importers} == {"parallel/mpi.py"} and all(col > 0 for _, col in importers), importers


def test_stoppable_blocks_one_rank_cut_short_stops_every_rank():
    class Flag:
        requested = False

    def body(comm):
        flag = Flag()
        blocks = parallel.StoppableBlocks(parallel.my_blocks(9, comm.rank, comm.world_size), flag)
        done = []
        for b in blocks:
            done.append(b)
            flag.requested = comm.rank == 1  # a signal arrives on rank 1 only, after its first block
        return done, blocks.agree_stop(comm), blocks.cut_short

    out = parallel.run_threaded(body, 3)
    assert [o[0] for o in out] == [[0, 1, 2], [3], [6, 7, 8]]
    assert [o[1:] for o in out] == [(True, False), (True, True), (True, False)]
