"""The ecosystem around mpigls: networks to and from ONNX (``onnx_io``), VNN-LIB robustness
properties for external verifiers (``vnnlib``; ``export`` writes both for a checkpoint), experiment
trackers fed from the metrics log (``trackers``: TensorBoard, Weights & Biases), dataset downloads
(``fetch``) and the optional-package check that names the extra to install (``extras``)."""
