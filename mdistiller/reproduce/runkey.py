"""What makes two runs repetitions of one experiment: their resolved configs minus the keys that do not change
what is trained, plus the process count. Runs of one table cell are averaged only when these agree.

The run name does not carry the epochs, the training subset or the number of processes, so runs that share a
directory-name pattern can be different experiments; the key tells them apart. Keys left out: the seed (what
repetitions vary), names and tags, where data and logs live, the device spec, loader workers, evaluation batch
size, logging and checkpoint frequencies, timeouts, and speed switches that compute the same thing
(channels-last, compile, inference mode, deterministic kernels).
"""

import hashlib
import json

import yaml

NON_SEMANTIC = {
    "EXPERIMENT.NAME", "EXPERIMENT.TAG", "EXPERIMENT.SEED", "EXPERIMENT.DEVICE", "EXPERIMENT.DETERMINISTIC",
    "DATASET.ROOT", "DATASET.DOWNLOAD", "DATASET.NUM_WORKERS", "DATASET.TEST.BATCH_SIZE",
    "DISTRIBUTED.TIMEOUT_MIN", "DISTRIBUTED.FIND_UNUSED_PARAMETERS",
    "SOLVER.DOT.LOG_COSINE",
    "SPEED.CHANNELS_LAST", "SPEED.COMPILE", "SPEED.TEACHER_INFERENCE_MODE",
}
NON_SEMANTIC_SECTIONS = ("LOG.",)  # prefix, checkpoint and TensorBoard frequencies, monitors: logging only
WORLD_SIZE = "world_size"  # the key of the process count, from summary.json


def flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def default_values():
    from ..config import get_cfg_defaults

    return flatten(yaml.safe_load(get_cfg_defaults().dump()))


def semantic(config_text, defaults=None, ignore=()):
    """{key: value} of a config.yaml's text that decide what is trained, less the keys in `ignore`. Keys the saved
    config lacks (added to mdistiller after the run) take their defaults: the run had the behaviour the default
    describes."""
    flat = dict(defaults if defaults is not None else default_values())
    flat.update(flatten(yaml.safe_load(config_text) or {}))
    return {k: v for k, v in flat.items()
            if k not in NON_SEMANTIC and k not in ignore and not k.startswith(NON_SEMANTIC_SECTIONS)}


def run_key(sem, world_size):
    """Short hash of a run's semantic config and process count."""
    blob = json.dumps({**sem, WORLD_SIZE: world_size}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _show(v):
    return "(absent)" if v is _ABSENT else json.dumps(v) if isinstance(v, str) else str(v)


_ABSENT = object()


def differences(configs, limit=6):
    """'KEY a vs b, ...' over the keys whose values differ among `configs` (dicts), at most `limit` keys."""
    keys = sorted({k for c in configs for k in c})
    parts = []
    for k in keys:
        values = []
        for c in configs:
            v = c.get(k, _ABSENT)
            if v not in values:
                values.append(v)
        if len(values) > 1:
            parts.append(f"{k} " + " vs ".join(_show(v) for v in values))
    more = f", and {len(parts) - limit} more" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more
