"""Name -> component registries, so that adding a model, dataset, distiller or update rule is one new file.

A component registers itself with a decorator; configs refer to it by name. A registry that a config key selects
from (`key`, e.g. "DISTILLER.TYPE") is also how the config is checked: the name must be registered, and the chosen
component may check its own settings (a `validate_config(cfg)` classmethod). Registering a component with
`config=` adds its own top-level config section (a method's hyper-parameters), so "one file" stays true without
the config tree importing any component. Unknown names raise a `ConfigError` listing what is available.
"""

import contextlib

from ..utils.errors import ConfigError
from .defaults import register_config_section

#: config key -> the Registry that selects from it (config/validate.py walks them). Keyed by the config key, not
#: the kind: a registry made elsewhere (a test's own DistillerRegistry("distiller")) must not replace the real one.
REGISTRIES = {}


class Registry:
    def __init__(self, kind, key=None, task="classification"):
        """`key`: the config key ("SECTION.KEY", or a top-level "KEY") whose value names the component to use, if
        there is one; `task`: the TASK whose configs select from it (None: every task's)."""
        self.kind, self.key, self.task = kind, key, task
        self._items = {}
        self._meta = {}
        if key is not None:
            if key in REGISTRIES:
                raise ValueError(f"config key {key} already has a {REGISTRIES[key].kind} registry")
            REGISTRIES[key] = self

    def register(self, name=None, config=None, section=None, **meta):
        """Decorator: `@REG.register()` uses the object's __name__; `@REG.register("x", key=v)` stores metadata.
        `config`: a CfgNode registered as the top-level config section `section` (default: the name)."""

        def deco(obj):
            key = name or obj.__name__
            if key in self._items and self._items[key] is not obj:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            if config is not None:
                register_config_section(section or key, config)
            self._items[key] = obj
            self._meta[key] = dict(meta)
            return obj

        return deco

    @contextlib.contextmanager
    def override(self, name, obj):
        """Temporarily register `obj` under `name` (replacing what is there)."""
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

    def selected(self, cfg):
        """The name the config key selects."""
        node = cfg
        for part in self.key.split("."):
            node = node[part]
        return node

    def applies_to(self, cfg):
        """Whether this config selects from this registry (its TASK is the registry's)."""
        return self.task is None or self.task == cfg.get("TASK", "classification")

    def check_name(self, cfg):
        """ConfigError unless the config key names a registered component."""
        name = self.selected(cfg)
        if name not in self:
            raise ConfigError(f"config key {self.key}: unknown {self.kind} '{name}'; allowed: "
                              f"{', '.join(self.names())}")

    def validate(self, cfg):
        """The chosen component's own checks of its settings."""
        check = getattr(self.get(self.selected(cfg), self.key), "validate_config", None)
        if check is not None:
            check(cfg)

    def __contains__(self, name):
        return name in self._items

    def __iter__(self):
        return iter(self.names())


# TASK -> the task (classification in engine/task.py, detection in mdistiller/detection): how its runs are checked
# and built. Made here, first, so that an unknown TASK is the first error and nothing below config is needed.
TASK_REGISTRY = Registry("task", key="TASK", task=None)
