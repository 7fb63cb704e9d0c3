"""Noise-generation options for PGPE, measured side by side (ns per float32 number, and per block).

Options (all keyed by (seed, stream, generation, member) or a block of members):
  numpy-member   numpy Philox-4x64 + SeedSequence per member, float32 ziggurat (mpigls.numerics.noise today)
  numpy-block    one SeedSequence per block of M members, one standard_normal call of M*D
  device         the device scheme (optimizer.noise: device, mpigls.numerics.philox): Philox-4x32-10 in torch
                 int64 ops + AS241 inverse normal in single IEEE float64 steps; the same bits on CPU
                 and GPU. Also counted: its kernels (torch ops) per block and bytes moved per number,
                 what a GPU's time follows (benchmarks/scaling_model.py turns them into GPU estimates)
  table-slice    OpenAI-ES shared noise table: a member's noise is a slice at a hashed offset
                 (a copy only; slices of different members overlap, i.e. correlated noise)
  torch-randn    torch's own CPU generator (reference only: streams differ between CPU and CUDA)

    python -m benchmarks.bench_noise --dims 165850 --block 16 --repeat 3

The options run interleaved, --repeat rounds (median and range; the ratio to numpy-member is the
median of the per-round ratios). Runs on CUDA too (--device cuda); prints a table, writes a record.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from benchmarks import common
from benchmarks.scaling_model import count_ops
from mpigls.numerics import noise


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_record_args(p)
    p.add_argument("--dims", default="165850", help="comma-separated D values (CNN5 = 165850)")
    p.add_argument("--block", type=int, default=16, help="members per block")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--table-size", type=int, default=1 << 25)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = common.sync_for(device)
    members = list(range(args.block))
    table = Table(args.table_size, device)
    rows = []
    for D in (int(d) for d in args.dims.split(",")):
        options = {
            "numpy-member": lambda D=D: noise.noise_block(1, 2, members, D).to(device),
            "numpy-block": lambda D=D: numpy_block(1, 2, members, D).to(device),
            "device": lambda D=D: noise.noise_block(1, 2, members, D, scheme="device", device=device),
            "table-slice": lambda D=D: table.block(1, 2, members, D),
            "torch-randn": lambda D=D: torch.randn((len(members), D), device=device),
        }
        ops = count_ops(options["device"])
        print(
            f"D={D}, block {args.block}: the device scheme runs {ops['ops']} torch ops here ({device.type} chunking), "
            f"{ops['bytes'] / (D * args.block):.0f} bytes moved per number"
        )
        times = common.time_peers(options, args.repeat, sync=sync)
        for name in options:
            t = common.spread(times[name])
            rows.append(
                {
                    "option": name,
                    "D": D,
                    "block": args.block,
                    "device": str(device),
                    "s_per_block": t.median,
                    "s_per_block_range": [t.low, t.high],
                    "ns_per_number": 1e9 * t.median / (D * args.block),
                    "vs_numpy_member": common.ratio_spread(times["numpy-member"], times[name]).median,
                    **({"ops": ops["ops"], "bytes": ops["bytes"]} if name == "device" else {}),
                }
            )
    print(f"{'option':14} {'D':>9} {'s/block':>9} {'ns/number':>10} {'speed vs numpy-member':>22}")
    for r in rows:
        print(
            f"{r['option']:14} {r['D']:9d} {r['s_per_block']:9.4f} {r['ns_per_number']:10.2f} {r['vs_numpy_member']:22.2f}"
        )
    common.write_record("bench_noise", args, {"rows": rows}, args.out, args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
