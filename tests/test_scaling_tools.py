"""benchmarks/scaling_model.py formulas and benchmarks/scaling.py's merge (no MPI runs here)."""

import dataclasses
import json
import math

import pytest

from benchmarks import scaling, scaling_model as sm

NET = sm.Network(latency_s=2e-6, bandwidth_Bps=25e9, pcie_Bps=25e9)
TERMS = sm.Terms(t_noise=1e-8, t_sum=2e-9, t_apply=5e-9, t_ckpt=1e-9)


def test_collective_formulas():
    assert sm.allreduce_s(1, 1e6, NET) == 0 and sm.allgather_s(1, 256, NET) == 0
    # 8 ranks, 16 MB: Rabenseifner latency 2*3*a beats the ring's 2*7*a; bandwidth 2*(7/8)*bytes/b
    assert sm.allreduce_s(8, 16e6, NET) == pytest.approx(6 * 2e-6 + 2 * 7 / 8 * 16e6 / 25e9)
    # the bandwidth term saturates at 2 * bytes / b: doubling the ranks barely changes it
    assert sm.allreduce_s(1024, 16e6, NET) < 1.01 * 2 * 16e6 / 25e9 + 2 * 10 * 2e-6
    # one all-gather (shapes, then the losses with 3 head floats per rank): 2 log2(N) latencies
    assert sm.allgather_s(4, 256, NET) == pytest.approx(2 * 2 * 2e-6 + 3 / 4 * (8 * 256 + 24 * 4) / 25e9)


def test_t_gen_terms_and_efficiency():
    D, P, c = 100_000, 256, 0.01
    one = sm.t_gen(1, P, D, c, TERMS, NET, K=100)
    assert one["compute"] == pytest.approx(P * c) and one["allreduce"] == 0
    assert one["update"] == pytest.approx(P / 2 * D * 2e-9 + D * 5e-9)
    assert one["total"] == pytest.approx(sum(v for k, v in one.items() if k != "total"))
    prev = math.inf
    for n in (2, 8, 64, 128, 256, 1024):
        t = sm.t_gen(n, P, D, c, TERMS, NET, K=100)
        assert t["compute"] == pytest.approx(2 * math.ceil(P / 2 / n) * c)
        assert one["total"] / (n * t["total"]) <= 1.0
        if n <= P // 2:  # faster while there are pairs to split
            assert t["total"] <= prev
        prev = t["total"]
    # no pair left to split beyond P/2 ranks: nothing gets faster
    assert sm.t_gen(1024, P, D, c, TERMS, NET)["total"] >= sm.t_gen(128, P, D, c, TERMS, NET)["total"]
    assert (
        sm.t_gen(8, P, D, c, TERMS, NET, fixed_sigma=True)["allreduce"] < sm.t_gen(8, P, D, c, TERMS, NET)["allreduce"]
    )


