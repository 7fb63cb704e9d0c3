"""The commands of ``mpigls``, one module per group; ``mpigls.cli`` assembles them.

=================  ==========================================================================
``train``          train (or resume) a run; ``--dry-run`` prints ``run.train.plan``
``checkpoints``    certify, tightness, landscape, inspect, export: one checkpoint each
``runs``           plot, report: run directories (and study files for ``report``)
``setup``          data, config, recipes
``studies``        study, diagnose (delegating to ``mpigls.studies``)
``common``         what several share: ``--set``, reading a usable checkpoint, a checkpoint's
                   network, data and test examples (``checkpoint_problem``), figure paths
=================  ==========================================================================

A group module has ``COMMANDS`` (the names it adds), ``add_parser(subparsers)`` and ``run(args, comm)``.
It imports what a command computes with inside that command, so that ``mpigls --version``, ``config``,
``recipes`` and ``inspect`` start without torch. Adding a command: its parser and function in the group
it belongs to (or a new group module, listed in ``GROUPS``); regenerate ``tests/golden/surface.txt``.
"""

from __future__ import annotations

__all__ = ["GROUPS"]

GROUPS = ("train", "checkpoints", "runs", "setup", "studies")
