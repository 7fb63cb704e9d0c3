"""Studies: a grid of training runs (optimizer x bound x hyperparameters x seed) described in one YAML
file, run resumably in parallel processes or as a SLURM array (``runner``, ``cli``), aggregated over
seeds with the configuration chosen on the validation split (``report``), and the diagnostics of a GLS
run that does not improve: PGPE's gradient agreement and the smoothed loss (``diagnose``)."""
