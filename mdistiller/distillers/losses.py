"""Loss terms marked by kind, the step output they travel in, and the two losses many methods share.

A distiller returns each of its loss terms marked as a task loss (fits the labels) or a distillation loss (fits
the teacher). The plain SGD update sums them; DOT keeps one momentum buffer per kind, so the mark is part of the
distiller contract rather than a naming convention.
"""

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

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


@dataclass
class StepOutput:
    """What a training forward produced: the student's logits, the loss terms, and what the models computed on
    the way, so that a term added to any method (the dino term of "X++") or the loss monitor reads the features
    and teacher logits of this very forward instead of running the models again or hooking into them."""

    logits: torch.Tensor
    terms: dict
    student_features: Optional[dict] = None
    teacher_logits: Optional[torch.Tensor] = None
    teacher_features: Optional[dict] = None


def ce_term(logits, labels, weight=1.0):
    """weight * cross-entropy, as a task term."""
    return task_loss(weight * F.cross_entropy(logits, labels))


def kd_loss(logits_student, logits_teacher, temperature):
    """T^2 * KL(p_teacher^T || p_student^T), summed over classes, mean over the batch."""
    log_p_s = F.log_softmax(logits_student / temperature, dim=1)
    log_p_t = F.log_softmax(logits_teacher / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def standardize_logits(logits, eps=1e-7):
    """Logit standardization (LSKD, Sun et al., CVPR 2024): each sample's logits minus their mean over classes,
    divided by eps + their standard deviation, so that a softened distribution depends on the logits' relations and
    not on their scale. As the authors' code: the unbiased (n - 1) std, eps added to the std, not to the variance."""
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (eps + std)
