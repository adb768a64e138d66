"""Name -> component registries, so that adding a model, dataset, distiller or update rule is one new file.

A component registers itself with a decorator; configs refer to it by name. A registry that a config key selects
from (`key`, e.g. "DISTILLER.TYPE") is also how the config is checked: the name must be registered, and the chosen
component may check its own settings (a `validate_config(cfg)` classmethod). A component may declare its own
top-level config section (`config=`, a method's hyper-parameters) and which of its keys are loss weights
(`loss_weights=`); registering stores both with the component and changes nothing else: defaults.py assembles the
tree from what the registries hold, so "one file" stays true without the config tree importing any component.
Unknown names raise a `ConfigError` listing what is available.
"""

import contextlib

from ..utils.errors import ConfigError

#: config key -> the Registry that selects from it (config/validate.py walks them). Keyed by the config key, not
#: the kind: a registry made elsewhere (a test's own DistillerRegistry("distiller")) must not replace the real one.
REGISTRIES = {}
#: every registry whose components may declare a config section (a loss term's registry selects by no key)
SECTION_REGISTRIES = []


class Registry:
    def __init__(self, kind, key=None, task="classification", sections=None):
        """`key`: the config key ("SECTION.KEY", or a top-level "KEY") whose value names the component to use, if
        there is one; `task`: the TASK whose configs select from it (None: every task's); `sections`: whether its
        components' declared config sections belong to the default tree (default: when it has a key, so that a
        registry a test makes for itself changes no default)."""
        self.kind, self.key, self.task = kind, key, task
        self._items = {}
        self._meta = {}
        self._sections = {}  # component name -> (section name, CfgNode, loss-weight keys, renamed keys)
        if key is not None:
            if key in REGISTRIES:
                raise ValueError(f"config key {key} already has a {REGISTRIES[key].kind} registry")
            REGISTRIES[key] = self
        if sections or (sections is None and key is not None):
            SECTION_REGISTRIES.append(self)

    def register(self, name=None, config=None, section=None, loss_weights=(), renamed=None, **meta):
        """Decorator: `@REG.register()` uses the object's __name__; `@REG.register("x", key=v)` stores metadata.
        `config`: a CfgNode, the component's own top-level config section `section` (default: the name);
        `loss_weights`: the keys of that section that weight a loss term without ending in WEIGHT (DKD's ALPHA);
        `renamed`: {old key: new key} within the section, for keys that were renamed (old configs keep working)."""

        def deco(obj):
            key = name or obj.__name__
            if key in self._items and self._items[key] is not obj:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._items[key] = obj
            self._meta[key] = dict(meta)
            if config is not None:
                self._sections[key] = (section or key, config, tuple(loss_weights), dict(renamed or {}))
            return obj

        return deco

    def unregister(self, name):
        """Remove a component (a test's or an example's own, when it is done with it)."""
        self._items.pop(name, None)
        self._meta.pop(name, None)
        self._sections.pop(name, None)

    def sections(self):
        """[(section name, CfgNode, loss-weight keys, renamed keys)] its components declare, by component name."""
        return [self._sections[k] for k in sorted(self._sections)]

    @contextlib.contextmanager
    def override(self, name, obj):
        """Temporarily register `obj` under `name` (replacing what is there)."""
        had, old, old_meta = name in self._items, self._items.get(name), self._meta.get(name)
        old_section = self._sections.pop(name, None)
        self._items[name], self._meta[name] = obj, {}
        try:
            yield obj
        finally:
            if had:
                self._items[name], self._meta[name] = old, old_meta
            else:
                del self._items[name], self._meta[name]
            if old_section is not None:
                self._sections[name] = old_section

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

    def in_order(self, names):
        """`names` in the order their components were registered (a fixed order for summing loss terms)."""
        wanted = set(names)
        return [n for n in self._items if n in wanted]

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


def declared_sections():
    """{section name: (CfgNode, loss-weight keys, {old key: new key})} of every component registered where
    sections count, in a fixed order (by section name) whatever the import order was. A name declared by two
    different components is an error: one of them would silently lose its keys."""
    found, owner = {}, {}
    for registry in SECTION_REGISTRIES:
        for section, node, weights, renamed in registry.sections():
            if section in found and found[section][0] is not node:
                raise ValueError(f"config section {section} is declared by {owner[section]} and by a "
                                 f"{registry.kind}")
            found[section], owner[section] = (node, weights, renamed), f"a {registry.kind}"
    return {k: found[k] for k in sorted(found)}
