"""Detection loss terms and the methods composed of them: a method (DISTILLER.TYPE under TASK detection) is the
detector's four losses plus the registered terms it names, exactly as a classification "X++" is X plus the dino
term. The maths is the classification methods' (kd_loss, dkd_loss, dino_loss, hcl_loss) applied to the box head
and the FPN (rcnn_distill.py, review.py).

A new method is one file: a term class registered in DETECTION_TERM_REGISTRY (a module taking the step's
`DetectionStep`, built `from_config`) and a `register_method(NAME, term, ...)` line. Every method with a teacher
also answers to "NAME++": the same terms plus "dino" (KD++'s ND on the box features). A step sums its terms in
the order they were registered, whatever order a method lists them in.
"""

import torch
import torch.nn as nn

from ..config.registry import Registry
from ..utils.errors import ConfigError
from .models import BOX_FEATURE_DIM, NUM_CLASSES
from .rcnn_distill import dkd_term, dino_term, kd_term
from .review import FPNReview, reviewkd_term

#: term name -> nn.Module class: `term(step) -> LossTerm`, built with `cls(**cls.from_config(cfg))`
DETECTION_TERM_REGISTRY = Registry("detection loss term", sections=True)
#: method name (DISTILLER.TYPE under TASK detection) -> the names of the terms it adds to the detector's losses
DETECTION_METHOD_REGISTRY = Registry("detection method")
PLUS_PLUS = "++"


def register_method(name, *terms):
    """A detection method: DISTILLER.TYPE `name` adds `terms` (registered term names) to the detector's losses."""
    DETECTION_METHOD_REGISTRY.register(name)(tuple(terms))


def method_terms(name):
    """The terms DISTILLER.TYPE `name` adds; "X++" is X's terms and "dino" for any X with terms."""
    reg = DETECTION_METHOD_REGISTRY
    if name in reg:
        return reg.get(name)
    base = name[:-len(PLUS_PLUS)] if name.endswith(PLUS_PLUS) else None
    if base in reg and reg.get(base) and "dino" not in reg.get(base):
        return reg.get(base) + ("dino",)
    raise ConfigError(f"config key DISTILLER.TYPE: TASK detection has the methods {', '.join(method_names())}; "
                      f"got '{name}'")


def method_names():
    reg = DETECTION_METHOD_REGISTRY
    derived = [n + PLUS_PLUS for n in reg.names()
               if reg.get(n) and "dino" not in reg.get(n) and n + PLUS_PLUS not in reg]
    return sorted(reg.names() + derived)


@DETECTION_TERM_REGISTRY.register("kd")
class BoxKD(nn.Module):
    """KD on the 81-way box logits of the student's sampled proposals (KD++ detection: T 1)."""

    def __init__(self, *, weight=1.0, temperature=1.0):
        super().__init__()
        self.weight, self.temperature = weight, temperature

    @classmethod
    def from_config(cls, cfg):
        return {"weight": cfg.DETECTION.KD.WEIGHT, "temperature": cfg.DETECTION.KD.T}

    def forward(self, step):
        return kd_term(step, self.temperature, self.weight)


@DETECTION_TERM_REGISTRY.register("dkd")
class BoxDKD(nn.Module):
    """DKD on the box logits, the proposals' assigned labels as targets (DKD appendix: alpha 1, beta 0.25, T 1)."""

    def __init__(self, *, alpha=1.0, beta=0.25, temperature=1.0):
        super().__init__()
        self.alpha, self.beta, self.temperature = alpha, beta, temperature

    @classmethod
    def from_config(cls, cfg):
        d = cfg.DETECTION.DKD
        return {"alpha": d.ALPHA, "beta": d.BETA, "temperature": d.T}

    def forward(self, step):
        return dkd_term(step, self.alpha, self.beta, self.temperature)


@DETECTION_TERM_REGISTRY.register("dino")
class BoxDino(nn.Module):
    """KD++'s dino (ND) term on the 1024-d box-head features; the teacher class means (81 x 1024, our label
    order) are set before the first step (the task's prepare) and saved with the method's state."""

    needs_class_means = True

    def __init__(self, *, weight=1.0, num_classes=NUM_CLASSES, dim=BOX_FEATURE_DIM):
        super().__init__()
        self.weight = weight
        self.register_buffer("class_means", torch.zeros(num_classes, dim))

    @classmethod
    def from_config(cls, cfg):
        return {"weight": cfg.DETECTION.DINO.WEIGHT}

    def forward(self, step):
        return dino_term(step, self.class_means, self.weight)


@DETECTION_TERM_REGISTRY.register("reviewkd")
class FPNReviewKD(nn.Module):
    """ReviewKD's HCL between the fused student FPN levels (a learnable ABF per level) and the teacher's."""

    def __init__(self, *, weight=1.0):
        super().__init__()
        self.weight = weight
        self.review = FPNReview()

    @classmethod
    def from_config(cls, cfg):
        return {"weight": cfg.DETECTION.REVIEWKD.WEIGHT}

    def forward(self, step):
        return reviewkd_term(step, self.review, self.weight)


# KD++ detection (kdpp_recipes.md 3.1) is KD++: KD (T 1) + dino on the box head; ReviewKD++ is HCL on the FPN +
# dino, no KD; both come from the "++" rule.
register_method("NONE")  # the detector alone: baselines and teachers
register_method("KD", "kd")
register_method("DKD", "dkd")
register_method("REVIEWKD", "reviewkd")
register_method("REVIEWKD_DKD", "reviewkd", "dkd")  # mdistiller's ReviewKD+DKD
