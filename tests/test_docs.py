"""The documentation is usable as shipped: every relative link resolves, every ``mpigls`` subcommand
and script README names exists, and no text in the repository speaks of its own history or of paths
outside the repository."""

import argparse
import re
import subprocess
from pathlib import Path

import pytest

from mpigls import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
SKIP_DIRS = {
    ".git",
    ".venv",
    ".hypothesis",
    ".ruff_cache",
    ".mypy_cache",
    "__pycache__",
    "runs",
    "bench-out",
    ".device",
}
TEXT_SUFFIXES = {".py", ".md", ".sh", ".sbatch", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".json", ""}
# Diary wording and places a user of the repository does not have. Built from parts so that this
# file does not match itself.
FORBIDDEN = re.compile(
    "|".join(
        [
            "this " + "round",
            "last " + "round",
            "next " + "round",
            "this " + "session",
            r"\b[Ii]ssue #?\d+\b",
            "shared" + "/gpu",
            "earlier " + "today",
            "under " + "load",
            "DESIGN" + r"\.md",
            "STYLE" + r"\.md",
            "/wo" + "rk/",
            r"\.\./sha" + "red",
        ]
    )
)


def _without_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def _anchors(path: Path) -> set[str]:
    out = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def _links(path: Path) -> list[str]:
    return [m.group(1) for m in re.finditer(r"\]\(([^)\s]+)\)", _without_code(path.read_text(encoding="utf-8")))]


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for link in _links(page):
        if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_readme_names_only_real_subcommands_and_scripts():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    subcommands = set(sub.choices)
    code = " ".join(re.findall(r"```.*?```", text, flags=re.S) + re.findall(r"`[^`\n]+`", text))
    named = set(re.findall(r"\bmpigls (\w[\w-]*)", code))
    assert named, "README names no mpigls subcommand"
    assert named <= subcommands, f"README names unknown subcommands {sorted(named - subcommands)}"
    paths = set(re.findall(r"\b((?:tools|jobs|configs)/[\w./-]*\w)", text))
    assert paths, "README names no script or config"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"README names files that do not exist: {missing}"


def _text_files():
    """The repository's files: what git tracks plus what it would add (not ignored); every file under
    the root except the skipped folders when this is not a git checkout."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        paths = [ROOT / p for p in listed]
    except (OSError, subprocess.CalledProcessError):
        paths = sorted(ROOT.rglob("*"))
    for path in paths:
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        if path.is_file() and path.suffix in TEXT_SUFFIXES and path != Path(__file__).resolve():
            yield path, rel


def test_no_history_or_outside_paths_in_the_repository():
    hits = []
    for path, rel in _text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{rel}:{number}: {line.strip()[:100]}")
    assert not hits, "diary wording or a path outside the repository:\n" + "\n".join(hits)


# ----------------------------------------------------------------------------- config keys and commands

_SPANS = re.compile(r"```.*?```|`[^`\n]+`", re.S)
# dotted names in the docs that start like a config section but are files or attributes
NOT_CONFIG = {"data.py", "eval.json", "model.state_dict"}


def _code_spans(page: Path) -> list[str]:
    return _SPANS.findall(page.read_text(encoding="utf-8"))


def _config_keys() -> set[str]:
    from mpigls import config

    return {key for key, _, _ in config.describe()}


def test_every_config_key_the_docs_name_exists():
    """Every ``section.key`` in a code span of the docs is a config key (``bound.options.<name>``:
    any option), and every YAML block made of config sections holds only config keys."""
    import yaml

    keys = _config_keys()
    sections = sorted({k.split(".")[0] for k in keys})
    dotted = re.compile(r"(?<![\w./-])(" + "|".join(sections) + r")\.([a-z_][a-z0-9_]*)(?!\w)")  # KEY: a placeholder
    unknown, named = [], 0
    for page in DOCS:
        for span in _code_spans(page):
            for m in dotted.finditer(span):
                key = m.group(0)
                named += 1
                if key not in keys and key not in NOT_CONFIG:
                    unknown.append(f"{page.relative_to(ROOT)}: {key}")
            if span.startswith("```yaml"):
                values = yaml.safe_load(span.strip("`")[4:])
                if isinstance(values, dict) and values and set(values) <= set(sections):
                    for section, body in values.items():
                        for key in body or {}:
                            if f"{section}.{key}" not in keys:
                                unknown.append(f"{page.relative_to(ROOT)}: {section}.{key} (YAML block)")
    assert named > 50, f"only {named} config keys found in the docs: the pattern no longer matches"
    assert not unknown, "the docs name config keys that do not exist:\n" + "\n".join(unknown)


def _documented_commands() -> dict[tuple[str, ...], str]:
    """``mpigls COMMAND [SUBCOMMAND]`` in the docs' code spans -> the first page naming it."""
    pattern = re.compile(r"(?<![\w./-])mpigls ([a-z][\w-]*)(?: ([a-z][a-z-]*)(?![\w./]))?")
    found: dict[tuple[str, ...], str] = {}
    for page in DOCS:
        for span in _code_spans(page):
            for m in pattern.finditer(span):
                found.setdefault(tuple(g for g in m.groups() if g), str(page.relative_to(ROOT)))
    return found


def test_every_documented_command_runs_with_help(capsys):
    """Each ``mpigls COMMAND [SUBCOMMAND]`` the docs show answers ``--help`` with exit 0, through the
    installed ``mpigls`` entry point (a following word that is an argument, not a subcommand, is
    accepted before ``--help`` too)."""
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="mpigls")
    main = script.load()
    commands = _documented_commands()
    assert {("train",), ("certify",), ("study", "run")} <= set(commands), sorted(commands)
    failed = []
    for words, page in sorted(commands.items()):
        try:
            code = main([*words, "--help"])
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        if code not in (0, None) or "usage: mpigls" not in out.out:
            failed.append(f"{page}: mpigls {' '.join(words)} --help -> {code}: {out.err.strip()[-200:]}")
    assert not failed, "\n".join(failed)


def test_the_recipe_cost_table_is_the_records():
    """docs/guide/paper.md's cost table is exactly what its benchmark record gives (numbers are never
    copied by hand)."""
    from benchmarks import bench_recipes, common

    text = (ROOT / "docs" / "guide" / "paper.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- generated: python -m benchmarks\.bench_recipes --table (\S+) -->\n(.*?)<!-- end", text, re.S)
    assert m, "docs/guide/paper.md has no generated cost table"
    record = common.load_record(ROOT / m.group(1))
    assert m.group(2) == bench_recipes.table(record)
    recipes = {p.stem for p in (ROOT / "configs" / "paper").glob("*.yaml")}
    assert {r["recipe"] for r in record["results"]["rows"]} == recipes  # every recipe, and only those
