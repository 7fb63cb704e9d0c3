"""``mpigls train``: train (or resume) from a YAML config or a built-in recipe; ``--dry-run`` prints the
plan that the run would follow (``run.train.plan``: the same checks) and trains nothing."""

from __future__ import annotations

import argparse
import sys

from mpigls.argtypes import count
from mpigls.commands.common import add_overrides

__all__ = ["COMMANDS", "add_parser", "config_of", "run"]

COMMANDS = ("train",)


def add_parser(sub) -> None:
    tr = sub.add_parser("train", help="train (or resume) from a YAML config")
    tr.add_argument(
        "config",
        nargs="?",
        help="YAML config file, or the name of a built-in recipe (`mpigls recipes`) when no such file "
        "exists (default: built-in defaults)",
    )
    tr.add_argument("--out", required=True, help="output directory: checkpoints, DIR/latest.h5, metrics")
    tr.add_argument(
        "--max-generations",
        type=count(0),
        default=None,
        help="stop cleanly after this many generations in total (with a checkpoint); a later call continues",
    )
    add_overrides(tr, "override a config key (repeatable), e.g. --set optimizer.popsize=64")
    tr.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    tr.add_argument("--dry-run", action="store_true", help="validate config and data, print a summary, do not train")
    tr.add_argument("--no-eval", action="store_true", help="skip the final test-set certification")
    tr.add_argument(
        "--restart",
        action="store_true",
        help="start from generation 0 even if --out holds an earlier run: its files are moved into "
        "OUT/aside-<UTC time>/ (never deleted). Needed when --out holds checkpoints none of which "
        "loads",
    )


def config_of(args: argparse.Namespace, note=None):
    """The config ``mpigls train`` runs: the file (or built-in recipe) named, with ``--set`` applied;
    ``note(text)`` hears which keys of the file a change of optimizer by ``--set`` dropped."""
    from mpigls import config as config_mod, recipes

    path = None if args.config is None else recipes.resolve_config(args.config)
    return config_mod.load_config(path, args.overrides, note=note)


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)  # stdout stays the config's YAML with --print-config


def run(args: argparse.Namespace, comm) -> int:
    from mpigls import config as config_mod, parallel

    cfg = config_of(args, note=_stderr if comm.is_root else None)
    if args.print_config:
        if comm.is_root:
            import yaml

            print(yaml.safe_dump(config_mod.to_dict(cfg), sort_keys=False), end="")
        return 0
    from mpigls.run import train as train_mod

    if args.dry_run:
        say = print if comm.is_root else (lambda msg: None)
        plan = train_mod.plan(cfg, args.out, comm, restart=args.restart, say=say, check_lock=True)
        say(plan.summary(comm.world_size))
        return 0
    result = train_mod.train(
        cfg, args.out, comm, max_generations=args.max_generations, restart=args.restart, evaluate=not args.no_eval
    )
    return parallel.EXIT_PREEMPTED if result.stopped_by_signal else 0
