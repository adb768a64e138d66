"""Configs as flat {"SECTION.KEY": value} dicts: how a saved config.yaml is compared with another config (resume,
run grouping), where a key the saved file lacks takes its default."""

import yaml

from .defaults import canonical_key, get_cfg_defaults, renamed_keys


def flatten(tree, prefix=""):
    """{"A.B.C": value} of a nested mapping (a loaded YAML or a dumped CfgNode)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def saved_values(tree):
    """A saved config (config.yaml's mapping) flat, its renamed keys under their new names."""
    renamed = renamed_keys()
    return {canonical_key(k, renamed)[0]: v for k, v in flatten(tree).items()}


def default_values():
    """Every key of the defaults (component sections included), flat."""
    return flatten(yaml.safe_load(get_cfg_defaults().dump()))
