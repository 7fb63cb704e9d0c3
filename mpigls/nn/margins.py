"""The margin specification shared by the bound engine, the losses and the attacks.

For an example of label y among K classes, the margins are m_i = z_y - z_i over the other
classes i != y in ascending order: a (B, K-1) layout that every relaxation's lower bounds, the
robust loss and the margin attack agree on. ``other_classes`` builds that index once.

Shapes: B batch, K classes.
"""

from __future__ import annotations

import torch

__all__ = ["other_classes", "margins"]


def other_classes(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B,) labels -> (B, K-1) long: the classes i != y of each example, ascending."""
    others = torch.arange(num_classes - 1, device=y.device).unsqueeze(0)
    return others + (others >= y.unsqueeze(1)).long()


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - z_i for i != y ascending: (..., B, K) -> (..., B, K-1)."""
    k = logits.shape[-1]
    others = other_classes(y, k)
    true = logits.gather(-1, y.view(-1, 1).expand(*logits.shape[:-1], 1))
    return true - logits.gather(-1, others.expand(*logits.shape[:-1], k - 1))
