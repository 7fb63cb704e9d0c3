"""The rank processes of an ``mpiexec`` job that a test started, found by the process tree and the
executable (this interpreter's), never by matching a name or a path in command lines: the checkout may
live in a folder of any name, ``mpigls`` included, and the launcher's helpers (hydra_pmi_proxy) run from
the same virtual environment."""

from __future__ import annotations

import os
import sys

RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK")


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    return children


def _exe(pid: int) -> str | None:
    try:
        return os.path.realpath(f"/proc/{pid}/exe")
    except OSError:
        return None


def _rank(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)
    except OSError:
        return sys.maxsize
    for var in RANK_VARS:
        if var.encode() in env:
            return int(env[var.encode()])
    return sys.maxsize


def rank_pids(launcher: int) -> list[int]:
    """The PIDs of the Python processes below ``launcher`` (the topmost ones: a rank's own children are
    not ranks), in rank order."""
    python, children = os.path.realpath(sys.executable), _children()
    found, todo = [], list(children.get(launcher, []))
    while todo:
        pid = todo.pop()
        if _exe(pid) == python:
            found.append(pid)
        else:
            todo += children.get(pid, [])
    return sorted(found, key=lambda p: (_rank(p), p))
