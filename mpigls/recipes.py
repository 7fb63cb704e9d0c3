"""Built-in recipes: the configs and job scripts that ship with mpigls, found by name.

The repository's ``configs/`` (YAML configs: quickstart, paper rows, digits paradox) and ``jobs/``
(SLURM and mpirun scripts) are the one source. A wheel carries them as ``mpigls/_recipes/`` and
``mpigls/_jobs/`` (setup.py maps the two folders into the package); a source checkout (editable
install or ``PYTHONPATH``) reads them where they lie, next to the package folder.

A recipe's name is its path below ``configs/`` without ``.yaml`` (``quickstart``,
``paper/mnist-0.1-cnn3-deeppoly-pgpe``); a job script's name is its file name (``paper.sh``).
``mpigls train NAME`` takes a file when one exists at NAME, else the recipe of that name.
"""

from __future__ import annotations

import difflib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Kind", "RECIPES", "JOBS", "root", "names", "path", "resolve_config", "describe", "listing", "copy"]


@dataclass(frozen=True)
class Kind:
    """One family of shipped files: where a wheel and a checkout keep it, which suffixes count."""

    label: str  # "recipe" / "job script", for messages
    packaged: str  # folder inside the installed package
    checkout: str  # folder of the source checkout, beside the package folder
    suffixes: tuple[str, ...]
    strip_suffix: bool  # names leave the suffix out (configs) or keep it (scripts)
    list_command: str
    exclude: tuple[str, ...] = ()  # subfolders that hold other files (study files are not train configs)


RECIPES = Kind("recipe", "_recipes", "configs", (".yaml",), True, "mpigls recipes", exclude=("studies",))
JOBS = Kind("job script", "_jobs", "jobs", (".sh", ".sbatch"), False, "mpigls recipes --jobs")
_USE = {RECIPES: "mpigls train NAME --out DIR", JOBS: "mpigls recipes --jobs copy NAME DIR"}


def root(kind: Kind = RECIPES) -> Path:
    """The folder holding ``kind``: the installed package's copy, else the checkout's folder."""
    package = Path(__file__).resolve().parent
    for folder in (package / kind.packaged, package.parent / kind.checkout):
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"no built-in {kind.label}s found: neither {package / kind.packaged} nor {package.parent / kind.checkout} "
        "exists; reinstall mpigls from its wheel or run it from a complete source checkout"
    )


def _name(kind: Kind, rel: Path) -> str:
    text = rel.as_posix()
    return text[: -len(rel.suffix)] if kind.strip_suffix else text


def _files(kind: Kind) -> dict[str, Path]:
    base = root(kind)
    found = {}
    for file in sorted(base.rglob("*")):
        rel = file.relative_to(base)
        hidden = any(part.startswith((".", "_")) for part in rel.parts) or rel.parts[0] in kind.exclude
        if file.is_file() and file.suffix in kind.suffixes and not hidden:
            found[_name(kind, rel)] = file
    return found


def names(kind: Kind = RECIPES) -> list[str]:
    """Every name of ``kind``: top-level files first, then each subfolder's, alphabetically."""
    return sorted(_files(kind), key=lambda n: (n.count("/"), n))


def _close(kind: Kind, name: str) -> list[str]:
    """Names that look like ``name``: the same file name in another folder (``configs/quickstart.yaml``
    -> ``quickstart``, a paper row without ``paper/``), or close spellings."""
    all_names = names(kind)
    name = _key(kind, name)
    leaf = name.rsplit("/", 1)[-1]
    same_leaf = [n for n in all_names if n.rsplit("/", 1)[-1] == leaf]
    return list(dict.fromkeys(same_leaf + difflib.get_close_matches(name, all_names, n=5, cutoff=0.6)))


def _unknown(kind: Kind, name: str, what: str) -> FileNotFoundError:
    close = _close(kind, name)
    hint = f"close names: {', '.join(close)}; " if close else ""
    return FileNotFoundError(f"{what}; {hint}`{kind.list_command}` lists them all")


def _key(kind: Kind, name: str) -> str:
    name = name.replace(os.sep, "/").strip("/")
    if kind.strip_suffix:
        for suffix in kind.suffixes:
            name = name.removesuffix(suffix)
    return name


def path(name: str, kind: Kind = RECIPES) -> Path:
    """The file of the built-in ``name`` (a recipe may be named with or without ``.yaml``)."""
    if not name or not name.strip():
        raise ValueError(f"name a built-in {kind.label}; `{kind.list_command}` lists them")
    found = _files(kind).get(_key(kind, name))
    if found is None:
        raise _unknown(kind, name, f"no built-in {kind.label} is named {name!r}")
    return found


def resolve_config(arg: str) -> str:
    """What ``mpigls train ARG`` reads: ARG itself when something exists there (a file always wins,
    a directory is reported by the config loader), else the built-in recipe named ARG."""
    if Path(arg).exists():
        return arg
    found = _files(RECIPES).get(_key(RECIPES, arg))
    if found is None:
        raise _unknown(RECIPES, arg, f"config file {arg!r} does not exist and no built-in recipe has that name")
    return str(found)


def describe(name: str, kind: Kind = RECIPES, width: int = 80) -> str:
    """The file's opening comment (after a shebang) up to its first full stop, on one line of at most
    ``width`` characters, without the name it may repeat."""
    words: list[str] = []
    for line in path(name, kind).read_text(encoding="utf-8").splitlines():
        if line.startswith("#!"):
            continue
        if not line.startswith("#"):
            break
        words += line.lstrip("#").split()
        if words and words[-1].endswith("."):
            break
    leaf = name.rsplit("/", 1)[-1]
    text = " ".join(words).removeprefix(f"{leaf}:").strip()
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def listing(kind: Kind = RECIPES) -> str:
    """What ``mpigls recipes`` prints: a header line, then one line per name with its description."""
    found = names(kind)
    width = max(map(len, found), default=0)
    head = f"{len(found)} built-in {kind.label}s ({_USE[kind]}; show one: {kind.list_command} show NAME)"
    return "\n".join([head] + [f"  {name:{width}s}  {describe(name, kind)}".rstrip() for name in found])


def copy(name: str, directory: str | os.PathLike, kind: Kind = RECIPES, force: bool = False) -> Path:
    """Write the built-in ``name`` into ``directory`` (created if missing) under its file name, to
    edit; an existing file is kept unless ``force``. Job scripts stay executable."""
    source = path(name, kind)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file, not a directory; name a directory to copy {name!r} into")
    target = directory / source.name
    if target.exists() and not force:
        raise ValueError(f"{target} exists; pass --force to overwrite it or name another directory")
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    if kind is JOBS:
        target.chmod(0o755)
    return target
