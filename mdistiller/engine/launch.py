"""From a resolved config to a finished run directory: naming, collision checks, resume, hooks.

The run directory is a pure function of the config (EXPERIMENT.NAME, or dataset/method/models/tag/seed), so
`--resume` with the same config always finds the run it continues, and a new run never silently overwrites an
old one.
"""

import hashlib
import json
import os
import platform
from importlib import metadata

import torch
import yaml

from ..data.fingerprint import file_sha256, fingerprint
from ..utils.env import describe_device, git_info, resolve_device
from ..utils.checkpoint import load_file
from ..utils.errors import UserError
from ..utils.logger import setup_logger
from ..utils import distributed
from .extend import check_epochs_change, check_same_teacher
from .hooks import CheckpointHook, MetricsHook, SummaryHook, TensorBoardHook
from .registry import TRAINER_REGISTRY
from .teacher import teacher_ckpt_path, teacher_record


def package_versions():
    """Versions of Python and of the packages that decide a run's numbers, for summary.json."""
    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "yacs", "mdistiller"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_name(cfg):
    if cfg.EXPERIMENT.NAME:
        return cfg.EXPERIMENT.NAME
    d = cfg.DISTILLER
    models = d.STUDENT if d.TYPE == "NONE" else f"{d.TEACHER}_{d.STUDENT}"
    trainer = "" if cfg.SOLVER.TRAINER == "vanilla" else f"_{cfg.SOLVER.TRAINER}"
    return f"{cfg.DATASET.TYPE}_{d.TYPE.lower()}{trainer}_{models}_{cfg.EXPERIMENT.TAG}_seed{cfg.EXPERIMENT.SEED}"


def run_dir_for(cfg):
    return os.path.join(cfg.LOG.PREFIX, run_name(cfg))


def _flat_configs(saved_text, cfg):
    """(saved, now): both configs as flat {"SECTION.KEY": value}. A key the saved config lacks (added to
    mdistiller after the run started) takes its default there: the run used the behaviour the default describes,
    so it can be resumed by a newer version."""
    from ..config import get_cfg_defaults

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    defaults = flat(yaml.safe_load(get_cfg_defaults().dump()))
    saved = {**defaults, **flat(yaml.safe_load(saved_text))}
    return saved, flat(yaml.safe_load(cfg.dump()))


def _config_changes(saved_text, cfg):
    """{key: (saved value, new value)} for the keys whose values differ between a run's saved config and `cfg`."""
    saved, now = _flat_configs(saved_text, cfg)
    return {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}


def _config_differences(saved_text, cfg):
    """Keys whose values differ between a run's saved config and `cfg` (see _flat_configs for new keys)."""
    return sorted(_config_changes(saved_text, cfg))


