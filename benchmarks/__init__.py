"""The benchmarks of mpigls: scripts run as ``python -m benchmarks.<name>``, each writing a JSON record.

``benchmarks.common`` holds what they share: interleaved timing of named peers (median, range,
paired ratios), peak memory and the record (commit, machine, torch version, date, command,
parameters, results). ``python -m benchmarks.make_results`` turns records into the dated tables
under ``benchmarks/results/``. See docs/benchmarks.md.
"""
