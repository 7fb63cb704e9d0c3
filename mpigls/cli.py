"""Command line: ``mpigls train | certify | inspect | landscape | plot | report | tightness | export | data |
config | recipes | study | diagnose`` (the commands themselves: ``mpigls.commands``).

One process:      mpigls train configs/quickstart.yaml --out runs/quick
Built-in recipe:  mpigls train quickstart --out runs/quick       (``mpigls recipes`` lists them)
Two MPI ranks:    mpiexec -n 2 python -m mpi4py -m mpigls train configs/quickstart.yaml --out runs/quick
SLURM:            srun python -m mpi4py -m mpigls train configs/mnist-cnn3-deeppoly-pgpe.yaml --out $SCRATCH/run1

``python -m mpi4py`` makes an uncaught exception on any rank abort the whole job instead of
hanging it. ``main(argv)`` is the only place that reads argv or exits. Exit codes: 0 success,
1 runtime failure, 2 user error (bad config, bad input file), 3 stopped by SIGTERM/SIGUSR1 after a
checkpoint (requeue and run the same command to resume), 4 the hang watchdog ended the job.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from mpigls import __version__
from mpigls.commands import GROUPS
from mpigls.commands.stdout import tolerate_closed_stdout

__all__ = ["main", "build_parser"]


def _groups() -> list[ModuleType]:
    return [importlib.import_module(f"mpigls.commands.{name}") for name in GROUPS]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``command``, the parsers of the other commands may be stand-ins that carry
    only their help line (``diagnose``'s own imports torch)."""
    parser = argparse.ArgumentParser(
        prog="mpigls", description="MPI-parallel certified training with Gaussian Loss Smoothing."
    )
    parser.add_argument("--version", action="version", version=f"mpigls {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in _groups():
        if group.__name__.endswith(".studies"):
            group.add_parser(sub, light=command is not None and command != "diagnose")
        else:
            group.add_parser(sub)
    return parser


def _command_of(argv: list[str]) -> str:
    """The command named in ``argv`` (its first word that is not an option), or "" for none."""
    return next((a for a in argv if not a.startswith("-")), "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command_of(argv)).parse_args(argv)
    from mpigls import config as config_mod, parallel

    fake_nodes = None
    if args.command == "train":
        from mpigls.commands import train

        try:
            fake_nodes = train.config_of(args).train.fake_nodes
        except (*parallel.USER_ERRORS, config_mod.ConfigError):
            fake_nodes = None  # reported below, on every rank, by the command itself
    comm = parallel.init_comm(fake_nodes=fake_nodes)
    group = next(g for g in _groups() if args.command in g.COMMANDS)
    # Every rank validates the same input, so user errors fail alike everywhere; run_guarded makes
    # all ranks leave with one exit code (2 user error, 3 preempted) or aborts the job on a crash.
    # A reader that closes stdout early (``| head``) costs only the output it did not read.
    with tolerate_closed_stdout():
        return parallel.run_guarded(lambda: group.run(args, comm), comm, label=f"mpigls {args.command}")
