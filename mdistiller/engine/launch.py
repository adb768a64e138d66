"""From a resolved config to a finished run directory: naming, collision checks, resume, hooks.

The run directory is a pure function of the config (EXPERIMENT.NAME, or dataset/method/models/tag/seed), so
`--resume` with the same config always finds the run it continues, and a new run never silently overwrites an
old one.
"""

import hashlib
import json
import logging
import os
import platform
import re
from importlib import metadata
from typing import NamedTuple, Optional

import torch
import yaml

from ..config.flat import default_values, flatten, saved_values
from ..data.fingerprint import file_sha256, fingerprint
from ..utils.env import describe_device, git_info, resolve_device
from ..utils.checkpoint import load_file
from ..utils.errors import TrainingDivergedError, UserError
from ..utils.logger import close_logger, open_deferred_log, setup_logger, to_file
from ..utils import distributed
from ..utils.run_dir_io import RunDirError, remove_leftovers, writing
from ..utils.run_lock import RunLock
from .extend import check_epochs_change, check_same_teacher
from .hooks import CheckpointHook, MetricsHook, SummaryHook, TensorBoardHook, read_metrics
from .build import build_run
from ..models import folder_name
from ..utils.hardware import cpu_kind
from .speed import recorded_plan
from ..models.teacher_ckpt import teacher_ckpt_path
from .wandb_hook import WandbHook


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
    models = folder_name(models)  # timm:vit_small_patch16_224 -> timm-vit_small_patch16_224
    trainer = "" if cfg.SOLVER.UPDATE_RULE == "vanilla" else f"_{cfg.SOLVER.UPDATE_RULE}"
    return f"{cfg.DATASET.TYPE}_{d.TYPE.lower()}{trainer}_{models}_{cfg.EXPERIMENT.TAG}_seed{cfg.EXPERIMENT.SEED}"


def run_dir_for(cfg):
    return os.path.join(cfg.LOG.PREFIX, run_name(cfg))


# Keys that do not change what the trained epochs computed: where the run lives (a run directory moved under another
# LOG.PREFIX resumes), and how many fp16-skipped steps in a row stop it (raising it is the fix the divergence error
# offers for an fp16 run), and how often and where it reports (progress lines, TensorBoard, extra checkpoints, wandb).
NOT_COMPARED_ON_RESUME = ("LOG.PREFIX", "SOLVER.MAX_SKIPPED_STEPS", "LOG.WANDB", "LOG.WANDB_PROJECT",
                          "LOG.PRINT_FREQ", "LOG.TENSORBOARD_FREQ", "LOG.SAVE_CHECKPOINT_FREQ")

# Files only a run that trained at least one epoch writes: their presence without latest.pth is not a fresh start.
RESULT_FILES = ("summary.json", "best.pth", "student_best.pth", "student_last.pth")


class RunPlan(NamedTuple):
    """What check_run_dir decided: the run directory, the checkpoint to resume from (or None), the SOLVER.EPOCHS
    the run was started with when --resume changes it (else None), and the summary of a finished run --resume
    has nothing to add to (else None)."""

    path: str
    checkpoint: Optional[str] = None
    old_epochs: Optional[int] = None
    finished: Optional[dict] = None


def _load_saved_config(saved_text, where):
    """The saved config.yaml as a dict; a damaged file is one line."""
    try:
        saved = yaml.safe_load(saved_text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{where} is damaged (not valid YAML{at}: {getattr(e, 'problem', None) or e}); restore it "
                        f"(latest.pth holds a copy under the key 'config') or start a new run") from None
    if not isinstance(saved, dict):
        raise UserError(f"{where} is damaged (it holds no config mapping); restore it (latest.pth holds a copy "
                        f"under the key 'config') or start a new run")
    return saved


def _flat_configs(saved_text, cfg, where="the saved config"):
    """(saved, now): both configs as flat {"SECTION.KEY": value}. A key the saved config lacks (added to
    mdistiller after the run started) takes its default there: the run used the behaviour the default describes,
    so it can be resumed by a newer version."""
    saved = {**default_values(), **saved_values(_load_saved_config(saved_text, where))}
    return saved, flatten(yaml.safe_load(cfg.dump()))


