"""Moved to ``mpigls.dist.signals`` (``dist.StoppableBlocks``); this name stays only until
``train.py`` (rewritten on another branch) imports it from there. Delete it then."""
from __future__ import annotations

from .dist.signals import StoppableBlocks

__all__ = ["StoppableBlocks"]
