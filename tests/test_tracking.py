"""TensorBoard and Weights & Biases (offline) receive what metrics.jsonl receives; resume continues the run."""

import json
import struct
import sys
from pathlib import Path

import pytest

from mpigls import config
from mpigls.interop import extras, trackers
from mpigls.run import monitor, train

from conftest import tiny_overrides


def _wandb_records(path: Path) -> list:
    """The protobuf records of a W&B transaction log (``run-<id>.wandb``): a 7-byte header
    (":W&B", magic, version), then LevelDB-log records (crc32c, little-endian length, type:
    1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", raw[:7]
    records, pos, pending = [], 7, b""
    block = 32 * 1024
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack_from("<HB", raw, pos + 4)
        data = raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            records.append(rec)
    return records


def _history(run_dir: Path) -> tuple[dict[int, dict], dict, set[str]]:
    """(step -> logged values, config, run ids) of all offline W&B runs under run_dir/wandb."""
    steps: dict[int, dict] = {}
    cfg: dict = {}
    ids = set()
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for rec in _wandb_records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                steps[int(row["_step"])] = row
            elif kind == "run":
                ids.add(rec.run.run_id)
                cfg.update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
            elif kind == "config":
                cfg.update({u.key: json.loads(u.value_json) for u in rec.config.update})
    return steps, cfg, ids


def _cfg(**extra):
    return config.load_config(None, tiny_overrides(**{"train.epochs": 1, "eval.every": 4, "eval.num_val": 16, **extra}))


@pytest.mark.slow
def test_tensorboard_and_wandb_offline_receive_the_metrics_log_and_resume_continues(tmp_path):
    pytest.importorskip("tensorboard", reason="needs the tensorboard extra")
    pytest.importorskip("wandb", reason="needs the wandb extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(**{"track.tensorboard": True, "track.wandb": True, "track.wandb_project": "test"})
    out, said = tmp_path / "run", []
    train.train(cfg, out, max_generations=3, log=said.append)
    run_id = json.loads((out / trackers.STATE_FILE).read_text())["wandb_run_id"]
    # a kill after generation 3 that lost its checkpoint: the resume re-runs generation 3
    for name in ("ckpt_00000003.h5", "latest.h5"):
        (out / name).unlink()
    train.train(cfg, out, log=said.append)
    assert not [m for m in said if "warning" in m], said
    records, _ = monitor.read_metrics_log(out / monitor.METRICS_FILE)
    assert [r["generation"] for r in records] == list(range(1, 9))

    acc = EventAccumulator(str(out / trackers.TENSORBOARD_DIR), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    loss = acc.Scalars("loss/mean")
    assert [e.step for e in loss] == list(range(1, 9))  # the re-run generation 3 appears once
    for event, rec in zip(loss, records):
        assert event.value == pytest.approx(rec["loss/mean"], rel=1e-6)  # float32 in the event file
    assert [e.step for e in acc.Scalars("val/natural")] == [4, 8]
    assert "pgpe/sigma_mean" in acc.Tags()["scalars"] and "time/generation_s" in acc.Tags()["scalars"]
    config_text = [t for t in acc.Tags()["tensors"] if t.startswith("config")]
    assert config_text, acc.Tags()

    steps, wb_cfg, ids = _history(out)
    assert ids == {run_id}  # one run, in two offline pieces
    assert len(list(out.glob("wandb/offline-run-*"))) == 2
    assert sorted(steps) == list(range(1, 9))
    for rec in records:
        row = steps[rec["generation"]]
        assert row["loss/mean"] == pytest.approx(rec["loss/mean"], rel=1e-12)
        assert row["generation"] == rec["generation"]
    assert steps[8]["val/natural"] == pytest.approx(records[-1]["val/natural"])
    assert wb_cfg["optimizer"]["popsize"] == 10 and wb_cfg["track"]["wandb"] is True  # the run's config


def test_trackers_are_off_by_default_and_missing_packages_name_the_extra(tmp_path, monkeypatch):
    cfg = _cfg()
    assert not cfg.track.tensorboard and not cfg.track.wandb
    train.train(cfg, tmp_path / "plain", max_generations=1, log=lambda m: None)
    assert not (tmp_path / "plain" / trackers.TENSORBOARD_DIR).exists()
    assert not (tmp_path / "plain" / trackers.WANDB_DIR).exists()
    for key, module in (("track.tensorboard", "tensorboard"), ("track.wandb", "wandb")):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)
            with pytest.raises(extras.MissingExtraError, match=rf"pip install 'mpigls\[{module}\]'"):
                train.train(_cfg(**{key: True}), tmp_path / module, max_generations=1, log=lambda m: None)


def test_a_failing_tracker_is_disabled_with_a_warning_and_training_goes_on():
    said = []

    class Broken:
        closed = False

        def log(self, generation, metrics):
            raise OSError("disk full")

        def close(self):
            Broken.closed = True

    class Good:
        def __init__(self):
            self.seen = []

        def log(self, generation, metrics):
            self.seen.append(generation)

        def close(self):
            pass

    good = Good()
    sinks = trackers.Trackers({"broken": Broken(), "good": good}, said.append)
    sinks.log(1, {"loss/mean": 1.0})
    sinks.log(2, {"loss/mean": 0.5})
    assert good.seen == [1, 2] and Broken.closed and list(sinks.sinks) == ["good"]
    assert len(said) == 1 and "broken tracking disabled (OSError: disk full)" in said[0]


def test_track_config_is_validated_and_does_not_count_as_a_change():
    with pytest.raises(config.ConfigError, match="track.wandb_mode must be one of"):
        _cfg(**{"track.wandb_mode": "cloud"})
    a, b = config.to_dict(_cfg()), config.to_dict(_cfg(**{"track.tensorboard": True}))
    assert config.changed_keys(a, b) == {}


def test_only_rank0_writes_tensorboard_events(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="needs the tensorboard extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mpigls import parallel

    monkeypatch.setattr(parallel.StopSignal, "install", lambda self: self)  # signal handlers: main thread only
    cfg = _cfg(**{"track.tensorboard": True, "eval.every": 0})
    parallel.run_threaded(lambda comm: train.train(cfg, tmp_path, comm, max_generations=2, log=lambda m: None), 2)
    assert len(list((tmp_path / trackers.TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 1
    acc = EventAccumulator(str(tmp_path / trackers.TENSORBOARD_DIR))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss/mean")] == [1, 2]
