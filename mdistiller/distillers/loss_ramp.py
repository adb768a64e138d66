"""The loss-weight ramp of the KD++ family: chosen loss terms multiplied by min(1, e / LOSS_RAMP.EPOCHS).

The KD++ paper says "linear warmup for the first 20 epochs" (5 on ImageNet); the authors' code ramps the
*weight of the distillation term*, not the learning rate, with the 0-based epoch e: the first epoch trains
without the term at all (factor 0), the second at 1/20, ..., full weight from the 21st epoch. Which terms are
ramped differs by method and dataset, so each method states its default (`Distiller.ramped_terms`: KD's "kd",
DKD's "dkd", DIST's "dist", ReviewKD's "reviewkd", ...) and LOSS_RAMP.TERMS may name others (DKD++ on ImageNet
ramps "dkd" and "dino"). The factor is constant within an epoch, as theirs is.

mdistiller's own DKD and ReviewKD ramps (DKD.WARMUP, REVIEWKD.WARMUP_EPOCHS) are a different schedule - a
1-based epoch, min(epoch / W, 1), so the first epoch already has 1/W - and stay as they are for the mdistiller
recipes; ramping a term with both is refused.
"""

from ..utils.errors import ConfigError
from .losses import LossTerm


def warmup_factor(epoch, epochs):
    """mdistiller's own ramp of a term (DKD.WARMUP, REVIEWKD.WARMUP_EPOCHS): min(epoch / epochs, 1) for the 1-based
    `epoch`, 1 when `epochs` is 0."""
    return min(epoch / epochs, 1.0) if epochs > 0 else 1.0


def ramp_factor(epochs, epoch):
    """min(1, (epoch - 1) / epochs) for the 1-based `epoch` the trainer passes; 1 when the ramp is off."""
    if epochs <= 0:
        return 1.0
    return min(1.0, (epoch - 1) / epochs)


def ramped_term_names(cfg, method):
    """The loss terms LOSS_RAMP covers for `method` (a Distiller class): LOSS_RAMP.TERMS, or the method's own."""
    names = list(cfg.LOSS_RAMP.TERMS)
    return tuple(names) if names else tuple(getattr(method, "ramped_terms", ()))


def validate_loss_ramp(cfg, method):
    """ConfigErrors for LOSS_RAMP against the method `method` will build."""
    r = cfg.LOSS_RAMP
    if r.EPOCHS < 0:
        raise ConfigError(f"config key LOSS_RAMP.EPOCHS: must be >= 0 epochs (0 = off), got {r.EPOCHS}")
    if r.EPOCHS == 0:
        return
    names = ramped_term_names(cfg, method)
    if not names:
        raise ConfigError(f"config key LOSS_RAMP.EPOCHS: {cfg.DISTILLER.TYPE} has no distillation term to ramp by "
                          "default; name the terms in LOSS_RAMP.TERMS or set LOSS_RAMP.EPOCHS 0")
    for key, term in getattr(method, "own_ramp_keys", {}).items():
        section, _, leaf = key.partition(".")
        if term in names and cfg[section][leaf] > 0:
            raise ConfigError(f"config key LOSS_RAMP.EPOCHS: the '{term}' term would be ramped twice, by LOSS_RAMP "
                              f"and by {key} ({cfg[section][leaf]}); set {key} 0 for the KD++ ramp, or "
                              "LOSS_RAMP.EPOCHS 0 for mdistiller's")


def apply_loss_ramp(terms, names, factor):
    """`terms` with each named term's value multiplied by `factor`; a name the method does not return is an error
    (a misspelt LOSS_RAMP.TERMS must not silently ramp nothing)."""
    missing = [n for n in names if n not in terms]
    if missing:
        raise ConfigError(f"config key LOSS_RAMP.TERMS: this method returns no loss term {', '.join(missing)}; "
                          f"its terms are {', '.join(terms)}")
    if factor == 1.0:
        return terms
    out = dict(terms)
    for n in names:
        out[n] = LossTerm(factor * terms[n].value, terms[n].kind)
    return out


class LossRamp:
    """The ramp of one run: `ramp(terms, epoch)` applies it for the 1-based `epoch`."""

    def __init__(self, *, epochs, names):
        self.epochs, self.names = int(epochs), tuple(names)

    @classmethod
    def from_config(cls, cfg, method):
        """The keyword arguments of the run's ramp for `method` (a Distiller class)."""
        return {"epochs": cfg.LOSS_RAMP.EPOCHS, "names": ramped_term_names(cfg, method)}

    @classmethod
    def build(cls, cfg, method):
        """The run's ramp for `method`, or None when LOSS_RAMP is off."""
        return cls(**cls.from_config(cfg, method)) if cfg.LOSS_RAMP.EPOCHS > 0 else None

    def __call__(self, terms, epoch):
        return apply_loss_ramp(terms, self.names, ramp_factor(self.epochs, epoch))