def _trained(latest):
    """(epochs done, iterations per epoch) of the training checkpoint `latest`; (0, None) when there is none."""
    if not os.path.exists(latest):
        return 0, None
    state = load_file(latest, "resume checkpoint")
    done = int(state.get("epoch", 0)) if isinstance(state, dict) else 0
    return done, (int(state["global_step"]) // done if done else None)


def _check_teacher_unchanged(cfg, path, old_epochs):
    """Before extending a finished run: the teacher checkpoint must still be the one its summary.json records."""
    summary_file = os.path.join(path, "summary.json")
    if not os.path.exists(summary_file):
        return
    with open(summary_file) as f:
        recorded = json.load(f).get("teacher")
    checkpoint = os.path.abspath(teacher_ckpt_path(cfg)) if recorded else None
    if checkpoint and os.path.isfile(checkpoint):  # a missing one stops the run when the teacher is built
        check_same_teacher(recorded, checkpoint, file_sha256(checkpoint), old_epochs, cfg.SOLVER.EPOCHS, path)


def check_run_dir(cfg, resume):
    """Refuse to overwrite another run; returns (path, checkpoint to resume from or None, the SOLVER.EPOCHS the
    run was started with when --resume changes it, else None). Writes nothing.

    A changed SOLVER.EPOCHS is accepted when the epochs already trained would be trained identically under the
    new config (extend.check_epochs_change) and the teacher checkpoint is unchanged; any other difference is
    refused."""
    path = run_dir_for(cfg)
    latest = os.path.join(path, "latest.pth")
    config_file = os.path.join(path, "config.yaml")
    old_epochs = None
    if os.path.exists(latest) or os.path.exists(config_file):
        if not resume:
            raise UserError(f"run directory {path} already holds a run; continue it with --resume, or start a new "
                            f"one with another EXPERIMENT.NAME / EXPERIMENT.TAG / LOG.PREFIX")
        if os.path.exists(config_file):
            with open(config_file) as f:
                saved_text = f.read()
            changes = _config_changes(saved_text, cfg)
            if "SOLVER.EPOCHS" in changes:
                done, iters = _trained(latest)
                check_epochs_change(*_flat_configs(saved_text, cfg), changes, done, iters, path)
                old_epochs = changes["SOLVER.EPOCHS"][0]
                _check_teacher_unchanged(cfg, path, old_epochs)
            elif changes:
                raise UserError(f"--resume: the config differs from the one {path} was started with, in "
                                f"{', '.join(changes)}; resume with the original config or start a new run")
    return path, (latest if resume and os.path.exists(latest) else None), old_epochs


def write_config(cfg, path):
    os.makedirs(path, exist_ok=True)
    config_file = os.path.join(path, "config.yaml")
    with open(config_file + ".tmp", "w") as f:
        f.write(cfg.dump())
    os.replace(config_file + ".tmp", config_file)


def train_from_config(cfg, resume=False, extra_hooks=()):
    """Train the run `cfg` describes; returns its summary dict. Safe to call again on a finished run.

    Under torchrun every rank calls this; rank 0 decides about the run directory and writes every file (logs,
    TensorBoard, metrics, checkpoints, summary), the others train and get the same summary back. `extra_hooks`
    run on every rank."""
    ctx, _ = distributed.setup(resolve_device(cfg.EXPERIMENT.DEVICE), cfg.DISTRIBUTED.TIMEOUT_MIN)
    path = run_dir_for(cfg)
    summary_file = os.path.join(path, "summary.json")

    def finished():
        """The summary of a complete run --resume has nothing to add to; None to go on (a new run, an interrupted
        one, or a complete one given a larger SOLVER.EPOCHS to extend it: check_run_dir decides)."""
        if not (ctx.is_main and resume and os.path.exists(summary_file)):
            return None
        with open(summary_file) as f:
            summary = json.load(f)
        if summary.get("epochs") != cfg.SOLVER.EPOCHS:
            return None
        ignored = ""
        config_file = os.path.join(path, "config.yaml")
        if os.path.exists(config_file):
            with open(config_file) as f:
                diff = _config_differences(f.read(), cfg)
            ignored = f" (the config given differs in {', '.join(diff)}: ignored)" if diff else ""
        setup_logger(os.path.join(path, "train.log")).info("%s is already complete; nothing to resume%s", path,
                                                           ignored)
        return summary

    done = distributed.broadcast_object(finished())
    if done is not None:
        return done
    # Rank 0 alone looks at the run directory (other nodes may not share the disk); all ranks follow its answer.
    path, checkpoint, old_epochs = distributed.broadcast_object(
        distributed.agree(lambda: check_run_dir(cfg, resume) if ctx.is_main else None))
    # Data, models and teacher first: a run that cannot start leaves no directory behind to trip over.
    trainer = TRAINER_REGISTRY.get(cfg.SOLVER.TRAINER, "SOLVER.TRAINER")(cfg, path)
    if ctx.is_main:
        write_config(cfg, path)
        logger = setup_logger(os.path.join(path, "train.log"))
    else:
        logger = setup_logger(None, console=False)  # one voice: rank 0 logs for the job
    logger.info("run directory %s%s", path, f" ({ctx.world_size} processes, {ctx.backend})" if ctx.enabled else "")
    if checkpoint:
        trainer.resume(checkpoint)
    elif resume:
        logger.info("--resume: no checkpoint in %s yet, starting from scratch", path)
    if old_epochs is not None:
        logger.info("--resume: SOLVER.EPOCHS %d -> %d; the %d epochs trained keep their schedule, training "
                    "continues to epoch %d", old_epochs, cfg.SOLVER.EPOCHS, trainer.epoch, cfg.SOLVER.EPOCHS)
        if ctx.is_main and os.path.exists(summary_file):
            os.remove(summary_file)  # its presence means "complete": true again once the extension is
    hooks = list(extra_hooks)
    if ctx.is_main:
        teacher = teacher_record(cfg) if getattr(trainer.distiller, "teacher", None) is not None else None
        if teacher:
            top1 = "unknown" if teacher["top1"] is None else f"{teacher['top1']:.2f} ({teacher['top1_source']})"
            logger.info("teacher %s: checkpoint %s, sha256 %s, test top-1 %s", teacher["name"],
                        teacher["checkpoint"], teacher["sha256"], top1)
        sha, dirty = git_info()
        extra = {"git_sha": sha, "git_dirty": dirty, "teacher": teacher, "torch_version": torch.__version__,
                 "config_sha256": hashlib.sha256(cfg.dump().encode()).hexdigest(),
                 "versions": package_versions(), "dataset_sources": list(trainer.meta.sources),
                 "dataset_fingerprint": fingerprint(trainer.meta.sources),
                 "device": describe_device(trainer.device), "world_size": trainer.world_size,
                 "num_train": trainer.meta.num_train, "num_test": trainer.meta.num_test,
                 "student": cfg.DISTILLER.STUDENT, "distiller": cfg.DISTILLER.TYPE, "trainer": cfg.SOLVER.TRAINER,
                 "dataset": cfg.DATASET.TYPE, "run_dir": path, "speed": trainer.speed.as_dict()}
        hooks = [
            MetricsHook(os.path.join(path, "metrics.jsonl")),
            TensorBoardHook(os.path.join(path, "tensorboard"), cfg.LOG.TENSORBOARD_FREQ),
            CheckpointHook(path, cfg.LOG.SAVE_CHECKPOINT_FREQ),
            SummaryHook(summary_file, extra),
            *hooks,
        ]
    trainer.register_hooks(hooks)
    summary = distributed.broadcast_object(trainer.train())
    logger.info("done: best top-1 %.2f (epoch %d), last top-1 %.2f, %.0f img/s", summary["best_top1"],
                summary["best_epoch"], summary["last_top1"], summary["images_per_s"])
    return summary
