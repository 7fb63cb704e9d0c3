"""Print the digits paradox table from the stored per-sample certification results.

python tools/paradox_table.py runs/paradox [--json table.json]
Reads OUT/<row>/certify.json (written by `mpigls certify --results`) for the rows of tools/paradox.sh.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROWS = [
    ("grad-ibp", "GRAD + IBP"),
    ("grad-deeppoly", "GRAD + DeepPoly"),
    ("pgpe-deeppoly", "PGPE + DeepPoly"),
    ("rgs-deeppoly", "RGS + DeepPoly"),
]


def table(out: Path) -> list[dict]:
    rows = []
    for key, label in ROWS:
        path = out / key / "certify.json"
        if not path.exists():
            rows.append({"run": label, "missing": str(path)})
            continue
        s = json.loads(path.read_text())["summary"]
        rows.append(
            {
                "run": label,
                "natural": s["natural"],
                "pgd": s["adversarial"],
                "ibp": s.get("certified/ibp"),
                "deeppoly": s.get("certified/deeppoly"),
                "union": s["certified"],
                "verified": s.get("verified"),
                "unknown": s.get("unknown"),
                "falsified": s.get("falsified"),
                "n": s["num_examples"],
                "eps": s["eps"],
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = table(Path(args.out))

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    print(
        "| run | natural | PGD | certified (IBP) | certified (DeepPoly) | certified (union) | verified (complete) | unknown |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "missing" in r:
            print(f"| {r['run']} | not run ({r['missing']} missing) |||||||")
        else:
            print(
                f"| {r['run']} | {pct(r['natural'])} | {pct(r['pgd'])} | {pct(r['ibp'])} | {pct(r['deeppoly'])} | "
                f"{pct(r['union'])} | {pct(r['verified'])} | {r['unknown']} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
