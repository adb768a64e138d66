"""Run directories under a prefix -> one row per published cell: mean and sample std over seeds.

A cell's runs are the directories named as its planned runs (any seed) and any other run whose config is the
cell's planned config (runkey.py: minus the seed and the keys that do not change what is trained). Only finished
runs count (summary.json is written after the last epoch). Their configs and process counts must agree: a cell
whose runs disagree is refused (no mean, the differing keys in the status) rather than averaged; runs that agree
with each other but not with the plan are counted and flagged. A seed present twice counts once.

std is the sample standard deviation (n - 1 in the denominator); with one seed it is undefined and left empty.
The table's metric (table.METRICS) is read from summary.json as best_<metric> and last_<metric>, its further columns
(detection: AP50, AP75) as last_<column>. `diff` is our mean minus the paper's number: best epoch for top-1 (DKD/DOT
report best-epoch accuracy, protocols.md), last epoch for AP (Detectron2 evaluates the final model).
"""

import csv
import json
import math
import os
import re
from dataclasses import dataclass

import yaml

from ..config import load_config
from ..config.flat import default_values
from ..engine.launch import run_name
from ..models.teacher_ckpt import default_teacher_ckpt
from ..utils.errors import UserError
from .table import METRICS
from .runkey import TEACHER_CKPT, differences, keyed, run_key, same_config, semantic, teacher_sha256

# Which of our two numbers the paper's is, per metric.
COMPARED = {"top1": "best", "AP": "last"}


def mean_std(values):
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std


@dataclass
class Run:
    dir: str
    seed: object
    sem: dict  # None without config.yaml
    summary: dict  # None while unfinished
    config: dict = None  # the full config.yaml

    @property
    def finished(self):
        """summary.json exists (written after the last epoch) and, where it says, for every configured epoch."""
        if self.summary is None:
            return False
        epochs = self.summary.get("epochs")
        return epochs is None or self.sem is None or epochs >= self.sem.get("SOLVER.EPOCHS", 0)

    @property
    def world_size(self):
        return (self.summary or {}).get("world_size")

    @property
    def teacher_sha(self):
        return teacher_sha256(self.summary)

    @property
    def key(self):
        return run_key(self.sem, self.world_size, self.teacher_sha)


def _read(path):
    with open(path) as f:
        return f.read()


def scan(prefix, defaults, ignore=()):
    """{directory name: Run} of every run directory directly under `prefix`."""
    out = {}
    for name in sorted(os.listdir(prefix)):
        d = os.path.join(prefix, name)
        cfg_file, sum_file = os.path.join(d, "config.yaml"), os.path.join(d, "summary.json")
        if not (os.path.isfile(cfg_file) or os.path.isfile(sum_file)):
            continue
        text = _read(cfg_file) if os.path.isfile(cfg_file) else None
        summary = json.loads(_read(sum_file)) if os.path.isfile(sum_file) else None
        config = (yaml.safe_load(text) or {}) if text is not None else None
        seed = (config or {}).get("EXPERIMENT", {}).get("SEED", (summary or {}).get("seed"))
        out[name] = Run(d, seed, semantic(text, defaults, ignore) if text is not None else None, summary, config)
    return out


def _planned_cfg(plan, prefix, repo_root, seed=0):
    return load_config(os.path.join(repo_root, plan.config), plan.planned_run(seed).opts(prefix))


def cell_runs(plan, prefix, repo_root, runs, defaults, ignore=()):
    """(the cell's runs, its planned semantic config): runs named as the plan's (any seed) or configured as it."""
    cfg = _planned_cfg(plan, prefix, repo_root)
    planned = semantic(cfg.dump(), defaults, ignore)
    name = run_name(cfg)
    if name.endswith("_seed0"):
        pattern = re.compile(re.escape(name[:-1]) + r"\d+")
        named = {n for n in runs if pattern.fullmatch(n)}
    else:  # EXPERIMENT.NAME fixed in the config: one run
        named = {name} & set(runs)
    chosen = [r for n, r in runs.items() if n in named or (r.sem is not None and same_config(r.sem, planned,
                                                                                           r.teacher_sha))]
    return chosen, planned


def judge(chosen, planned):
    """(status, counted runs by seed, run key) of one cell."""
    notes = []
    unkeyed = [r for r in chosen if r.sem is None]
    if unkeyed:
        notes.append(f"{len(unkeyed)} run(s) without config.yaml ignored")
    unfinished = [r for r in chosen if r.sem is not None and not r.finished]
    if unfinished:
        seeds = ", ".join(str(r.seed) for r in unfinished)
        notes.append(f"{len(unfinished)} unfinished run(s) left out (seed {seeds})")
    done = [r for r in chosen if r.sem is not None and r.finished]
    groups = {}
    for r in done:
        groups.setdefault(r.key, []).append(r)
    if len(groups) > 1:
        configs = [keyed(g[0].sem, g[0].world_size, g[0].teacher_sha) for g in groups.values()]
        sizes = " + ".join(str(len(g)) for g in groups.values())
        status = f"refused: {sizes} runs of {len(groups)} different configs ({differences(configs)}); not averaged"
        return "; ".join([status] + notes), {}, " ".join(groups)
    if not done:
        return "; ".join(["missing runs"] + notes), {}, ""
    (key, group), = groups.items()
    by_seed = {}
    for r in group:
        if r.seed in by_seed:
            notes.append(f"seed {r.seed} twice ({os.path.basename(by_seed[r.seed].dir)}, "
                         f"{os.path.basename(r.dir)}), counted once")
        else:
            by_seed[r.seed] = r
    status = "ok"
    if not same_config(group[0].sem, planned, group[0].teacher_sha):
        drop = {TEACHER_CKPT} if group[0].teacher_sha else set()
        pair = [{k: v for k, v in c.items() if k not in drop} for c in (group[0].sem, planned)]
        status = f"flagged: not the planned config ({differences(pair)}; runs vs plan)"
    return "; ".join([status] + notes), by_seed, key


