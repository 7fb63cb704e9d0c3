"""Progress of long work (``mpigls.parallel.progress``): what, done/total, rate and ETA in a log, quiet
off rank 0 and when turned off, and never a change in the numbers of the work it reports on."""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch

from mpigls import parallel
from mpigls.evaluation import certify
from mpigls.nn import models
from mpigls.parallel import progress


class _Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _progress(total=10, every_s=30.0, **kw):
    clock, lines = _Clock(), []
    p = progress.Progress("job", total, unit="examples", every_s=every_s, say=lines.append, clock=clock, **kw)
    return p, clock, lines


def test_log_lines_give_done_total_rate_and_eta():
    p, clock, lines = _progress()
    clock.t += 10
    p.update(2)  # 10 s since the start: not yet a line (every 30 s)
    assert lines == []
    clock.t += 30
    p.update(2)  # 4 of 10 in 40 s: 0.1 per second, 6 left -> 60 s
    assert lines == ["job: 4/10 examples (40%), 0.1 examples/s, ETA 1m00s"]
    assert p.eta() == pytest.approx(60.0)
    clock.t += 5
    p.update(6)  # complete: the last line, with the total time
    assert lines[-1] == "job: 10/10 examples (100%) in 45s, 0.222 examples/s"
    p.close()
    assert len(lines) == 2  # closing again writes nothing more


def test_work_cut_short_writes_no_completion_line_and_overcounting_is_capped():
    p, clock, lines = _progress(every_s=1.0)
    clock.t += 2
    p.update(3)
    p.close()
    assert lines == ["job: 3/10 examples (30%), 1.5 examples/s, ETA 5s"]
    q, clock, lines = _progress(total=2)
    q.update(5)
    assert q.done == 2 and lines == ["job: 2/2 examples (100%) in 0s, 0 examples/s"]


def test_quiet_off_rank_zero_and_when_turned_off():
    lines: list[str] = []

    class Rank1:
        is_root = False

    for p in (
        progress.for_comm(Rank1(), "job", 3, say=lines.append),
        progress.for_comm(None, "job", 3, quiet=True, say=lines.append),
        progress.Progress("job", 3, say=lines.append, environ={progress.ENV: "off"}),
    ):
        with p:
            p.update(3)
    assert lines == []
    with pytest.raises(ValueError, match=progress.ENV):
        progress.Progress("job", 3, environ={progress.ENV: "soon"})
    assert progress.Progress("job", 3, environ={progress.ENV: "5"}).every_s == 5.0


def test_a_terminal_gets_a_bar_a_log_gets_lines():
    tty = io.StringIO()
    tty.isatty = lambda: True  # type: ignore[method-assign]
    with progress.Progress("job", 4, stream=tty) as p:
        p.update(4)
    assert "job" in tty.getvalue() and "4/4" in tty.getvalue()  # tqdm's bar
    log = io.StringIO()
    with progress.Progress("job", 4, stream=log) as p:
        p.update(4)
    assert log.getvalue().startswith("job: 4/4 items (100%) in")


def test_durations():
    assert [progress.format_duration(s) for s in (4.4, 65, 7300, float("inf"))] == ["4s", "1m05s", "2h01m", "?"]


def test_certify_reports_progress_and_its_numbers_do_not_change(capsys):
    """Progress on or off, over 1 or 2 ranks: the same per-sample results; rank 0 reports its share."""
    with models.private_rng(0):
        model = models.build("mlp-tiny", (1, 4, 4), 3)
    theta = models.flat_params(model)
    x, y = torch.rand(9, 1, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2] * 3)
    kw = dict(eps=0.05, methods=["ibp"], batch_size=2, pgd_steps=3, verify=True, verify_time_limit=None)
    kw |= dict(verify_max_domains=20)
    quiet = certify.certify(copy.deepcopy(model), theta, x, y, **kw)[1]
    assert capsys.readouterr().err == ""
    loud = certify.certify(copy.deepcopy(model), theta, x, y, progress=True, **kw)[1]
    assert "certify --verify: 9/9 examples (100%) in" in capsys.readouterr().err
    two = parallel.run_threaded(
        lambda c: certify.certify(copy.deepcopy(model), theta, x, y, comm=c, progress=True, **kw), 2
    )
    err = capsys.readouterr().err
    assert err.count("certify --verify:") == 1 and "certify --verify: 6/6 examples" in err  # rank 0: blocks 0-2
    drop = "verify/time_s"
    for other in (loud, two[0][1]):
        assert {k: v for k, v in other.items() if k != drop} == {k: v for k, v in quiet.items() if k != drop}


def test_landscape_and_tightness_report_progress_without_changing_their_numbers(capsys):
    import numpy as np

    from mpigls.analysis import tightness
    from mpigls.evaluation import landscape

    with models.private_rng(0):
        model = models.build("mlp-tiny", (1, 4, 4), 3)
    theta = models.flat_params(model)
    x, y = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2] * 2)
    direction = torch.ones_like(theta) / theta.numel() ** 0.5
    args = (model, x, y, 0.05, direction, [-0.1, 0.0, 0.1], [1e-2], ["ibp"], 4)
    quiet = landscape.landscape(*args, chunk_size=5)
    assert capsys.readouterr().err == ""
    loud = landscape.landscape(*args, chunk_size=5, progress=True)
    assert "landscape: 15/15 losses (100%) in" in capsys.readouterr().err  # 3 steps x (1 + 4 draws)
    for key in ("original", "smoothed_mean", "smoothed_ci"):
        np.testing.assert_array_equal(loud[key], quiet[key])
    radii = [0.0, 0.05, 0.1]
    quiet_t = tightness.tightness(model, theta, x, y, radii, ["ibp"], batch_size=4)
    loud_t = tightness.tightness(model, theta, x, y, radii, ["ibp"], batch_size=4, progress=True)
    assert "tightness: 3/3 radii (100%) in" in capsys.readouterr().err
    assert loud_t["methods"] == quiet_t["methods"]


# ----------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    from mpigls import cli

    from conftest import tiny_overrides

    out = tmp_path_factory.mktemp("progress") / "run"
    sets = sum((["--set", s] for s in tiny_overrides(**{"data.num_test": 8})), [])
    assert cli.main(["train", "--out", str(out), "--max-generations", "0", *sets]) == 0
    return str(out / "latest.h5")


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["certify", "{ckpt}", "--verify", "--max-domains", "3", "--num-test", "6"], "certify --verify: 6/6 examples"),
        (
            ["landscape", "{ckpt}", "--out", "{tmp}/l.png", "--sigmas", "1e-2", "--methods", "ibp"]
            + ["--num-samples", "2", "--num-points", "3", "--batch-size", "4"],
            "landscape: 9/9 losses",
        ),
        (
            ["tightness", "{ckpt}", "--out", "{tmp}/t.png", "--methods", "ibp", "--num-radii", "2"],
            "tightness: 2/2 radii",
        ),
        (
            ["diagnose", "{ckpt}", "--popsizes", "4", "--sigmas", "1e-2", "--repeats", "1"]
            + ["--reference-samples", "2", "--num-examples", "4"],
            r"diagnose: (\d+)/\1 losses",
        ),
    ],
    ids=["certify", "landscape", "tightness", "diagnose"],
)
def test_each_long_command_writes_progress_lines_into_a_log(checkpoint_file, tmp_path, capsys, argv, line):
    from mpigls import cli

    capsys.readouterr()
    assert cli.main([a.format(ckpt=checkpoint_file, tmp=tmp_path) for a in argv]) == 0
    err = capsys.readouterr().err
    assert re.search(line + r" \(100%\) in", err), err
