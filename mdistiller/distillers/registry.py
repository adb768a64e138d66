"""DISTILLER.TYPE -> Distiller subclass, where every teacher-based method X also answers to "X++".

"X++" is X plus the dino term of KD++ (plus_plus.py). Writing one ++ file per method would have to be repeated
for every method anyone adds, so the registry derives the class on first request instead: a method file only
registers X, and `get("X++")` builds (once, then cached) a subclass of X that adds the term. A name registered
explicitly always wins over a derived one, so a method that needs a hand-written ++ variant can still have it.
"""

from ..utils.errors import ConfigError
from ..utils.registry import Registry

SUFFIX = "++"


class DistillerRegistry(Registry):
    def __init__(self, kind):
        super().__init__(kind)
        self._derived = {}

    @staticmethod
    def supports_plus_plus(cls):
        """The dino term needs teacher class means, so methods without a teacher (NONE) have no ++ variant."""
        return bool(getattr(cls, "needs_teacher", False)) and not getattr(cls, "is_plus_plus", False)

    def _derived_base(self, name):
        """The registered name X that "X++" derives from, or None."""
        if not isinstance(name, str) or not name.endswith(SUFFIX) or name in self._items:
            return None
        base = name[: -len(SUFFIX)]
        if base in self._items and self.supports_plus_plus(self._items[base]):
            return base
        return None

    def get(self, name, key_hint=None):
        if name in self._items:
            return self._items[name]
        base = self._derived_base(name)
        if base is None:
            where = f"{key_hint} " if key_hint else ""
            why = ""
            if isinstance(name, str) and name.endswith(SUFFIX) and name[: -len(SUFFIX)] in self._items:
                why = f" ({name[:-len(SUFFIX)]} trains without a teacher, so it has no ++ variant)"
            raise ConfigError(f"{where}unknown {self.kind} '{name}'{why}; available: {', '.join(self.names())}")
        cls = self._derived.get(name)
        if cls is None or cls.base_method is not self._items[base]:
            from .plus_plus import make_plus_plus  # here: plus_plus imports this module

            cls = self._derived[name] = make_plus_plus(self._items[base])
        return cls

    def meta(self, name):
        base = self._derived_base(name)
        return super().meta(base if base is not None else name)

    def names(self):
        derived = [n + SUFFIX for n, c in self._items.items()
                   if self.supports_plus_plus(c) and n + SUFFIX not in self._items]
        return sorted(list(self._items) + derived)

    def __contains__(self, name):
        return name in self._items or self._derived_base(name) is not None


DISTILLER_REGISTRY = DistillerRegistry("distiller")