def _config_changes(saved_text, cfg, where="the saved config"):
    """{key: (saved value, new value)} for the keys whose values differ between a run's saved config and `cfg`
    (NOT_COMPARED_ON_RESUME excluded)."""
    saved, now = _flat_configs(saved_text, cfg, where)
    return {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k) and k not in NOT_COMPARED_ON_RESUME}


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


def _read_json(path, what):
    with writing(f"read {what}", path), open(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except ValueError as e:
        raise UserError(f"{what} {path} is damaged ({e}); delete it to resume the run from latest.pth, or start "
                        f"a new run") from None


def _check_teacher_unchanged(cfg, path, old_epochs):
    """Before extending a finished run: the teacher checkpoint must still be the one its summary.json records."""
    summary_file = os.path.join(path, "summary.json")
    if not os.path.exists(summary_file):
        return
    recorded = _read_json(summary_file, "run summary").get("teacher")
    checkpoint = os.path.abspath(teacher_ckpt_path(cfg)) if recorded else None
    if checkpoint and os.path.isfile(checkpoint):  # a missing one stops the run when the teacher is built
        check_same_teacher(recorded, checkpoint, file_sha256(checkpoint), old_epochs, cfg.SOLVER.EPOCHS, path)


def _results(path):
    """(what the run directory holds of a run's results, as short descriptions; the highest epoch they show)."""
    found, epochs = [], 0
    metrics = os.path.join(path, "metrics.jsonl")
    if os.path.exists(metrics):
        records = read_metrics(metrics)[0]
        if records:
            found.append(f"metrics.jsonl (epochs {records[0]['epoch']}-{records[-1]['epoch']})")
            epochs = max(r["epoch"] for r in records)
    names = sorted(os.listdir(path)) if os.path.isdir(path) else []
    for name in names:
        if name in RESULT_FILES:
            found.append(name)
        match = re.fullmatch(r"ckpt_epoch_(\d+)\.pth", name)
        if match:
            found.append(name)
            epochs = max(epochs, int(match.group(1)))
    if "summary.json" in names:
        epochs = max(epochs, 2)  # a finished run: never mistaken for one killed during its first epoch
    return found, epochs


def check_run_dir(cfg, resume):
    """Decide what to do with the run directory; returns a RunPlan. Reads, writes nothing; runs under the run's
    lock (rank 0).

    Refused, each with one line: a new run where one already is (without --resume); --resume of a directory that
    holds results of more than a first epoch but no latest.pth (it would start over and overwrite them); --resume
    with another config, finished run or not, except a larger SOLVER.EPOCHS when the epochs already trained would
    be trained identically under the new config (extend.check_epochs_change) and the teacher checkpoint is
    unchanged; a damaged config.yaml or summary.json."""
    path = run_dir_for(cfg)
    latest = os.path.join(path, "latest.pth")
    config_file = os.path.join(path, "config.yaml")
    summary_file = os.path.join(path, "summary.json")
    results, epochs_seen = _results(path)
    if not (os.path.exists(latest) or os.path.exists(config_file) or results):
        return RunPlan(path)
    if not resume:
        raise UserError(f"run directory {path} already holds a run; continue it with --resume, or start a new "
                        f"one with another EXPERIMENT.NAME / EXPERIMENT.TAG / LOG.PREFIX")
    if not os.path.exists(latest) and epochs_seen > 1:
        raise UserError(f"--resume: {path} holds results ({', '.join(results)}) but no latest.pth to continue "
                        f"from, and starting over would overwrite them; to start over deliberately delete {path} "
                        f"or give the run another EXPERIMENT.NAME / EXPERIMENT.TAG / LOG.PREFIX")
    summary = _read_json(summary_file, "run summary") if os.path.exists(summary_file) else None
    old_epochs = None
    if os.path.exists(config_file):
        with writing("read", config_file), open(config_file) as f:
            saved_text = f.read()
        changes = _config_changes(saved_text, cfg, config_file)
        if "SOLVER.EPOCHS" in changes:
            done, iters = _trained(latest)
            check_epochs_change(*_flat_configs(saved_text, cfg, config_file), changes, done, iters, path)
            old_epochs = changes["SOLVER.EPOCHS"][0]
            _check_teacher_unchanged(cfg, path, old_epochs)
        elif changes:
            named = "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
            state = "finished" if summary is not None else "unfinished"
            raise UserError(f"--resume: the config differs from the one the {state} run {path} was started with, "
                            f"in {named}; resume with the original config or start a new run")
    if summary is not None and summary.get("epochs") == cfg.SOLVER.EPOCHS and old_epochs is None:
        return RunPlan(path, finished=summary)
    return RunPlan(path, latest if os.path.exists(latest) else None, old_epochs)


def write_config(cfg, path):
    config_file = os.path.join(path, "config.yaml")
    with writing("write config", config_file):
        os.makedirs(path, exist_ok=True)
        with open(config_file + ".tmp", "w") as f:
            f.write(cfg.dump())
        os.replace(config_file + ".tmp", config_file)


def train_from_config(cfg, resume=False, extra_hooks=()):
    """Train the run `cfg` describes; returns its summary dict. Safe to call again on a finished run.

    Under torchrun every rank calls this; rank 0 holds the run directory's lock, decides about the directory and
    writes every file (logs, TensorBoard, metrics, checkpoints, summary), the others train and get the same
    summary back. `extra_hooks` run on every rank."""
    ctx, device = distributed.setup(resolve_device(cfg.EXPERIMENT.DEVICE), cfg.DISTRIBUTED.TIMEOUT_MIN)
    # Rank 0 alone looks at the run directory (other nodes may not share the disk); all ranks follow its answer.
    lock = distributed.agree(lambda: RunLock(run_dir_for(cfg)).acquire() if ctx.is_main else None)
    try:
        return _train_locked(cfg, resume, extra_hooks, ctx, device)
    except (UserError, KeyboardInterrupt) as e:
        _log_the_end(e)
        raise
    finally:
        close_logger()  # train.log closed, warnings shown as before: nothing later lands in this run's log
        if lock is not None:
            lock.release()  # also removes a directory it created if the run stopped before writing anything


def _log_the_end(e):
    """What tools/train.py prints when a run stops (utils/cli.py), in train.log too (already on the console).
    A run that never started writing has its log held in memory: it is dropped with the rest. Not for a run
    directory that cannot be written (RunDirError: train.log is in it) or a divergence (the trainer logged it)."""
    if isinstance(e, KeyboardInterrupt):
        to_file(logging.WARNING, "interrupted; a run can be continued with --resume")
    elif not isinstance(e, (RunDirError, TrainingDivergedError)):
        to_file(logging.ERROR, "error: %s", e)


def _train_locked(cfg, resume, extra_hooks, ctx, device):
    """The run, once rank 0 holds the run directory's lock: decide, build (and resume), start writing, attach the
    hooks that write files (rank 0), train, and return the summary every rank gets."""
    plan = distributed.broadcast_object(
        distributed.agree(lambda: check_run_dir(cfg, resume) if ctx.is_main else None))
    if plan.finished is not None:
        if ctx.is_main:
            setup_logger(os.path.join(plan.path, "train.log")).info("%s is already complete; nothing to resume",
                                                                    plan.path)
        return plan.finished
    # train.log and config.yaml stay as they are until every check has passed and the checkpoint is loaded.
    logger = setup_logger(os.path.join(plan.path, "train.log") if ctx.is_main else None, console=ctx.is_main,
                          defer_file=True)  # one voice: rank 0 logs for the job
    logger.info("run directory %s%s", plan.path,
                f" ({ctx.world_size} processes, {ctx.backend})" if ctx.enabled else "")
    run = _build_and_resume(cfg, plan, resume, ctx, device, logger)
    distributed.agree(lambda: _start_writing(cfg, plan, run.trainer, logger) if ctx.is_main else None)
    summary_hook = SummaryHook(path=os.path.join(plan.path, "summary.json"), evaluation=run.evaluation,
                               extra=_summary_extra(cfg, run, plan.path, ctx, logger)) if ctx.is_main else None
    run.trainer.register_hooks(_file_hooks(cfg, run, plan.path, summary_hook) + list(extra_hooks) if ctx.is_main
                               else list(extra_hooks))
    logger.info("training %s on %s, %d train / %d test images, device %s", cfg.DISTILLER.STUDENT, run.data.name,
                run.data.num_train, run.data.num_test, describe_device(run.device))
    logger.info("fast paths: %s", run.speed.describe())
    for note in run.speed.notes:
        logger.info("  %s", note)
    run.trainer.train()
    summary = distributed.broadcast_object(summary_hook.summary if summary_hook is not None else None)
    logger.info("done: %s, %.0f img/s", run.task.result_line(summary), summary["images_per_s"])
    return summary


def _build_and_resume(cfg, plan, resume, ctx, device, logger):
    """The run's objects, resumed from the plan's checkpoint. Data, models and teacher come before anything is
    written: a run that cannot start leaves no directory behind to trip over."""
    # The fast paths a resumed run started with: its "auto" choices stand even where this machine decides otherwise.
    recorded = distributed.broadcast_object(
        distributed.agree(lambda: recorded_plan(plan.path) if ctx.is_main and plan.checkpoint else None))
    run = build_run(cfg, device=device, run_dir=plan.path, recorded_speed=recorded)
    if plan.checkpoint:
        run.trainer.resume(plan.checkpoint)
    elif resume:
        logger.info("--resume: no checkpoint in %s yet, starting from scratch", plan.path)
    return run


def _start_writing(cfg, plan, trainer, logger):
    """Every check passed (rank 0): clear what a killed run left half-written, write config.yaml, open train.log;
    an extended run's summary.json goes (its presence means "complete": true again once the extension is)."""
    removed = remove_leftovers(plan.path)
    write_config(cfg, plan.path)
    open_deferred_log(logger)
    if removed:
        logger.info("removed %d half-written file(s) a stopped run left in %s: %s", len(removed), plan.path,
                    ", ".join(removed))
    if plan.old_epochs is not None:
        logger.info("--resume: SOLVER.EPOCHS %d -> %d; the %d epochs trained keep their schedule, training "
                    "continues to epoch %d", plan.old_epochs, cfg.SOLVER.EPOCHS, trainer.epoch, cfg.SOLVER.EPOCHS)
        summary_file = os.path.join(plan.path, "summary.json")
        if os.path.exists(summary_file):
            with writing("remove", summary_file):
                os.remove(summary_file)


def _summary_extra(cfg, run, path, ctx, logger):
    """What summary.json records beside the result: the teacher file, code, config, data, machine and fast paths.
    Logs the teacher the run loaded (the method's, or the loss monitor's: LOG.MONITOR_TEACHER)."""
    loaded = run.distiller.teacher is not None or run.monitor_teacher is not None
    teacher = run.task.teacher_record(cfg) if loaded else None
    if teacher:
        metric = teacher["metric"]
        score = "unknown" if teacher[metric] is None else f"{teacher[metric]:.2f} ({teacher[metric + '_source']})"
        logger.info("teacher %s: checkpoint %s, sha256 %s, test %s %s", teacher["name"], teacher["checkpoint"],
                    teacher["sha256"], run.task.metric_label, score)
    sha, dirty = git_info()
    return {"seed": cfg.EXPERIMENT.SEED, "git_sha": sha, "git_dirty": dirty, "teacher": teacher,
            "torch_version": torch.__version__, "config_sha256": hashlib.sha256(cfg.dump().encode()).hexdigest(),
            "versions": package_versions(), "dataset_sources": list(run.data.sources),
            "dataset_fingerprint": fingerprint(run.data.sources), "device": describe_device(run.device),
            "world_size": ctx.world_size, "num_train": run.data.num_train, "num_test": run.data.num_test,
            "classes": list(run.data.classes), "student": cfg.DISTILLER.STUDENT, "distiller": cfg.DISTILLER.TYPE,
            "trainer": cfg.SOLVER.UPDATE_RULE, "dataset": cfg.DATASET.TYPE, "task": cfg.TASK, "run_dir": path,
            "speed": run.speed.as_dict(), "speed_decisions": list(run.speed.notes), "cpu": cpu_kind()}


def _file_hooks(cfg, run, path, summary_hook):
    """The hooks that write the run directory (rank 0), in order: metrics.jsonl, TensorBoard, W&B, checkpoints,
    summary.json (last: its presence means the run is complete)."""
    scalars = run.task.epoch_scalars
    return [MetricsHook(path=os.path.join(path, "metrics.jsonl")),
            TensorBoardHook(log_dir=os.path.join(path, "tensorboard"), epoch_keys=scalars,
                            **TensorBoardHook.from_config(cfg)),
            *([WandbHook(run_dir=path, epoch_keys=scalars, **WandbHook.from_config(cfg))] if cfg.LOG.WANDB else []),
            CheckpointHook(run_dir=path, evaluation=run.evaluation, **CheckpointHook.from_config(cfg)),
            summary_hook]
