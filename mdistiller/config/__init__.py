"""The config tree (defaults.py), how files and command-line pairs merge into it (loader.py), and its checks."""

from .defaults import get_cfg_defaults
from .loader import load_config, merge_list, merge_mapping

__all__ = ["get_cfg_defaults", "load_config", "merge_list", "merge_mapping"]
