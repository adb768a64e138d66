"""Reading configs: defaults <- file(s) <- command-line pairs, with errors a user can act on.

YACS alone rejects `SOLVER.LR 1` (int for a float) and reads `5e-4` in YAML as a string; both are things users
write every day, so values are coerced here by the type of the default, and everything that cannot be coerced
becomes a one-line `ConfigError` naming the key, what it got and what is allowed.
"""

import ast
import difflib
import logging
import os

import yaml
from yacs.config import CfgNode as CN

from ..utils.errors import ConfigError
from .defaults import canonical_key, get_cfg_defaults
from .validate import validate_config

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
# String keys with these defaults are switches (SPEED.CHANNELS_LAST: auto/on/off, SPEED.AMP: auto/off/...): a
# boolean given to them means on/off, whatever values the key's own validation then allows.
_SWITCH_DEFAULTS = {"auto", "on", "off"}


def _type_name(v):
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(type(v), type(v).__name__)


def _coerce(value, default, key):
    """Return `value` converted to the type of `default`, or raise ConfigError."""
    if default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"config key {key}: expected true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, bool):
            raise ConfigError(f"config key {key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key}: expected an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key}: expected a number, got {value!r}")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        if isinstance(value, bool) and default in _SWITCH_DEFAULTS:
            return "on" if value else "off"  # YAML 1.1 reads an unquoted `on` / `off` as a boolean
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key {key}: expected a string, got {value!r}")
    if isinstance(default, (list, tuple)):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and default and not isinstance(
            default[0], str
        ):
            value = [value]  # `SOLVER.LR_DECAY_STAGES 150` means [150]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key}: expected a list, got {value!r}")
        if default:
            value = [_coerce(v, default[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return type(default)(value)
    if type(value) is not type(default):
        raise ConfigError(f"config key {key}: expected {_type_name(default)}, got {value!r}")
    return value


def _unknown_key(node, name, full_key, source):
    choices = [k for k in node.keys()]
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" (did you mean {full_key.rsplit('.', 1)[0] + '.' if '.' in full_key else ''}{close[0]}?)" if close else ""
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else "the top level"
    return ConfigError(
        f"unknown config key {full_key}{' in ' + source if source else ''}{hint}; "
        f"keys allowed in {parent}: {', '.join(sorted(choices))}"
    )


def _notice_renamed(old, new, source):
    logging.getLogger("mdistiller").warning("config key %s%s is now %s: read as that (rename it to silence this)",
                                            old, f" in {source}" if source else "", new)


def merge_mapping(cfg, mapping, source="", prefix=""):
    """Merge a plain dict into `cfg`, checking every key and coercing every value; a renamed key (defaults.py)
    is read under its new name."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source or 'config'}: expected a mapping of keys at {prefix or 'the top level'}")
    for name, value in mapping.items():
        full_key = f"{prefix}{name}"
        new_key, renamed = canonical_key(full_key)
        if renamed and new_key.rsplit(".", 1)[0] == full_key.rsplit(".", 1)[0]:
            _notice_renamed(full_key, new_key, source)
            name, full_key = new_key.rsplit(".", 1)[-1], new_key
        if name not in cfg:
            raise _unknown_key(cfg, str(name), full_key, source)
        default = cfg[name]
        if isinstance(default, CN):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {full_key} is a section; give it keys, not the value {value!r}")
            merge_mapping(default, value, source, full_key + ".")
        else:
            cfg[name] = _coerce(value, default, full_key)


def _yaml_problem(e):
    """One line for a YAML error: where (line and column, 1-based) and what, as yaml's own message has them over
    several lines."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem, context = getattr(e, "problem", None), getattr(e, "context", None)
    what = f"{problem}{f' ({context})' if context else ''}" if problem else str(e).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{what}"


def _read_yaml(path, seen=()):
    if os.path.isdir(path):
        raise ConfigError(f"config file {path} is a directory; pass a YAML file inside it with --cfg")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist; pass an existing file with --cfg")
    if os.path.abspath(path) in seen:
        raise ConfigError(f"config file {path} includes itself through _BASE_")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}): is it a YAML file?") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of config keys")
    base = data.pop("_BASE_", None)
    layers = []
    if base:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        layers = _read_yaml(base_path, seen + (os.path.abspath(path),))
    return layers + [(path, data)]


def parse_value(text):
    """A command-line value: a Python/YAML literal where it is one, else the plain string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def merge_list(cfg, pairs):
    """Merge `[KEY, VALUE, KEY, VALUE, ...]` from the command line."""
    if len(pairs) % 2:
        raise ConfigError(f"command-line overrides must be KEY VALUE pairs; '{pairs[-1]}' has no value")
    for key, text in zip(pairs[0::2], pairs[1::2]):
        new_key, renamed = canonical_key(key)
        if renamed:
            _notice_renamed(key, new_key, "the command line")
        node, parts = cfg, new_key.split(".")
        for i, part in enumerate(parts[:-1]):
            if part not in node or not isinstance(node[part], CN):
                raise _unknown_key(node, part, ".".join(parts[: i + 1]), "the command line")
            node = node[part]
        nested = parse_value(text)
        for part in reversed(parts[1:]):
            nested = {part: nested}
        merge_mapping(cfg, {parts[0]: nested}, "the command line")


def load_config(cfg_file=None, overrides=(), validate=True):
    """defaults <- cfg_file (with its _BASE_ chain) <- overrides; validated and frozen."""
    cfg = get_cfg_defaults()
    if cfg_file:
        for path, data in _read_yaml(cfg_file):
            merge_mapping(cfg, data, path)
    merge_list(cfg, list(overrides))
    if validate:
        validate_config(cfg)
    cfg.freeze()
    return cfg
