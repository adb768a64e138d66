"""DISTILLER.TYPE -> Distiller subclass, where every teacher-based method X also answers to "X++".

"X++" is X with the dino term of KD++ (plus_plus.py) added by the builder: `resolve("X++")` is (X, True) and
`get("X++")` is X itself. No class is derived: the term reads the student and teacher features from X's step
output, so X needs no edit and no hook. A name registered explicitly always wins, so a method that needs a
hand-written ++ variant can still have one.
"""

from ..config.registry import Registry
from ..models import check_model_name
from ..utils.errors import ConfigError
from .loss_ramp import validate_loss_ramp
from .plus_plus import DinoTerm

SUFFIX = "++"


class DistillerRegistry(Registry):
    @staticmethod
    def supports_plus_plus(cls):
        """The dino term needs teacher class means, so methods without a teacher (NONE) have no ++ variant."""
        return bool(getattr(cls, "needs_teacher", False))

    def _plus_plus_base(self, name):
        """The registered name X that "X++" adds the dino term to, or None."""
        if not isinstance(name, str) or not name.endswith(SUFFIX) or name in self._items:
            return None
        base = name[: -len(SUFFIX)]
        if base in self._items and self.supports_plus_plus(self._items[base]):
            return base
        return None

    def resolve(self, name, key_hint=None):
        """(method class, whether the dino term is added) for a DISTILLER.TYPE."""
        if name in self._items:
            return self._items[name], False
        base = self._plus_plus_base(name)
        if base is None:
            where = f"{key_hint} " if key_hint else ""
            why = ""
            if isinstance(name, str) and name.endswith(SUFFIX) and name[: -len(SUFFIX)] in self._items:
                why = f" ({name[:-len(SUFFIX)]} trains without a teacher, so it has no ++ variant)"
            raise ConfigError(f"{where}unknown {self.kind} '{name}'{why}; available: {', '.join(self.names())}")
        return self._items[base], True

    def get(self, name, key_hint=None):
        return self.resolve(name, key_hint)[0]

    def meta(self, name):
        base = self._plus_plus_base(name)
        return super().meta(base if base is not None else name)

    def names(self):
        derived = [n + SUFFIX for n, c in self._items.items()
                   if self.supports_plus_plus(c) and n + SUFFIX not in self._items]
        return sorted(list(self._items) + derived)

    def __contains__(self, name):
        return name in self._items or self._plus_plus_base(name) is not None

    def loads_teacher(self, cfg):
        """Whether the run loads DISTILLER.TEACHER: the methods that distil, and the student alone when the loss
        monitor is asked for its distance to a teacher (LOG.MONITOR_TEACHER)."""
        return bool(self.get(cfg.DISTILLER.TYPE).needs_teacher or cfg.LOG.MONITOR_TEACHER)

    def check_name(self, cfg):
        """The method must exist, and so must the models it builds for the dataset."""
        super().check_name(cfg)
        roles = ["STUDENT"] + (["TEACHER"] if self.loads_teacher(cfg) else [])
        for role in roles:
            check_model_name(cfg.DISTILLER[role], f"DISTILLER.{role}")

    def validate(self, cfg):
        """LOSS_RAMP against the method, the method's own section, and the dino term's for "X++"."""
        method, plus_plus = self.resolve(cfg.DISTILLER.TYPE, "DISTILLER.TYPE")
        validate_loss_ramp(cfg, method)
        method.validate_config(cfg)
        if plus_plus:
            DinoTerm.validate_config(cfg)


DISTILLER_REGISTRY = DistillerRegistry("distiller", key="DISTILLER.TYPE")
