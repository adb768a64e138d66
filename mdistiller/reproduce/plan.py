"""From a published cell to the run(s) that reproduce it: a config under configs/ plus KEY VALUE overrides.

The mapping is a naming convention plus two small tables, so a new table needs configs, not code:
- teacher / student rows: configs/<dataset>/vanilla/<model>.yaml;
- a method M: configs/<dataset>/<METHOD_DIRS[M]>/<teacher>_<student>.yaml;
- X+DOT: configs/<dataset>/dot/<METHOD_DIRS[X]>_<teacher>_<student>.yaml;
- the note column of sweep rows ("delta=0.05", "momentum=0.9") becomes overrides through NOTE_KEYS;
- the note "seeds=N" caps a cell's seeds (a proxy table's teacher is trained once and shared by every seed);
- a dataset in LAYOUTS keeps its configs elsewhere: its folder, its model names, its teacher and student rows'
  folders (COCO: configs/coco/teacher/resnet101.yaml, configs/coco/baseline/resnet18.yaml);
- a config with a fixed EXPERIMENT.NAME is one run directory, so one seed;
- a DISTILLER.TEACHER_CKPT under the default LOG.PREFIX (a teacher run, e.g. output/coco_teacher_resnet101/...) is
  read from the same place under the study's prefix, where the study trains that teacher.
Methods the framework does not implement are reported as such and are never counted as missing configs.
"""

import os
import re
from dataclasses import dataclass

from ..config import get_cfg_defaults, load_config
from ..utils.env import REPO_ROOT

CONFIGS_ROOT = os.path.join(REPO_ROOT, "configs")

# Method names as the papers' tables print them (paper_results.csv) -> config directory.
METHOD_DIRS = {"KD": "kd", "AT": "at", "CRD": "crd", "DKD": "dkd", "ReviewKD": "reviewkd", "DIST": "dist",
               "KD++": "kdpp", "DKD++": "dkdpp", "ReviewKD++": "reviewkdpp", "DIST++": "distpp", "CRD++": "crdpp",
               "FitNet": "fitnet", "RKD": "rkd", "PKT": "pkt", "OFD": "ofd", "SRRL": "srrl", "VID": "vid",
               "NST": "nst", "SP": "sp", "KDSVD": "kdsvd", "CTKD": "ctkd", "FGFI": "fgfi",
               "FSP": "fsp", "CC": "cc", "ICKD": "ickd", "ICKD (w/o KL)": "ickd_wokl", "SimKD": "simkd",
               "CAT-KD": "catkd", "CTKD (instance-wise)": "ctkd_instance",
               "WKD-L": "wkdl", "WKD-F": "wkdf", "MLKD": "mlkd",
               "SSKD": "sskd", "FT": "ft", "AB": "ab",
               # DKD appendix table A.3: DKD with the NCKD weight 0 (DKD.BETA 0), CE and TCKD weights 1
               "TCKD only": "tckd",
               # KD++ table 4 / 4a (loss forms): KD plus one direction and / or norm term, and the parts of KD++
               "KD + cosine direction": "kdpp_cos", "KD + InfoNCE direction": "kdpp_infonce",
               "KD + L2 norm": "kdpp_l2", "KD + SIFN norm": "kdpp_sifn", "KD + cosine + L2": "kdpp_cos_l2",
               "KD + cosine + SIFN": "kdpp_cos_sifn", "KD + InfoNCE + L2": "kdpp_infonce_l2",
               "KD + InfoNCE + SIFN": "kdpp_infonce_sifn", "CE + DINO": "kdpp_ce_dino", "KL + DINO": "kdpp_kl_dino",
               "CE + KL + DINO (KD++)": "kdpp",
               # KD++ table 5 (class centres): the teacher's classifier weights instead of its class-mean features
               "KD + L2 of teacher classifier weights": "kdpp_l2_clsweight",
               "KD++ (teacher classifier weights as centres)": "kdpp_clsweight",
               "KD++ (teacher class-mean features)": "kdpp"}
# Methods of published cells that have no distiller yet: their cells are reported, never looked for on disk.
NOT_IMPLEMENTED = set()
# Methods whose temperature is DKD.T (a note "temperature=T"); every other method's is KD.TEMPERATURE.
DKD_TEMPERATURE = ("DKD", "TCKD only")


