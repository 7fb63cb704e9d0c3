"""Cross-check mpigls's complete verifier against Marabou on exported ONNX + VNN-LIB vnnlib.

    python tools/marabou_check.py CKPT --num-test 8 [--eps E] [--out DIR] [--timeout S]

1. ``mpigls export CKPT --onnx DIR/net.onnx --vnnlib DIR/vnnlib`` (batch 1, as VNN-COMP tools read it);
2. ``mpigls certify CKPT --verify`` on the same samples (per-sample results JSON in DIR);
3. Marabou (``maraboupy``, ``pip install maraboupy``) reads the ONNX file and each property file with
   its own parsers and answers ``unsat`` (no counterexample: robust) or ``sat`` (with one);
4. prints one row per sample and exits 1 if the two verifiers contradict each other (verified vs sat,
   falsified vs unsat); an answer of ``unknown`` / a Marabou timeout is reported, not a contradiction.
   Every Marabou counterexample is re-checked with onnxruntime and must lie in the property's box.

Marabou reads networks without input normalisation (its ONNX reader has neither Div nor per-channel
Sub): digits and MNIST networks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def marabou_solve(onnx_path: Path, prop_path: Path, timeout: float) -> tuple[str, np.ndarray | None, float]:
    """Marabou's answer for one property: ("unsat" | "sat" | other, the sat input or None, seconds)."""
    from maraboupy import Marabou

    t0 = time.perf_counter()
    network = Marabou.read_onnx(str(onnx_path))
    options = Marabou.createOptions(verbosity=0, timeoutInSeconds=int(max(1, timeout)))
    exit_code, values, _ = network.solve(propertyFilename=str(prop_path), options=options, verbose=False)
    cex = None
    if exit_code == "sat":
        inputs = np.asarray(network.inputVars[0]).reshape(-1)
        cex = np.array([values[int(v)] for v in inputs], dtype=np.float64)
    return exit_code, cex, time.perf_counter() - t0


def check(ckpt: str, out: Path, num_test: int, eps: float | None, timeout: float, say=print) -> dict:
    """Run the comparison; returns {"rows": [...], "contradictions": int, "agree": int, "eps": eps}."""
    from mpigls import cli
    from mpigls.interop import onnx_io, vnnlib

    out.mkdir(parents=True, exist_ok=True)
    onnx_path, vnn_dir, results = out / "net.onnx", out / "vnnlib", out / "certify.json"
    common = ["--num-test", str(num_test)] + ([] if eps is None else ["--eps", str(eps)])
    if cli.main(["export", ckpt, "--onnx", str(onnx_path), "--vnnlib", str(vnn_dir), *common]) != 0:
        raise SystemExit("mpigls export failed")
    argv = ["certify", ckpt, "--verify", "--results", str(results), "--time-limit", str(timeout), *common]
    t0 = time.perf_counter()
    if cli.main(argv) != 0:
        raise SystemExit("mpigls certify --verify failed")
    mpigls_s = time.perf_counter() - t0
    samples = json.loads(results.read_text())
    ours, eps_used = samples["samples"]["verified"], samples["eps"]
    rows, contradictions, agree, marabou_s = [], 0, 0, 0.0
    props = sorted(vnn_dir.glob("prop_*.vnnlib"), key=lambda p: int(p.stem.split("_")[1]))
    for i, prop_path in enumerate(props):
        prop = vnnlib.parse(prop_path.read_text())
        answer, cex, seconds = marabou_solve(onnx_path, prop_path, timeout)
        marabou_s += seconds
        note = ""
        if cex is not None:  # Marabou's counterexample: inside the box, and another class scores >= the label
            inside = bool(((prop.lower - 1e-9 <= cex) & (cex <= prop.upper + 1e-9)).all())
            z = onnx_io.onnx_forward(onnx_path, cex.astype(np.float32).reshape(1, *_in_shape(onnx_path)))[0]
            margin = float(z[prop.label] - np.delete(z, prop.label).max())
            note = f"cex in box: {inside}, onnxruntime margin {margin:.3g}"
        expected = {"verified": "unsat", "falsified": "sat"}.get(ours[i])
        if expected is not None and answer in ("sat", "unsat"):
            if answer == expected:
                agree += 1
            else:
                contradictions += 1
        rows.append({"sample": i, "label": prop.label, "mpigls": ours[i], "marabou": answer, "seconds": seconds})
        say(f"sample {i:3d}  label {prop.label}  mpigls {ours[i]:9s}  marabou {answer:7s}  {seconds:6.2f}s  {note}")
    say(
        f"eps={eps_used}: {agree} of {len(rows)} samples decided alike, {contradictions} contradictions "
        f"(mpigls certify --verify {mpigls_s:.1f}s, Marabou {marabou_s:.1f}s in total)"
    )
    return {"rows": rows, "contradictions": contradictions, "agree": agree, "eps": eps_used}


def _in_shape(onnx_path: Path) -> tuple[int, ...]:
    import onnx

    dims = onnx.load(str(onnx_path)).graph.input[0].type.tensor_type.shape.dim
    return tuple(int(d.dim_value) for d in dims[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--num-test", type=int, default=8)
    parser.add_argument("--eps", type=float, default=None, help="default: the checkpoint config's bound.eps")
    parser.add_argument("--out", default="marabou-check", help="directory for net.onnx, vnnlib/, certify.json")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per sample, for each verifier")
    args = parser.parse_args(argv)
    res = check(args.checkpoint, Path(args.out), args.num_test, args.eps, args.timeout)
    return 1 if res["contradictions"] else 0


if __name__ == "__main__":
    sys.exit(main())
