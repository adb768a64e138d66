"""Loss terms marked by kind.

A distiller returns each of its loss terms marked as a task loss (fits the labels) or a distillation loss (fits
the teacher). The vanilla trainer just sums them; the DOT trainer needs the split to keep one momentum buffer per
kind, so the mark is part of the distiller contract rather than a naming convention.
"""

from typing import NamedTuple

import torch

TASK = "task"
DISTILL = "distill"


class LossTerm(NamedTuple):
    value: torch.Tensor
    kind: str


def task_loss(value):
    return LossTerm(value, TASK)


def distill_loss(value):
    return LossTerm(value, DISTILL)


def total_loss(terms, kind=None):
    """Sum of the terms (of one kind if given); None when there are none of that kind."""
    values = [t.value for t in terms.values() if kind is None or t.kind == kind]
    return torch.stack(values).sum() if values else None
