"""The study commands: ``study run | status | verify | adopt | report`` (``mpigls.studies.cli``) and
``diagnose`` (PGPE's gradient agreement and the smoothed loss, ``mpigls.studies.diagnose``).

``diagnose``'s own parser is built only when it is the command given (``light``): its module imports
torch, which ``mpigls --help`` and the other commands do not need.
"""

from __future__ import annotations

import argparse

from mpigls.commands.common import load_usable

__all__ = ["COMMANDS", "add_parser", "run"]

COMMANDS = ("study", "diagnose")

DIAGNOSE_HELP = "PGPE gradient agreement against popsize and sigma, and the smoothed loss, at checkpoints"


def add_parser(sub, *, light: bool = False) -> None:
    from mpigls.studies import cli as study_cli

    study_cli.add_parser(sub)
    if light:
        sub.add_parser("diagnose", help=DIAGNOSE_HELP)
    else:
        from mpigls.studies import diagnose

        diagnose.add_parser(sub)


def run(args: argparse.Namespace, comm) -> int:
    if args.command == "diagnose":
        from mpigls.studies import diagnose

        return diagnose.run(args, comm, load_usable)
    from mpigls.studies import cli as study_cli

    if comm.world_size > 1:
        raise ValueError("mpigls study runs in one process (each run is its own process); start it without mpiexec")
    return study_cli.run(args)
