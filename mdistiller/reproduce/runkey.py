"""What makes two runs repetitions of one experiment: their resolved configs minus the keys that do not change
what is trained, plus the process count and the teacher's identity. Runs of one table cell are averaged only when
these agree.

The teacher is identified by the SHA-256 of its checkpoint that summary.json records, not by
DISTILLER.TEACHER_CKPT: the same published teacher at two paths is one teacher, and a teacher retrained into the
same path is another one. Runs whose summary has no hash (older runs) fall back to the path.

The run name does not carry the epochs, the training subset or the number of processes, so runs that share a
directory-name pattern can be different experiments; the key tells them apart. Keys left out: the seed (what
repetitions vary), names and tags, where data and logs live, the device spec, loader workers, evaluation batch
size, logging and checkpoint frequencies, timeouts, the fp16 skipped-step limit (it only decides when a
diverged run stops), and speed switches that compute the same thing
(channels-last, compile, inference mode, deterministic kernels).
"""

import hashlib
import json

import yaml

from ..config.flat import default_values, saved_values

NON_SEMANTIC = {
    "EXPERIMENT.NAME", "EXPERIMENT.TAG", "EXPERIMENT.SEED", "EXPERIMENT.DEVICE", "EXPERIMENT.DETERMINISTIC",
    "DATASET.ROOT", "DATASET.DOWNLOAD", "DATASET.NUM_WORKERS", "DATASET.TEST.BATCH_SIZE",
    "DISTRIBUTED.TIMEOUT_MIN", "DISTRIBUTED.FIND_UNUSED_PARAMETERS",
    "SOLVER.DOT.LOG_COSINE", "SOLVER.MAX_SKIPPED_STEPS",
    "SPEED.CHANNELS_LAST", "SPEED.COMPILE", "SPEED.TEACHER_INFERENCE_MODE",
}
NON_SEMANTIC_SECTIONS = ("LOG.",)  # prefix, checkpoint and TensorBoard frequencies, monitors: logging only
WORLD_SIZE = "world_size"  # the key of the process count, from summary.json
TEACHER = "teacher_sha256"  # the key of the teacher's identity, from summary.json
TEACHER_CKPT = "DISTILLER.TEACHER_CKPT"


def semantic(config_text, defaults=None, ignore=()):
    """{key: value} of a config.yaml's text that decide what is trained, less the keys in `ignore`. Keys the saved
    config lacks (added to mdistiller after the run) take their defaults: the run had the behaviour the default
    describes."""
    flat = dict(defaults if defaults is not None else default_values())
    flat.update(saved_values(yaml.safe_load(config_text) or {}))
    return {k: v for k, v in flat.items()
            if k not in NON_SEMANTIC and k not in ignore and not k.startswith(NON_SEMANTIC_SECTIONS)}


def teacher_sha256(summary):
    """The SHA-256 of the teacher checkpoint a finished run recorded (summary.json "teacher"), or None."""
    teacher = (summary or {}).get("teacher")
    return teacher.get("sha256") if isinstance(teacher, dict) else None


def keyed(sem, world_size, teacher_sha):
    """The semantic config with the process count and, where recorded, the teacher's hash in place of its path."""
    out = dict(sem)
    if teacher_sha:
        out.pop(TEACHER_CKPT, None)
        out[TEACHER] = teacher_sha[:16]
    out[WORLD_SIZE] = world_size
    return out


def same_config(sem, planned, teacher_sha):
    """Whether a run's semantic config is the planned one (the teacher path ignored when its hash is known)."""
    if teacher_sha:
        sem = {k: v for k, v in sem.items() if k != TEACHER_CKPT}
        planned = {k: v for k, v in planned.items() if k != TEACHER_CKPT}
    return sem == planned


def run_key(sem, world_size, teacher_sha=None):
    """Short hash of a run's semantic config, process count and teacher."""
    blob = json.dumps(keyed(sem, world_size, teacher_sha), sort_keys=True, default=str)
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
