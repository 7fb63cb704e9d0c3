"""Local-robustness properties as VNN-LIB files, and the ``instances.csv`` VNN-COMP tools read.

One property per test sample (x, y) at radius eps: the input box is ``[x - eps, x + eps]``
clipped to the data range [0, 1] per pixel, computed in float64 from the float32 pixels exactly as
``mpigls.evaluation.verify`` builds its box, and written with 17 significant digits (they read back to the
same float64). VNN-LIB states what a *counterexample* satisfies, so the output constraint is the
negated robustness condition: some other class scores at least the label's,
``(or (and (>= Y_j Y_y)) ...)``. A verifier that answers ``unsat`` / ``holds`` proves the sample
robust; a model of the constraints (``sat``) is an adversarial example.

Variables follow the VNN-COMP convention: ``X_i`` is the i-th input in the C-order flattening of
(C, H, W) (the ONNX input of ``mpigls.interop.onnx_io``, batch 1), ``Y_k`` the k-th logit.

``instances.csv``: one line ``onnx,vnnlib,timeout`` per property, paths relative to the CSV's
directory, no header (as in the VNN-COMP benchmark repositories).
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Property", "box", "render", "write_properties", "parse", "INSTANCES_FILE"]

INSTANCES_FILE = "instances.csv"


@dataclass(frozen=True)
class Property:
    """What a VNN-LIB file of this module says: an input box, the label, the number of classes."""

    lower: np.ndarray  # (n,) float64
    upper: np.ndarray  # (n,) float64
    label: int
    num_classes: int


def box(x: np.ndarray, eps: float, data_range: tuple[float, float] = (0.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """The l_inf box of one sample clipped to the data range, float64 (n,) each (as mpigls.evaluation.verify)."""
    flat = np.asarray(x, dtype=np.float32).astype(np.float64).reshape(-1)
    lo, hi = data_range
    return np.clip(flat - eps, lo, hi), np.clip(flat + eps, lo, hi)


def _num(v: float) -> str:
    return repr(float(v))  # shortest repr that reads back to the same float64


def render(x: np.ndarray, label: int, num_classes: int, eps: float, comment: Sequence[str] = ()) -> str:
    """The VNN-LIB text of the robustness property of sample ``x`` (C, H, W) with ``label``."""
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} is outside [0, {num_classes})")
    lower, upper = box(x, eps)
    lines = [f"; {c}" for c in comment]
    lines += [f"(declare-const X_{i} Real)" for i in range(lower.size)]
    lines += [f"(declare-const Y_{k} Real)" for k in range(num_classes)]
    lines.append("; input box: the l_inf ball of radius eps around the sample, clipped to [0, 1]")
    for i, (lo, hi) in enumerate(zip(lower, upper)):
        lines += [f"(assert (<= X_{i} {_num(hi)}))", f"(assert (>= X_{i} {_num(lo)}))"]
    lines.append(f"; unsafe: some class other than {label} scores at least Y_{label}")
    lines.append("(assert (or")
    lines += [f"    (and (>= Y_{k} Y_{label}))" for k in range(num_classes) if k != label]
    lines.append("))")
    return "\n".join(lines) + "\n"


def write_properties(
    out_dir: str | os.PathLike,
    onnx_path: str | os.PathLike,
    xs: np.ndarray,
    ys: np.ndarray,
    num_classes: int,
    eps: float,
    *,
    timeout: float = 60.0,
    indices: Sequence[int] | None = None,
    header: Sequence[str] = (),
    onnx_name: str | None = None,
) -> list[Path]:
    """``out_dir/prop_<index>.vnnlib`` for every sample of (xs (N, C, H, W), ys (N,)) and
    ``out_dir/instances.csv``; returns the property paths. Each file is written whole (temp + rename).
    ``onnx_name``: the network's path as instances.csv gives it (default: ``onnx_path`` relative to
    ``out_dir``; a caller that writes into a staging directory passes the final one)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    indices = list(range(len(ys))) if indices is None else list(indices)
    width = max(1, len(str(max(indices, default=0))))
    paths = []
    for i, x, y in zip(indices, xs, ys):
        path = out / f"prop_{i:0{width}d}.vnnlib"
        text = render(
            np.asarray(x), int(y), num_classes, eps, [*header, f"test sample {i}, label {int(y)}, eps {eps!r}"]
        )
        _write_text(path, text)
        paths.append(path)
    onnx_rel = onnx_name if onnx_name is not None else os.path.relpath(Path(onnx_path).resolve(), out.resolve())
    rows = [[onnx_rel, p.name, f"{timeout:g}"] for p in paths]
    tmp = out / f".tmp-{INSTANCES_FILE}"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    tmp.replace(out / INSTANCES_FILE)
    return paths


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# ----------------------------------------------------------------------------- strict reader

_DECL = re.compile(r"^\(declare-const ([XY])_(\d+) Real\)$")
_BOUND = re.compile(r"^\(assert \((<=|>=) X_(\d+) (\S+)\)\)$")
_DISJ = re.compile(r"^\(and \(>= Y_(\d+) Y_(\d+)\)\)$")


def parse(text: str) -> Property:
    """Read back a property written by ``render`` (and only that shape), strictly: every input has
    exactly one lower and one upper bound, every disjunct names the same label, every other class
    appears once. ValueError on anything else."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(";")]
    n_x = n_y = 0
    lower: dict[int, float] = {}
    upper: dict[int, float] = {}
    disjuncts: list[tuple[int, int]] = []
    it = iter(lines)
    for line in it:
        if m := _DECL.match(line):
            var, idx = m.group(1), int(m.group(2))
            expected = n_x if var == "X" else n_y
            if idx != expected:
                raise ValueError(f"declaration {line!r} out of order (expected {var}_{expected})")
            n_x, n_y = (n_x + 1, n_y) if var == "X" else (n_x, n_y + 1)
        elif m := _BOUND.match(line):
            target = upper if m.group(1) == "<=" else lower
            i = int(m.group(2))
            if i >= n_x or i in target:
                raise ValueError(f"bound {line!r} on an undeclared or already bounded input")
            target[i] = float(m.group(3))
        elif line == "(assert (or":
            for inner in it:
                if inner == "))":
                    break
                if not (d := _DISJ.match(inner)):
                    raise ValueError(f"unexpected disjunct {inner!r}")
                disjuncts.append((int(d.group(1)), int(d.group(2))))
            else:
                raise ValueError("unterminated (assert (or ...")
        else:
            raise ValueError(f"unexpected line {line!r}")
    if set(lower) != set(range(n_x)) or set(upper) != set(range(n_x)):
        raise ValueError("every input X_i needs exactly one lower and one upper bound")
    labels = {y for _, y in disjuncts}
    if len(labels) != 1:
        raise ValueError(f"the disjuncts must all compare against one label, got {sorted(labels)}")
    (label,) = labels
    others = sorted(k for k, _ in disjuncts)
    if others != [k for k in range(n_y) if k != label]:
        raise ValueError(f"the disjuncts must name every class but {label} once, got {others}")
    lo = np.array([lower[i] for i in range(n_x)])
    hi = np.array([upper[i] for i in range(n_x)])
    if (lo > hi).any():
        raise ValueError("an input's lower bound exceeds its upper bound")
    return Property(lo, hi, label, n_y)
