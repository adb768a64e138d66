"""Configs as flat {"SECTION.KEY": value} dicts: how a saved config.yaml is compared with another config (resume,
run grouping), where a key the saved file lacks takes its default."""

import yaml

from .defaults import get_cfg_defaults


def flatten(tree, prefix=""):
    """{"A.B.C": value} of a nested mapping (a loaded YAML or a dumped CfgNode)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def default_values():
    """Every key of the defaults (component sections included), flat."""
    return flatten(yaml.safe_load(get_cfg_defaults().dump()))
