"""Noise-generation options for PGPE, measured side by side (ns per float32 number, and per block).

Options (all keyed by (seed, stream, generation, member) or a block of members):
  numpy-member   numpy Philox-4x64 + SeedSequence per member, float32 ziggurat (mpigls.noise today)
  numpy-block    one SeedSequence per block of M members, one standard_normal call of M*D
  torch-philox   Philox-4x32-10 written in torch int64 ops (identical integer bits on CPU and GPU;
                 checked against the Random123 known-answer vectors) + Box-Muller with torch.log /
                 cos / sin (these transcendental kernels are NOT bitwise equal between CPU and CUDA)
  table-slice    OpenAI-ES shared noise table: a member's noise is a slice at a hashed offset
                 (a copy only; slices of different members overlap, i.e. correlated noise)
  torch-randn    torch's own CPU generator (reference only: streams differ between CPU and CUDA)

    python tools/bench_noise.py --dims 165850 --block 16 --repeat 3 --out bench-out/noise.json

Runs on CUDA too when available (--device cuda); prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mpigls import noise  # noqa: E402

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK = 0xFFFFFFFF


def philox4x32(counter: torch.Tensor, key: tuple[int, int], rounds: int = 10) -> torch.Tensor:
    """Philox-4x32 (Salmon et al. 2011) on int64 tensors holding uint32 words: counter (n, 4) -> (n, 4)."""
    c0, c1, c2, c3 = (counter[:, i].clone() for i in range(4))
    k0, k1 = key
    for _ in range(rounds):
        p0 = c0 * M0  # wraps mod 2**64 exactly like uint64: both factors < 2**32
        p1 = c2 * M1
        hi0, lo0 = (p0 >> 32) & MASK, p0 & MASK
        hi1, lo1 = (p1 >> 32) & MASK, p1 & MASK
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
    return torch.stack([c0, c1, c2, c3], dim=1)


def check_philox_kat() -> None:
    """Random123 known-answer tests for philox4x32_10."""
    zero = philox4x32(torch.zeros((1, 4), dtype=torch.int64), (0, 0))
    ones = philox4x32(torch.full((1, 4), MASK, dtype=torch.int64), (MASK, MASK))
    assert [hex(int(v)) for v in zero[0]] == ["0x6627e8d5", "0xe169c58d", "0xbc57ac4c", "0x9b00dbd8"], zero
    assert [hex(int(v)) for v in ones[0]] == ["0x408f276d", "0x41c83b0e", "0xa20bc7c6", "0x6d5451fd"], ones


def torch_philox_normal(seed: int, gen: int, members, num_params: int, device) -> torch.Tensor:
    m = len(members)
    n4 = (num_params + 3) // 4
    idx = torch.arange(n4, device=device, dtype=torch.int64)
    out = torch.empty((m, 4 * n4), dtype=torch.float32, device=device)
    for row, member in enumerate(members):
        ctr = torch.stack(
            [idx & MASK, torch.full_like(idx, member), torch.full_like(idx, gen), torch.zeros_like(idx)], dim=1
        )
        bits = philox4x32(ctr, (seed & MASK, 0))  # (n4, 4) uint32 words
        u = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # (0, 1)
        r = torch.sqrt(-2.0 * torch.log(u[:, 0::2]))
        t = 2 * np.pi * u[:, 1::2]
        out[row].view(n4, 4)[:, 0::2] = r * torch.cos(t)
        out[row].view(n4, 4)[:, 1::2] = r * torch.sin(t)
    return out[:, :num_params]


def numpy_block(seed: int, gen: int, members, num_params: int) -> torch.Tensor:
    rng = noise.numpy_generator(seed, noise.STREAM_PGPE, gen, 1 << 40, int(members[0]))
    return torch.from_numpy(rng.standard_normal((len(members), num_params), dtype=np.float32))


class Table:
    def __init__(self, size: int, device) -> None:
        self.table = torch.from_numpy(noise.numpy_generator(0, 99).standard_normal(size, dtype=np.float32)).to(device)

    def block(self, seed: int, gen: int, members, num_params: int) -> torch.Tensor:
        span = self.table.numel() - num_params
        offs = [int(noise.numpy_generator(seed, gen, int(j)).integers(0, span)) for j in members]
        return torch.stack([self.table[o : o + num_params] for o in offs])


def timed(fn, repeat: int, sync) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", default="165850", help="comma-separated D values (CNN5 = 165850)")
    p.add_argument("--block", type=int, default=16, help="members per block")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--table-size", type=int, default=1 << 25)
    p.add_argument("--out", default="bench-out/noise.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    check_philox_kat()
    members = list(range(args.block))
    table = Table(args.table_size, device)
    rows = []
    for D in (int(d) for d in args.dims.split(",")):
        options = {
            "numpy-member": lambda D=D: noise.noise_block(1, 2, members, D).to(device),
            "numpy-block": lambda D=D: numpy_block(1, 2, members, D).to(device),
            "torch-philox": lambda D=D: torch_philox_normal(1, 2, members, D, device),
            "table-slice": lambda D=D: table.block(1, 2, members, D),
            "torch-randn": lambda D=D: torch.randn((len(members), D), device=device),
        }
        base = None
        for name, fn in options.items():
            t = timed(fn, args.repeat, sync)
            base = base or t
            rows.append(
                {
                    "option": name,
                    "D": D,
                    "block": args.block,
                    "device": str(device),
                    "s_per_block": t,
                    "ns_per_number": 1e9 * t / (D * args.block),
                    "vs_numpy_member": base / t,
                }
            )
    print(f"{'option':14} {'D':>9} {'s/block':>9} {'ns/number':>10} {'speed vs numpy-member':>22}")
    for r in rows:
        print(
            f"{r['option']:14} {r['D']:9d} {r['s_per_block']:9.4f} {r['ns_per_number']:10.2f} {r['vs_numpy_member']:22.2f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "threads": args.threads}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
