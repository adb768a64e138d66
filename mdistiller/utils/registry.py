"""Name -> component registries, so that adding a model, dataset, distiller or trainer is one new file.

A component registers itself with a decorator; configs refer to it by name. Lookups of unknown names raise a
`ConfigError` that lists what is available, so a typo in a config becomes a one-line message.
"""

import contextlib

from .errors import ConfigError


class Registry:
    def __init__(self, kind):
        self.kind = kind
        self._items = {}
        self._meta = {}

    def register(self, name=None, **meta):
        """Decorator: `@REG.register()` uses the object's __name__; `@REG.register("x", key=v)` stores metadata."""

        def deco(obj):
            key = name or obj.__name__
            if key in self._items and self._items[key] is not obj:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._items[key] = obj
            self._meta[key] = dict(meta)
            return obj

        return deco

    @contextlib.contextmanager
    def override(self, name, obj):
        """Temporarily register `obj` under `name` (replacing what is there): for tools and tests that substitute a
        component, e.g. tools/benchmark.py serving synthetic images under a real dataset's name."""
        had, old, old_meta = name in self._items, self._items.get(name), self._meta.get(name)
        self._items[name], self._meta[name] = obj, {}
        try:
            yield obj
        finally:
            if had:
                self._items[name], self._meta[name] = old, old_meta
            else:
                del self._items[name], self._meta[name]

    def get(self, name, key_hint=None):
        if name not in self._items:
            where = f"{key_hint} " if key_hint else ""
            raise ConfigError(
                f"{where}unknown {self.kind} '{name}'; available: {', '.join(sorted(self._items)) or '(none)'}"
            )
        return self._items[name]

    def meta(self, name):
        self.get(name)
        return self._meta[name]

    def names(self):
        return sorted(self._items)

    def __contains__(self, name):
        return name in self._items

    def __iter__(self):
        return iter(self.names())