def _teacher_used(run):
    """The checkpoint a distillation run loaded: its config's TEACHER_CKPT or the default location."""
    cfg = load_config(os.path.join(run.dir, "config.yaml"), validate=False)
    return cfg.DISTILLER.TEACHER_CKPT or default_teacher_ckpt(cfg)


def collect(plans, prefix, repo_root, ignore=()):
    """One row per cell; `ignore`: config keys the user declares irrelevant to the comparison."""
    if not os.path.isdir(prefix):
        raise UserError(f"--prefix {prefix} is not a directory; give the LOG.PREFIX the runs were trained under")
    defaults = default_values()
    unknown = [k for k in ignore if k not in defaults]
    if unknown:
        raise UserError(f"--ignore-key {', '.join(unknown)}: not a config key (mdistiller/config/defaults.py)")
    runs = scan(prefix, defaults, ignore)
    judged = {id(p): judge(*cell_runs(p, prefix, repo_root, runs, defaults, ignore)) for p in plans if p.runnable}
    rows = []
    for p in plans:
        c = p.cell
        status, counted, key = judged.get(id(p), (p.status, {}, ""))
        best = mean_std([r.summary[f"best_{c.metric}"] for r in counted.values()])
        last = mean_std([r.summary[f"last_{c.metric}"] for r in counted.values()])
        ours = best if COMPARED[c.metric] == "best" else last
        teacher_used = ""
        if c.method == "teacher":
            used = set()
            for q in plans:  # distillation runs of this teacher in the same table
                if q.runnable and q.cell.teacher == c.teacher and q.cell.method not in ("teacher", "student"):
                    used |= {_teacher_used(r) for r in judged[id(q)][1].values()}
            teacher_used = ";".join(sorted(used))
        rows.append({
            "teacher": c.teacher, "student": c.student, "method": c.method, "note": c.note, "status": status,
            "n": len(counted), "seeds": " ".join(str(k) for k in sorted(counted)),
            "best_mean": best[0], "best_std": best[1], "last_mean": last[0], "last_std": last[1],
            "paper": c.published, "diff": None if ours[0] is None or c.published is None else ours[0] - c.published,
            "teacher_used": teacher_used, "config_key": key,
        })
        for column, published in c.extra:  # detection: AP50, AP75 of the last epoch beside the paper's
            rows[-1][f"last_{column}_mean"] = mean_std([r.summary[f"last_{column}"] for r in counted.values()])[0]
            rows[-1][f"paper_{column}"] = published
    return rows


def _f(v):
    return "" if v is None else f"{v:.2f}"


def _pm(mean, std):
    if mean is None:
        return "missing"
    return f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}")


def _paper(v):
    return "-" if v is None else format(v, ".2f")


def to_markdown(table, rows, metric="top1"):
    extras = METRICS[metric]
    more = "".join(f"; ours {c} = mean of the last epochs' test {c}" for c in extras)
    lines = [f"Table {table}: ours = mean ± sample std (n-1) over the n seeds of the best-epoch and last-epoch test "
             f"{'top-1' if metric == 'top1' else metric} of finished runs with one config; diff = ours "
             f"({COMPARED[metric]}) - paper{more}.", "",
             "| teacher | student | method | note | n | ours best | ours last | paper | diff | "
             + "".join(f"ours {c} | paper {c} | " for c in extras) + "status / teacher used |",
             "|---|---|---|---|---|---|---|---|---|---|" + "---|---|" * len(extras)]
    for r in rows:
        extra = r["status"] + (f"; teacher used: {r['teacher_used']}" if r["teacher_used"] else "")
        diff = "" if r["diff"] is None else f"{r['diff']:+.2f}"
        ours = ("refused", "refused") if r["status"].startswith("refused") else (
            _pm(r["best_mean"], r["best_std"]), _pm(r["last_mean"], r["last_std"]))
        beside = "".join(f"{'missing' if r[f'last_{c}_mean'] is None else format(r[f'last_{c}_mean'], '.2f')} | "
                         f"{_paper(r[f'paper_{c}'])} | " for c in extras)
        lines.append(f"| {r['teacher']} | {r['student']} | {r['method']} | {r['note']} | {r['n']} | "
                     f"{ours[0]} | {ours[1]} | {_paper(r['paper'])} | {diff} | {beside}{extra} |")
    return "\n".join(lines) + "\n"


def write_csv(rows, path):
    fields = list(rows[0]) if rows else []
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (_f(v) if isinstance(v, float) and not k.startswith("paper") else v) for k, v in r.items()})
