"""The commands that set a user up: ``data fetch`` (download a dataset), ``config`` (every config key with
its default and meaning), ``recipes`` (the built-in configs and job scripts). None of them imports torch
unless it downloads."""

from __future__ import annotations

import argparse

__all__ = ["COMMANDS", "add_parser", "run"]

COMMANDS = ("data", "config", "recipes")


def add_parser(sub) -> None:
    da = sub.add_parser("data", help="dataset tools: `mpigls data fetch mnist --root DIR` downloads a dataset")
    dsub = da.add_subparsers(dest="data_command", required=True)
    fe = dsub.add_parser("fetch", help="download MNIST or CIFAR-10 with torchvision (md5 checked) into --root")
    fe.add_argument("name", choices=("mnist", "cifar10"))
    fe.add_argument("--root", required=True, help="the directory to use as data.root")
    fe.add_argument("--mirror", default=None, help="URL prefix of a server holding the same files (a site mirror)")

    cf = sub.add_parser("config", help="list every config key with its default and meaning")
    cf.add_argument("--markdown", action="store_true")

    rc = sub.add_parser(
        "recipes", help="the built-in configs (`mpigls train NAME` runs one) and job scripts: list, show, copy"
    )
    rc.add_argument(
        "action",
        nargs="?",
        choices=("list", "show", "copy", "path"),
        default="list",
        help="list (default); show NAME: print it; copy NAME [DIR]: write it into DIR to edit; path NAME: its file",
    )
    rc.add_argument("name", nargs="?", help="a name from the list, e.g. quickstart or paper/mnist-0.1-cnn3-ibp-grad")
    rc.add_argument("dir", nargs="?", default=".", help="copy: the directory to write into (default: .)")
    rc.add_argument("--jobs", action="store_true", help="the job scripts (SLURM, mpirun) instead of the configs")
    rc.add_argument("--force", action="store_true", help="copy: overwrite an existing file")


def run(args: argparse.Namespace, comm) -> int:
    return {"data": data, "config": config, "recipes": recipes}[args.command](args, comm)


def data(args: argparse.Namespace, comm) -> int:
    from mpigls.interop import fetch

    say = print if comm.is_root else (lambda m: None)
    fetch.ensure(comm, args.name, args.root, mirror=args.mirror, say=say)
    say(f"{args.name} ready in {args.root}: use --set data.name={args.name} --set data.root={args.root}")
    return 0


def config(args: argparse.Namespace, comm) -> int:
    from mpigls import config as config_mod

    if comm.is_root:
        rows = config_mod.describe()
        if args.markdown:
            print("| key | default | meaning |\n|---|---|---|")
            print("\n".join(f"| `{k}` | `{d}` | {h} |" for k, d, h in rows))
        else:
            print("\n".join(f"{k:28s} {d:18s} {h}" for k, d, h in rows))
    return 0


def recipes(args: argparse.Namespace, comm) -> int:
    from mpigls import recipes as recipes_mod

    kind = recipes_mod.JOBS if args.jobs else recipes_mod.RECIPES
    if args.action != "list" and not args.name:
        raise ValueError(f"mpigls recipes {args.action} needs a NAME; `{kind.list_command}` lists them")
    if args.action == "copy":  # every rank checks the name (one error everywhere), rank 0 writes
        recipes_mod.path(args.name, kind)
        if comm.is_root:
            print(f"wrote {recipes_mod.copy(args.name, args.dir, kind, force=args.force)}")
        return 0
    if not comm.is_root:
        return 0
    if args.action == "show":
        print(recipes_mod.path(args.name, kind).read_text(encoding="utf-8"), end="")
    elif args.action == "path":
        print(recipes_mod.path(args.name, kind))
    else:
        print(recipes_mod.listing(kind))
    return 0