@dataclass(frozen=True)
class Layout:
    """Where a dataset's configs are when they do not follow configs/<dataset>/vanilla/<published name>.yaml."""

    folder: str  # configs/<folder>
    models: dict  # published model name -> the name in config file names
    teacher_dir: str = "vanilla"  # the teacher row's config folder
    student_dir: str = "vanilla"  # the student-alone row's config folder
    not_implemented: frozenset = frozenset()  # methods not implemented for this dataset, beyond NOT_IMPLEMENTED


# KD++ table 3: detection teachers on the 1x schedule, students alone on the pairs' schedule (configs/coco/); every
# method of the table, FitNet (hint-layer regression) and FGFI (imitation masks) included, has detection configs
# (configs/coco/<method dir>/<teacher>_<student>.yaml).
LAYOUTS = {"coco2017_val": Layout("coco", {"ResNet101": "resnet101", "ResNet50": "resnet50", "ResNet18": "resnet18",
                                           "MobileNetV2": "mobilenet_v2"}, "teacher", "baseline")}


def _one(key):
    return lambda method, value: [(key, value)]


def _task_weight(method, value):
    """DOT tables 4/5: CE weight alpha and KD weight 1 - alpha (DOT eq. 1)."""
    return [("KD.LOSS.CE_WEIGHT", value), ("KD.LOSS.KD_WEIGHT", f"{1 - float(value):g}")]


# note key -> function(method, value) -> [(override key, value), ...] (temperature is KD's or DKD's).
NOTE_KEYS = {
    "delta": _one("SOLVER.DOT.DELTA"),
    "momentum": _one("SOLVER.MOMENTUM"),
    "beta": _one("DKD.BETA"),
    "temperature": lambda m, v: [("DKD.T" if m.startswith(DKD_TEMPERATURE) else "KD.TEMPERATURE", v)],
    "m": _one("DINO.NORM_MARGIN"),  # KD++ appendix B.4 (table B1): the margin on the teacher's norm
    "epochs": _one("SOLVER.EPOCHS"),
    "factor": _one("SIMKD.FACTOR"),  # SimKD README: the projector's bottleneck factor
    "alpha(task weight)": _task_weight,
}
# Notes that describe the published number rather than the run.
INFORMATIVE_NOTES = {"train task loss", "mean of 5 trials", "teacher R101 itself", "teacher R50 itself",
                     "student R18 without distillation", "student R50 without distillation",
                     "student MV2 without distillation", "AP75 as printed (below AP; likely a typo)",
                     "global temperature", "own teachers"}

OK, MISSING, NOT_IMPL, UNMAPPED = "ok", "missing config", "not implemented", "unmapped"


@dataclass(frozen=True)
class CellPlan:
    cell: object
    status: str  # OK, MISSING, NOT_IMPL or UNMAPPED
    config: str = ""  # path relative to the repository root
    overrides: tuple = ()  # ("KEY", "VALUE", ...)
    reason: str = ""
    max_seeds: int = 0  # 0: as many as asked for
    teacher_run: str = ""  # DISTILLER.TEACHER_CKPT relative to LOG.PREFIX when it reads a run under the prefix

    @property
    def runnable(self):
        return self.status == OK

    def planned_run(self, seed):
        return PlannedRun(self.config, self.overrides, seed, tag_suffix(self.overrides), self.teacher_run)


@dataclass(frozen=True)
class PlannedRun:
    config: str
    overrides: tuple
    seed: int
    tag_suffix: str  # keeps sweep points of one config apart in the run directory name
    teacher_run: str = ""  # as CellPlan.teacher_run

    def opts(self, prefix=None):
        """The KEY VALUE list for load_config / tools/train.py."""
        out = list(self.overrides) + ["EXPERIMENT.SEED", str(self.seed)]
        if self.tag_suffix:
            out += ["EXPERIMENT.TAG", self.tag_suffix]
        if prefix:
            out += ["LOG.PREFIX", prefix]
            if self.teacher_run:
                out += ["DISTILLER.TEACHER_CKPT", os.path.join(prefix, self.teacher_run)]
        return out


