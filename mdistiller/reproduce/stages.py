"""Which planned runs read a checkpoint that another planned run writes, and the stages that order them.

A student (or a student alone that monitors a teacher) reads its teacher's checkpoint when it starts. When that
teacher is trained by the same plan, the student must wait until the teacher run has finished: its
student_best.pth exists from the first epoch on, so a student started early would silently distil from a
half-trained teacher. A run's stage is one more than the highest stage of the runs it reads; stage 0 needs nothing.
Teachers read from elsewhere (the published zoo, torchvision) are no dependency.
"""

import os
from dataclasses import dataclass

from ..config import load_config
from ..detection.terms import method_terms
from ..distillers import DISTILLER_REGISTRY
from ..engine.launch import run_dir_for
from ..models.teacher_ckpt import default_teacher_ckpt, library_pretrained_teacher
from ..utils.errors import UserError


@dataclass(frozen=True)
class StagedRun:
    run: object  # PlannedRun
    stage: int
    run_dir: str  # absolute
    reads: tuple = ()  # absolute run directories of the planned runs whose checkpoint this run loads
    cfg: object = None  # the resolved config


def resolve(run, prefix, repo_root):
    """The config a planned run trains with, as tools/train.py would resolve it."""
    return load_config(os.path.join(repo_root, run.config), run.opts(prefix))


def teacher_checkpoint(cfg):
    """The teacher checkpoint `cfg` loads, or None when it loads none or loads its library's pretrained weights
    (a timm:/torchvision: teacher, never a planned run). Reads the config only: never looks for or downloads a
    file (unlike teacher_ckpt_path), so a plan is made without data or weights (needs.py lists what is missing)."""
    if cfg.TASK == "detection":  # a detection teacher is always DISTILLER.TEACHER_CKPT (or "torchvision")
        return cfg.DISTILLER.TEACHER_CKPT if method_terms(cfg.DISTILLER.TYPE) else None
    if not DISTILLER_REGISTRY.loads_teacher(cfg) or library_pretrained_teacher(cfg):
        return None
    return cfg.DISTILLER.TEACHER_CKPT or default_teacher_ckpt(cfg)


def stage_runs(runs, prefix, repo_root):
    """[StagedRun] in stage order (the plan's order within a stage)."""
    cfgs = [resolve(r, prefix, repo_root) for r in runs]
    dirs = [os.path.abspath(run_dir_for(c)) for c in cfgs]
    by_dir = {d: i for i, d in enumerate(dirs)}
    reads = []
    for i, cfg in enumerate(cfgs):
        ckpt = teacher_checkpoint(cfg)
        j = by_dir.get(os.path.dirname(os.path.abspath(ckpt))) if ckpt else None
        if j == i:
            raise UserError(f"{runs[i].config}: its teacher checkpoint {ckpt} is inside its own run directory; "
                            "set DISTILLER.TEACHER_CKPT to the teacher's run")
        reads.append(() if j is None else (j,))
    stage = [None] * len(runs)

    def depth(i, seen=()):
        if stage[i] is None:
            if i in seen:
                raise UserError(f"{runs[i].config}: the planned runs read each other's checkpoints in a cycle")
            stage[i] = 1 + max((depth(j, seen + (i,)) for j in reads[i]), default=-1)
        return stage[i]

    staged = [StagedRun(r, depth(i), dirs[i], tuple(dirs[j] for j in reads[i]), cfgs[i]) for i, r in enumerate(runs)]
    return sorted(staged, key=lambda s: s.stage)  # stable: the plan's order within a stage
