"""Strong-scaling benchmark (kept for old commands): now ``tools/scaling.py --mode strong``.

    python tools/bench_scaling.py --ranks 1,2 --generations 12 --out bench-out/scaling.json \
        --set optimizer.popsize=64 --set bound.method=deeppoly

Every option is passed on to tools/scaling.py (see its --help for weak scaling, the model and PNG).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scaling

if __name__ == "__main__":
    sys.exit(scaling.main(["--mode", "strong", *sys.argv[1:]]))