def _config_path(cell):
    """(relative config path, None) or (None, (status, reason))."""
    method = cell.method
    layout = LAYOUTS.get(cell.dataset, Layout(cell.dataset, {}))
    teacher, student = (layout.models.get(m, m) for m in (cell.teacher, cell.student))
    if method in ("teacher", "student"):
        model, folder = (teacher, layout.teacher_dir) if method == "teacher" else (student, layout.student_dir)
        return os.path.join("configs", layout.folder, folder, f"{model}.yaml"), None
    dot = method.endswith("+DOT")
    base = method[:-len("+DOT")] if dot else method
    if base in NOT_IMPLEMENTED:
        return None, (NOT_IMPL, f"{base} is not implemented in mdistiller")
    if base in layout.not_implemented:
        return None, (NOT_IMPL, f"{base} is not implemented in mdistiller for {cell.dataset}")
    if base not in METHOD_DIRS:
        return None, (UNMAPPED, f"method {method!r} has no entry in METHOD_DIRS/NOT_IMPLEMENTED")
    pair = f"{teacher}_{student}"
    if dot:
        return os.path.join("configs", layout.folder, "dot", f"{METHOD_DIRS[base]}_{pair}.yaml"), None
    return os.path.join("configs", layout.folder, METHOD_DIRS[base], f"{pair}.yaml"), None


def _note_overrides(cell):
    """(overrides tuple, max seeds or 0, None) or (None, 0, reason)."""
    out, max_seeds = [], 0
    if cell.note in INFORMATIVE_NOTES:  # a whole note may hold a ";"
        return (), 0, None
    for part in filter(None, (p.strip() for p in cell.note.split(";"))):
        if "=" not in part:
            if part in INFORMATIVE_NOTES:
                continue
            return None, 0, f"note {part!r} has no override mapping"
        key, value = (s.strip() for s in part.split("=", 1))
        if key in INFORMATIVE_NOTES:
            continue
        if key == "seeds":
            max_seeds = int(value)
            continue
        if key not in NOTE_KEYS:
            return None, 0, f"note {part!r} has no override mapping (NOTE_KEYS)"
        for k, v in NOTE_KEYS[key](cell.method, value):
            out += [k, v]
    return tuple(out), max_seeds, None


def plan_cell(cell, configs_root=CONFIGS_ROOT):
    path, problem = _config_path(cell)
    if problem:
        return CellPlan(cell, *problem[:1], reason=problem[1])
    overrides, max_seeds, reason = _note_overrides(cell)
    if reason:
        return CellPlan(cell, UNMAPPED, path, reason=reason)
    full = os.path.join(configs_root, os.path.relpath(path, "configs"))
    if not os.path.isfile(full):
        return CellPlan(cell, MISSING, path, overrides, reason=f"{path} does not exist", max_seeds=max_seeds)
    cfg = load_config(full, validate=False)
    if cfg.EXPERIMENT.NAME:
        max_seeds = 1
    return CellPlan(cell, OK, path, _drop_config_values(full, cfg, overrides), max_seeds=max_seeds,
                    teacher_run=_teacher_run(cfg.DISTILLER.TEACHER_CKPT))


def _teacher_run(ckpt):
    """`ckpt` relative to the default LOG.PREFIX when it lies under it (a teacher the study trains), else ''."""
    default = get_cfg_defaults().LOG.PREFIX
    if ckpt and not os.path.isabs(ckpt) and os.path.normpath(ckpt).startswith(default + os.sep):
        return os.path.relpath(ckpt, default)
    return ""


def _drop_config_values(path, base, overrides):
    """Overrides minus those the config already has, so a sweep point at the config's own value ("delta=0.075" on
    the KD+DOT config) is the config's run itself and is trained once, not again under another name. `base`: the
    config `path` holds, loaded without overrides."""
    if not overrides:
        return overrides
    swept = load_config(path, list(overrides), validate=False)
    keep = []
    for key, value in zip(overrides[0::2], overrides[1::2]):
        a, b = base, swept
        for part in key.split("."):
            a, b = a[part], b[part]
        if a != b:
            keep += [key, value]
    return tuple(keep)


def tag_suffix(overrides):
    """'' without overrides (the config's own tag, so the run is the one tools/train.py makes), else a slug."""
    if not overrides:
        return ""
    pairs = zip(overrides[0::2], overrides[1::2])
    return "repro_" + "_".join(f"{k.rsplit('.', 1)[-1].lower()}{re.sub('[^0-9A-Za-z.-]', '', v)}" for k, v in pairs)


def plan_table(cells, seeds=1, configs_root=CONFIGS_ROOT):
    """(cell plans, unique planned runs). Equal cells (a teacher shared by two pairs) share runs. Runs go seed by
    seed (every cell's seed 0 first, in table order, so teachers come before their students): a study cut short
    still has every row."""
    plans = [plan_cell(c, configs_root) for c in cells]
    runs = {}
    for p in plans:
        if p.runnable:
            for seed in range(min(seeds, p.max_seeds or seeds)):
                runs.setdefault(p.planned_run(seed), None)
    return plans, sorted(runs, key=lambda r: r.seed)
