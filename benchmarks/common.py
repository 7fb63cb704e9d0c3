"""What every benchmark shares: interleaved timing of named peers, peak memory, and the JSON record.

Timing. A benchmark compares named peers (two code paths, two settings, ours and another
library) on the same inputs. ``time_peers`` warms each up, then runs them in rounds, one call of
each per round (A B C, A B C, ...; ``alternate``: A B C, C B A, ...), so that a drift of the
machine's speed (other jobs, frequency scaling) hits every peer alike. ``spread`` summarises a
peer's times (median, range), ``paired_ratios`` compares two peers round by round: the ratio of
round k uses two calls that ran next to each other, so a slow round cancels in its ratio.

Memory. ``PeakMemory`` measures the peak growth of a block: CUDA's max allocated bytes, or on
Linux CPUs the peak resident set (reset through /proc/self/clear_refs) over the resident set at
entry.

Record. ``write_record`` writes one JSON object per benchmark run: the benchmark's name, the date,
the exact command (with the thread environment), the commit (and whether the tree had changes),
the machine (CPU model and count, load averages at the end, GPU, a free-text ``note``), torch and
Python versions, the parameters and the results. Tables are lists of flat dicts under
``results``; ``python -m benchmarks.make_results`` turns records into markdown result files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = [
    "CLOCKS",
    "RECORDS",
    "SCHEMA",
    "PeakMemory",
    "Spread",
    "add_record_args",
    "command_line",
    "git_state",
    "interleave",
    "machine_info",
    "make_record",
    "paired_ratios",
    "ratio_spread",
    "spread",
    "sync_for",
    "time_peers",
    "timer",
    "write_record",
]

T = TypeVar("T")
K = TypeVar("K")

REPO = Path(__file__).resolve().parents[1]
RECORDS = Path(__file__).resolve().parent / "records"  # default home of the records
SCHEMA = 1  # version of the record's layout
# environment variables that change what a benchmark measures; recorded and put in front of the command
ENV_KEYS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
ENV_PREFIX = "MPIGLS_"
_STARTED = time.time()  # this process's start, close enough to the benchmark's

# "wall": elapsed seconds; "cpu": CPU seconds of this process (all its threads): on a shared
# machine the fairer measure of one-thread work, since waiting for a core does not count.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


# ----------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Spread:
    """Median and range of repeated measurements (``n`` of them)."""

    median: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def spread(values: Sequence[float]) -> Spread:
    """Median, minimum and maximum of ``values`` (the median of an even count is the mean of the middle two)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("spread of no measurements: run at least one repeat (--repeats >= 1)")
    return Spread(statistics.median(vals), min(vals), max(vals), len(vals))


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """num[k] / den[k] for every round k: two peers compared call against call of the same round."""
    if len(num) != len(den):
        raise ValueError(f"paired ratios need as many rounds on both sides, got {len(num)} and {len(den)}")
    return [float(a) / float(b) for a, b in zip(num, den)]


def ratio_spread(num: Sequence[float], den: Sequence[float]) -> Spread:
    """Median and range of the paired ratios num[k] / den[k] (e.g. peer seconds / our seconds: speedup)."""
    return spread(paired_ratios(num, den))


# ----------------------------------------------------------------------------- timing


def sync_for(device: torch.device | str) -> Callable[[], None]:
    """What to call before reading a clock: wait for the GPU's queued work on CUDA, nothing on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def timer(
    fn: Callable[[], Any], clock: Callable[[], float] = time.perf_counter, sync: Callable[[], None] | None = None
) -> Callable[[], float]:
    """A callable that runs ``fn`` once and returns its seconds by ``clock`` (``sync`` on both sides)."""
    wait = sync or (lambda: None)

    def run() -> float:
        wait()
        t0 = clock()
        fn()
        wait()
        return clock() - t0

    return run


def interleave(peers: Mapping[K, Callable[[], T]], repeats: int, *, alternate: bool = False) -> dict[K, list[T]]:
    """Call every peer once per round for ``repeats`` rounds; each peer's results in round order.

    Rounds run A B C, A B C, ...; with ``alternate`` every odd round runs backwards (A B C, C B A),
    so that no peer always follows the same one (caches, allocator state, a process started before).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(peers)
    out: dict[K, list[T]] = {name: [] for name in names}
    for k in range(repeats):
        for name in names[::-1] if alternate and k % 2 else names:
            out[name].append(peers[name]())
    return out


def time_peers(
    peers: Mapping[str, Callable[[], Any]],
    repeats: int,
    *,
    clock: Callable[[], float] = time.perf_counter,
    sync: Callable[[], None] | None = None,
    warmup: int = 1,
    alternate: bool = False,
) -> dict[str, list[float]]:
    """Seconds of every call of every peer, interleaved (``interleave``), after ``warmup`` untimed
    calls of each (kernels, code pages, allocator)."""
    for fn in peers.values():
        for _ in range(warmup):
            fn()
    return interleave({name: timer(fn, clock, sync) for name, fn in peers.items()}, repeats, alternate=alternate)


