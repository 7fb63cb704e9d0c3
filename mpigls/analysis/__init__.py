"""Analysing runs: runs as data (``runs``: ``load_run``, ``load_runs``), the result tables of
``mpigls report`` (``report``), bound tightness over radii (``tightness``) and the plots
(``plotting``).

The run API is re-exported here: ``from mpigls.analysis import load_run``.
"""

from mpigls.analysis.runs import CERT_FILE_GLOBS, Run, load_run, load_runs, normalise_result, read_certifications

__all__ = ["CERT_FILE_GLOBS", "Run", "load_run", "load_runs", "normalise_result", "read_certifications"]