def test_split_minibatch_gives_every_rank_work_and_sums_each_pair_once():
    P, D, c, B = 256, 100_000, 0.01, 512
    gpu = sm.Gpu(call_s=5e-4, fixed_s=1e-3, prefetch=True)
    # the real item split: 128 pairs x 8 chunks = 1024 items, one per rank
    loads = sm.rank_loads(1024, P, sm.Work(B, 1, 8))
    assert len(loads) == 1024 and all(ld["items"] == 1 and ld["noise_pairs"] == 1 for ld in loads)
    assert sum(ld["sum_pairs"] for ld in loads) == P // 2  # each pair summed once (chunk 0's owner)
    assert sum(ld["members"] for ld in loads) == pytest.approx(P)  # every member-example evaluated once
    assert len(sm.rank_loads(1024, P, sm.Work(B, 1, 1))) == 128  # whole pairs: 896 ranks idle
    chunked = sm.t_gen(1024, P, D, c, TERMS, NET, work=sm.Work(B, 1, 8), gpu=gpu)
    whole = sm.t_gen(1024, P, D, c, TERMS, NET, work=sm.Work(B, 1, 1), gpu=gpu)
    # launches are asynchronous: an item costs max(its GPU work, its launches), plus the fixed term
    assert chunked["compute"] == pytest.approx(max(2 * c / 8, 5e-4) + 1e-3)
    tiny = sm.t_gen(1024, P, D, 1e-5, TERMS, NET, work=sm.Work(B, 1, 8), gpu=gpu)
    assert tiny["compute"] == pytest.approx(5e-4 + 1e-3)  # launch-bound item
    assert chunked["total"] < whole["total"]
    # prefetch: the host noise is hidden behind the bounds up to the compute time
    assert chunked["noise"] == pytest.approx(max(0.0, D * 1e-8 - chunked["compute"]))
    assert chunked["allgather"] == sm.allgather_s(1024, 8 * P, NET)
    # the sharded step (what-if) only shrinks the update term
    alt = sm.t_gen(1024, P, D, c, TERMS, NET, work=sm.Work(B, 1, 8), gpu=gpu, sharded=True)
    assert alt["update"] < chunked["update"] and alt["compute"] == chunked["compute"]
    # the device scheme: noise, sums and step from the counted ops at the GPU's rates, no PCIe copy
    dev_terms = dataclasses.replace(
        TERMS,
        dev_noise=sm.OpCount(300, 2e3 * 4 * D),
        dev_sums=sm.OpCount(20, 50 * 4 * D),
        dev_step=sm.OpCount(60, 100 * D),
        pairs=4,
    )
    dev = sm.t_gen(1024, P, D, c, dev_terms, NET, work=sm.Work(B, 1, 8), gpu=gpu, device=True)
    assert dev["h2d"] == 0 and dev["compute"] == chunked["compute"]
    assert dev["noise"] == pytest.approx(300 * gpu.launch_s + 2e3 * D / gpu.hbm_Bps)  # one pair of one block
    step = 60 * gpu.launch_s + 100 * D / gpu.hbm_Bps + 16 * D / NET.pcie_Bps
    sums = 20 * gpu.launch_s + 50 * D / gpu.hbm_Bps  # the rank summing its pair (chunk 0's owner)
    assert dev["update"] == pytest.approx(sums + step)
    assert sm.scale_out_work(1024, P, B) == sm.Work(B, 1, 8)
    assert sm.scale_out_work(8, P, B) == sm.Work(B, 8, 1)


def test_weak_scaling_keeps_the_per_rank_work():
    """P grows with N (whole blocks of 8 pairs): each rank's terms stay, only the collectives grow."""
    D, c, B = 100_000, 0.01, 512
    one = sm.t_gen(1, 32, D, c, TERMS, NET, work=sm.Work(B, 8, 1))
    many = sm.t_gen(1024, 32 * 1024, D, c, TERMS, NET, work=sm.Work(B, 8, 1))
    for k in ("compute", "noise", "update"):
        assert many[k] == pytest.approx(one[k])
    assert many["allgather"] == sm.allgather_s(1024, 32 * 1024, NET)
    assert 0.9 < one["total"] / many["total"] < 1.0


def test_baselines_keep_their_serial_terms():
    D, P = 1_000_000, 256
    # OpenAI-ES: every worker forms the whole update, so P/2 * D * t_sum stays at any N
    assert sm.t_openai_es(1024, P, D, 0.0, TERMS, NET) >= P / 2 * D * 2e-9
    assert sm.t_gen(128, P, D, 0.0, TERMS, NET)["total"] < sm.t_openai_es(128, P, D, 0.0, TERMS, NET)
    # EvoTorch/Ray: the head receives 4 D floats from every actor: grows linearly with N
    assert sm.t_evotorch(1024, P, D, 0.0, TERMS, NET) > 1024 * 16 * D / 25e9


def fake_rows(shas, times):
    return [
        {
            "ranks": n,
            "popsize": 64,
            "D": 10,
            "median_s_per_gen": t,
            "min_s_per_gen": t,
            "max_s_per_gen": t,
            "theta_sha256": s,
        }
        for n, s, t in zip((1, 2, 4), shas, times)
    ]