# ----------------------------------------------------------------------------- memory


def _status_mb(key: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class PeakMemory:
    """``with PeakMemory(device) as mem: ...``; then ``mem.mb`` is the peak growth in MiB of the block.

    CUDA: max allocated minus allocated at entry. CPU: the peak resident set minus the resident set
    at entry; the peak is reset at entry through /proc/self/clear_refs (Linux). Where that fails,
    the growth of the process's lifetime max RSS, which only sees a block that sets a new maximum.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.mb = math.nan
        self._base = math.nan
        self._reset = False

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated() / 2**20
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._reset = True
            self._base = _status_mb("VmRSS:")
        except OSError:
            self._base = _maxrss_mb()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2**20 - self._base
        elif self._reset:
            self.mb = _status_mb("VmHWM:") - self._base
        else:
            self.mb = _maxrss_mb() - self._base


# ----------------------------------------------------------------------------- the record


def git_state(repo: Path = REPO) -> dict:
    """{"commit": HEAD's sha or None outside a git checkout, "dirty": whether tracked files differ from it}."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": sha, "dirty": bool(status.strip())}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(note: str = "") -> dict:
    """The machine: CPU model, logical CPUs (and those this process may use), load averages over
    1/5/15 minutes (other work on a shared machine shows here), the GPU if any, and ``note``."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "node": platform.node(),
        "system": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": usable,
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "note": note,
    }


def relevant_env() -> dict[str, str]:
    """The environment variables that change what a benchmark measures (threads, devices, mpigls's own)."""
    return {k: v for k, v in sorted(os.environ.items()) if k in ENV_KEYS or k.startswith(ENV_PREFIX)}


def command_line(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> str:
    """The command as typed: the environment of ``relevant_env`` first, then ``python`` (by name, not
    the interpreter's path) and its arguments (``sys.orig_argv``: with ``-m benchmarks.x``)."""
    if argv is None:
        argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    env = relevant_env() if env is None else env
    words = [f"{k}={shlex.quote(v)}" for k, v in env.items()]
    return " ".join([*words, shlex.join(["python", *argv[1:]])])


def make_record(name: str, params: Mapping[str, Any], results: Any, *, note: str = "") -> dict:
    """The record of one run of benchmark ``name`` (module docstring)."""
    now = dt.datetime.now(dt.timezone.utc)
    return {
        "schema": SCHEMA,
        "benchmark": name,
        "date": now.isoformat(timespec="seconds"),
        "duration_s": round(time.time() - _STARTED, 1),
        "command": command_line(),
        "env": relevant_env(),
        **git_state(),
        "machine": machine_info(note),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "params": dict(params),
        "results": results,
    }


def default_path(name: str, date: str) -> Path:
    """benchmarks/records/<date and time, UTC>-<name>.json."""
    stamp = dt.datetime.fromisoformat(date).strftime("%Y-%m-%dT%H%M%SZ")
    return RECORDS / f"{stamp}-{name}.json"


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):  # numpy arrays
        return value.tolist()
    return str(value)


def add_record_args(parser: argparse.ArgumentParser, default_out: str | None = None) -> None:
    """``--out`` (the record's path; default benchmarks/records/<date>-<name>.json) and ``--note``."""
    parser.add_argument(
        "--out",
        default=default_out,
        help="path of the JSON record (default: benchmarks/records/<UTC date and time>-<benchmark>.json)",
    )
    parser.add_argument(
        "--note",
        default="",
        help="free text stored as the record's machine.note (e.g. 'shared with other jobs', the node type)",
    )


RECORD_ARGS = ("out", "note")


def write_record(
    name: str, params: Mapping[str, Any] | argparse.Namespace, results: Any, out: str | Path | None = None, note=""
) -> Path:
    """Write the record of this run (``make_record``) to ``out`` or the default path; returns the path.

    ``params`` may be the parsed arguments; ``out`` and ``note`` are left out of the parameters
    (the path is where the record lies, the note goes to ``machine.note``).
    """
    given = vars(params) if isinstance(params, argparse.Namespace) else params
    params = {k: v for k, v in given.items() if k not in RECORD_ARGS}
    record = make_record(name, params, results, note=note)
    path = Path(out) if out else default_path(name, record["date"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")
    print(f"wrote {path}")
    return path


def load_record(path: str | Path) -> dict:
    """A record written by ``write_record`` (ValueError naming the file when it is not one)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "benchmark" not in data or "results" not in data:
        raise ValueError(f"{path} is not a benchmark record (no 'benchmark' and 'results' keys)")
    return data
