"""The repository keeps its shape: every source file is linted; the package's imports form no cycle and
point down the layers of docs/architecture.md, with ``optim/`` pure maths; no function is over 130 lines.
(The docs' links, commands and wording: tests/test_docs.py.)"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mpigls"


def _tracked(*patterns: str) -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *patterns],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [ROOT / p for p in out if (ROOT / p).is_file()]


# ----------------------------------------------------------------------------- lint covers everything


def test_ruff_lints_every_python_file_of_the_repository():
    """Ruff's default excludes (``dist``, ``build``, ``.venv``, ...) match folders anywhere: no source file
    may fall under one of them unnoticed."""
    pytest.importorskip("ruff")
    shown = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--show-files", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    linted = {Path(line.strip()).resolve() for line in shown.splitlines() if line.strip().endswith(".py")}
    excluded = {"tests/golden"}  # pinned outputs, not code (pyproject: extend-exclude)
    sources = [
        p.resolve()
        for p in _tracked("*.py")
        if not any(p.relative_to(ROOT).as_posix().startswith(e + "/") for e in excluded)
    ]
    assert sources, "no Python files found"
    missing = sorted(str(p.relative_to(ROOT)) for p in sources if p not in linted)
    assert not missing, f"files ruff does not lint (a default exclude matches them?): {missing}"


# ----------------------------------------------------------------------------- the import graph


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The mpigls modules this file imports, at module level or inside functions: ``from pkg import sub``
    depends on the module ``pkg.sub``, ``from pkg import name`` on ``pkg`` (its ``__init__``)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "mpigls":
                continue
            for a in node.names:
                found.add(f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module)
    return found & modules


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(files)) - {name} for name, path in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_package_imports_form_no_cycle():
    graph = _graph()
    assert "mpigls.run.train" in graph and "mpigls.optim.registry" in graph["mpigls.config"]
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


# ----------------------------------------------------------------------------- the layers of the house

# From the bottom up, as docs/architecture.md draws them: a module may import its own layer and the
# layers below, never one above. The longest prefix names a module's layer. The optimizer registry sits
# above parallel/ (it names PGPE's distributed unit, mpigls.parallel.pgpe_unit) and below the config.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("mpigls", "mpigls.files", "mpigls.argtypes", "mpigls.numerics", "mpigls.nn"),
    ("mpigls.bounds",),
    ("mpigls.objectives",),
    ("mpigls.optim",),
    ("mpigls.parallel",),
    ("mpigls.optim.registry",),
    ("mpigls.evaluation",),
    ("mpigls.config", "mpigls.data", "mpigls.recipes"),
    ("mpigls.interop",),
    ("mpigls.run",),
    ("mpigls.analysis",),
    ("mpigls.studies",),
    ("mpigls.commands", "mpigls.cli", "mpigls.__main__"),
)


def _layer(module: str) -> int | None:
    found = [(len(p), i) for i, names in enumerate(LAYERS) for p in names if module == p or module.startswith(p + ".")]
    return max(found)[1] if found else None


def _upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a lower layer to a higher one, as "a -> b (layer i imports layer j)"."""
    bad = []
    for a, deps in sorted(graph.items()):
        for b in sorted(deps):
            la, lb = _layer(a), _layer(b)
            if la is not None and lb is not None and lb > la:
                bad.append(f"{a} -> {b} (layer {la}: {LAYERS[la][0]} imports layer {lb}: {LAYERS[lb][0]})")
    return bad


def _registry_edges() -> set[str]:
    """The modules the optimizer registry names (it imports them on first use)."""
    from mpigls.optim import registry

    where = [w for e in registry.OPTIMIZERS.values() if isinstance(e, registry.Entry) for w in (e.params, e.unit)]
    return {w.partition(":")[0] for w in where}


def test_the_layer_check_finds_an_upward_import():
    assert _upward({"mpigls.bounds.sabr": {"mpigls.objectives.attacks", "mpigls.nn.models"}}) == [
        "mpigls.bounds.sabr -> mpigls.objectives.attacks (layer 1: mpigls.bounds imports layer 2: mpigls.objectives)"
    ]
    assert _layer("mpigls.optim.registry") > _layer("mpigls.parallel.pgpe_unit") > _layer("mpigls.optim.pgpe")


def test_every_module_has_a_layer_and_imports_point_down():
    graph = _graph()
    graph["mpigls.optim.registry"] = graph["mpigls.optim.registry"] | _registry_edges()
    assert "mpigls.parallel.pgpe_unit" in graph["mpigls.optim.registry"]
    homeless = sorted(m for m in graph if _layer(m) is None)
    assert not homeless, f"modules in no layer of LAYERS (add their folder where it belongs): {homeless}"
    bad = _upward(graph)
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------- small functions

MAX_FUNCTION_LINES = 130


def _long_functions(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out.append(f"{path.relative_to(root.parent).as_posix()}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_the_length_check_finds_a_long_function(tmp_path):
    (tmp_path / "pkg").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "pkg" / "m.py").write_text(f"def short():\n    pass\n\n\ndef long():\n{body}\n")
    assert _long_functions(tmp_path / "pkg") == [f"pkg/m.py:5 long ({MAX_FUNCTION_LINES + 1} lines)"]


def test_no_function_of_the_package_is_over_130_lines():
    long = _long_functions(PACKAGE)
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them): {long}"


# what optim/ may import: tensors and maths (and the counter-based noise it draws its perturbations from)
# (importlib: the registry and the package import their submodules on first use)
OPTIM_ALLOWED = {
    "__future__",
    "math",
    "dataclasses",
    "typing",
    "collections",
    "contextlib",
    "copy",
    "importlib",
    "numpy",
    "torch",
}
OPTIM_ALLOWED_MPIGLS = ("mpigls.optim", "mpigls.numerics.noise", "mpigls.numerics.philox", "mpigls.numerics")


def test_optim_imports_no_io_threads_or_communication():
    bad = []
    for path in sorted((PACKAGE / "optim").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
                if node.module in ("mpigls", "mpigls.numerics"):
                    names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                if n.startswith("mpigls"):
                    ok = n.startswith(OPTIM_ALLOWED_MPIGLS)
                else:
                    ok = n.split(".")[0] in OPTIM_ALLOWED
                if not ok:
                    bad.append(f"{path.relative_to(ROOT)}: {n}")
    assert not bad, bad
