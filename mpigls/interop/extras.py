"""Optional dependencies: import one by name, or fail with a message naming the extra to install.

Every integration with outside tools (ONNX, TensorBoard, Weights & Biases) lives behind an extra
of ``pyproject.toml`` so that a plain ``pip install mpigls`` stays small. ``require`` is the one
place that turns a missing package into a user error: ``MissingExtraError`` is an ImportError and
a ValueError, so the command line reports it as one paragraph with exit code 2.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtraError", "require"]

# extra -> the packages it installs (pyproject.toml [project.optional-dependencies])
EXTRAS = {
    "onnx": ("onnx", "onnxruntime"),
    "tensorboard": ("tensorboard",),
    "wandb": ("wandb",),
}


class MissingExtraError(ImportError, ValueError):
    """An optional package is not installed; the message names the extra that installs it."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` (e.g. "onnx") or raise MissingExtraError naming ``pip install mpigls[extra]``.

    ``feature`` says what needed it, e.g. "mpigls export --onnx".
    """
    if extra not in EXTRAS:
        raise KeyError(f"unknown extra {extra!r}; known: {sorted(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{feature} needs the optional package {module!r}, which is not installed "
            f"({type(exc).__name__}: {exc}); install it with: pip install 'mpigls[{extra}]'"
        ) from exc
