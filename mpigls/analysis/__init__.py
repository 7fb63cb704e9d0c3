"""Analysing runs: runs as data (``runs``: ``load_run``, ``load_runs``), the result tables of
``mpigls report`` (``report``), bound tightness over radii (``tightness``), the plots
(``plotting``) and a checkpoint's network as a torch module (``networks``: ``load_network``).

The run and network API is re-exported here: ``from mpigls.analysis import load_run, load_network``.
"""

from mpigls.analysis.networks import load_network, save_state_dict
from mpigls.analysis.runs import CERT_FILE_GLOBS, Run, load_run, load_runs, normalise_result, read_certifications

__all__ = [
    "CERT_FILE_GLOBS",
    "Run",
    "load_network",
    "load_run",
    "load_runs",
    "normalise_result",
    "read_certifications",
    "save_state_dict",
]