@pytest.mark.parametrize("same", [True, False])
def test_merge_checks_theta_and_writes_png(tmp_path, same, capsys):
    shas = ["a" * 64] * 3 if same else ["a" * 64, "b" * 64, "a" * 64]
    for i, row in enumerate(fake_rows(shas, [4.0, 2.2, 1.25])):
        (tmp_path / f"p{i}.json").write_text(
            json.dumps({"strong": [row], "weak": [dict(row, popsize=32 * row["ranks"])]})
        )
    args = type("A", (), {"label": "t"})()
    code = scaling.merge(sorted(map(str, tmp_path.glob("p*.json"))), tmp_path / "all", args)
    assert code == (0 if same else 1)
    record = json.loads((tmp_path / "all.json").read_text())
    assert record["benchmark"] == "scaling" and record["params"]["merge"] == sorted(map(str, tmp_path.glob("p*.json")))
    merged = record["results"]
    assert [r["ranks"] for r in merged["strong"]] == [1, 2, 4]
    assert merged["strong"][2]["efficiency"] == pytest.approx(4.0 / (4 * 1.25))
    assert merged["weak"][1]["efficiency"] == pytest.approx(4.0 / 2.2)
    assert (tmp_path / "all.png").read_bytes()[:4] == b"\x89PNG"


def test_repeats_give_paired_efficiency_and_merge_does_not_pair(tmp_path):
    """Interleaved repeats: a point's s/gen is the median of its repeats' medians and its efficiency
    the median of the paired ratios (repeat k against the base's repeat k), with their range; a
    slow repeat that hit both rank counts (machine drift) cancels in its pair. Merged files (separate
    jobs) are not paired. A theta differing in any repeat fails the strong check."""

    def run(n, t, sha="a" * 64):
        return {
            "ranks": n,
            "popsize": 64,
            "D": 10,
            "median_s_per_gen": t,
            "min_s_per_gen": t * 0.9,
            "max_s_per_gen": t * 1.1,
            "wall_s": 1.0,
            "theta_sha256": sha,
        }

    # repeat 1 ran while the machine was twice as slow for both rank counts
    ones = scaling.combine_repeats([run(1, 1.0), run(1, 2.0), run(1, 1.1)])
    twos = scaling.combine_repeats([run(2, 0.55), run(2, 1.1), run(2, 0.5)])
    assert ones["median_s_per_gen"] == 1.1 and ones["repeat_s_per_gen"] == [1.0, 2.0, 1.1]
    assert twos["min_s_per_gen"] == pytest.approx(0.45) and twos["repeats"] == 3
    rows = [ones, twos]
    scaling.summarise(rows, "strong")
    paired = [1.0 / 1.1, 2.0 / 2.2, 1.1 / 1.0]
    assert twos["efficiency"] == pytest.approx(sorted(paired)[1])
    assert twos["efficiency_paired_range"] == pytest.approx([min(paired), max(paired)])
    twos["machine_ceiling"], twos["machine_ceiling_range"] = 0.8, [0.7, 0.9]
    scaling.summarise(rows, "strong")
    assert twos["efficiency_vs_ceiling"] == pytest.approx(sorted(paired)[1] / 0.8)
    unpaired = [dict(ones), dict(twos)]
    scaling.summarise(unpaired, "strong", paired=False)
    assert unpaired[1]["efficiency"] == pytest.approx(1.1 / (2 * 0.55))
    # merge: one file per rank count, a repeat with another theta fails the check
    bad = scaling.combine_repeats([run(2, 0.5), run(2, 0.5, "b" * 64)])
    for i, row in enumerate([ones, bad]):
        (tmp_path / f"p{i}.json").write_text(json.dumps({"strong": [row]}))
    args = type("A", (), {"label": "t"})()
    assert scaling.merge(sorted(map(str, tmp_path.glob("p*.json"))), tmp_path / "all", args) == 1


def test_fixed_overhead_is_the_minibatch_over_pcie_plus_the_syncs():
    net = sm.Network(pcie_Bps=25e9)
    mnist = sm.fixed_overhead_s(512, (1, 28, 28), net, sync_s=20e-6)
    assert mnist == pytest.approx(512 * 784 * 4 / 25e9 + sm.SYNCS_PER_GENERATION * 20e-6)
    assert sm.fixed_overhead_s(512, (3, 32, 32), net) > mnist
