"""Adopting finished runs of another study whose settings are identical, instead of training them again.

Two studies often share rows: the same PGD warm start, the same baseline. ``adopt(study, paths,
source, source_paths)`` copies every finished run of ``source`` into ``study`` when the run it
would stand for is not finished (nor started) there and:

- the two resolved configs are equal, once both are read with today's defaults (keys added to the
  config since the source ran take their defaults) and leaving out ``model.init_from``, the path of
  the warm start;
- the warm start matches too: a run without ``after`` adopts a source run without one, a run with
  ``after`` adopts a source run whose warm start was adopted as its own (so the chain of networks
  is the same, not only the settings);
- both studies evaluate finished runs the same way (their ``evaluation`` sections are equal, and a
  record that says how it was evaluated says the same).

Every record of ``source`` is read with its checksum first: a damaged or edited one stops the
adoption (``RecordError``) before anything is copied.

The run directory is copied (checkpoints included: later stages start from them) and the record is
rewritten for the adopting study (study, run id, row, configuration, warm start, resolved config),
keeping the source's commit, cost, θ hash and evaluations, with ``adopted_from: {study, run}``
saying where it came from, and sealed with a new checksum (its identity: the adopting run's id,
config, evaluation and the θ hash of its warm start). Nothing is trained or evaluated; an adopted
run is finished.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable

from mpigls import config as config_mod
from mpigls.run import rundir
from mpigls.studies import records, runner

__all__ = ["adopt"]

_IGNORED = {"model.init_from"}


def _settings(values: dict) -> dict:
    """A config's settings read with today's defaults, without the warm start's path."""
    flat = config_mod.flatten(config_mod.to_dict(config_mod.from_dict(values)))
    return {k: v for k, v in flat.items() if k not in _IGNORED}


def _source_run(run_id: str, adopted: dict[str, str], paths: runner.Paths, source: runner.Study) -> str | None:
    """The source run that run ``run_id`` of the adopting study was adopted from (now or earlier), if any."""
    if run_id in adopted:
        return adopted[run_id]
    rec = runner.read_record(paths.record_of(run_id)) or {}
    origin = rec.get("adopted_from")
    return origin.get("run") if isinstance(origin, dict) and origin.get("study") == source.name else None


def adopt(
    study: runner.Study,
    paths: runner.Paths,
    source: runner.Study,
    source_paths: runner.Paths,
    *,
    log: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Adopt ``source``'s finished runs into ``study`` (see the module docstring). Returns
    {adopted run id: source run id}."""
    log = log or (lambda msg: print(msg, flush=True))
    if study.evaluation != source.evaluation:
        raise runner.StudyError(
            f"study {study.name} evaluates runs with {study.evaluation}, {source.name} with {source.evaluation}: "
            "their records are not comparable, so no run can be adopted"
        )
    candidates = []  # (settings, record) of every finished source run
    for rec in runner.read_records(source_paths):
        try:
            candidates.append((_settings(rec["config"]), rec))
        except (KeyError, TypeError, config_mod.ConfigError):
            continue  # a record whose config no longer reads cannot be compared
    runs = runner.expand(study)  # stage order: warm starts before the runs that need them
    needed = {r.after for r in runs if r.after}
    adopted: dict[str, str] = {}
    for run in runs:
        if runner.run_state(run, paths) != "not started" or paths.run_dir(run).exists():
            continue
        cfg = runner.resolved_config(run, paths)
        want = _settings(config_mod.to_dict(cfg))
        for have, rec in candidates:
            if have != want or rec.get("evaluation", run.evaluation) != run.evaluation:
                continue
            if run.after is None and rec.get("after") is not None:
                continue
            if run.after is not None and _source_run(run.after, adopted, paths, source) != rec.get("after"):
                continue
            src_dir = source_paths.runs / rec["run"]
            if run.id in needed and not (src_dir / "latest.h5").is_file():
                log(
                    f"[study] {run.id}: {source.name}'s {rec['run']} matches, but a warm start needs its checkpoint, "
                    f"and {src_dir / 'latest.h5'} is missing"
                )
                continue
            if src_dir.is_dir():
                shutil.copytree(src_dir, paths.run_dir(run), ignore=shutil.ignore_patterns(runner.LOCK_FILE))
            record = dict(rec)
            dep = runner.read_record(paths.record_of(run.after)) if run.after is not None else None
            record.update(
                study=study.name,
                run=run.id,
                row=run.row,
                group=run.group,
                configuration=run.configuration,
                seed=run.seed,
                after=run.after,
                config=config_mod.to_dict(cfg),
                evaluation=run.evaluation,
                warm_start_theta_sha256=dep.get("theta_sha256") if dep is not None else None,
                adopted_from={"study": source.name, "run": rec["run"]},
            )
            paths.results.mkdir(parents=True, exist_ok=True)
            rundir.write_json(paths.record(run), records.seal(record))
            adopted[run.id] = rec["run"]
            log(f"[study] {run.id}: adopted {source.name}'s {rec['run']} (same settings)")
            break
    return adopted
