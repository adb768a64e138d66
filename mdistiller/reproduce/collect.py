"""summary.json files of finished runs -> one row per published cell: mean and sample std over seeds.

std is the sample standard deviation (n - 1 in the denominator); with one seed it is undefined and left empty.
`diff` is our best-epoch mean minus the paper's number (DKD/DOT report best-epoch accuracy, protocols.md).
"""

import csv
import glob
import json
import math
import os
import re

from ..config import load_config
from ..engine.launch import run_name
from .plan import tag_suffix


def mean_std(values):
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std


def _cfg(plan, prefix, repo_root, seed=0):
    opts = list(plan.overrides) + ["EXPERIMENT.SEED", str(seed), "LOG.PREFIX", prefix]
    if plan.overrides:
        opts += ["EXPERIMENT.TAG", tag_suffix(plan.overrides)]
    return load_config(os.path.join(repo_root, plan.config), opts)


def find_summaries(plan, prefix, repo_root):
    """{seed: summary dict} of the cell's finished runs under `prefix`, any seed."""
    name = run_name(_cfg(plan, prefix, repo_root))
    if not name.endswith("_seed0"):  # EXPERIMENT.NAME fixed in the config: one run
        paths = [os.path.join(prefix, name, "summary.json")]
    else:
        stem = name[:-len("0")]
        paths = [p for p in glob.glob(os.path.join(glob.escape(prefix), glob.escape(stem) + "*", "summary.json"))
                 if re.fullmatch(re.escape(stem) + r"\d+", os.path.basename(os.path.dirname(p)))]
    out = {}
    for p in sorted(paths):
        if os.path.isfile(p):
            with open(p) as f:
                s = json.load(f)
            out[s.get("seed", len(out))] = dict(s, _dir=os.path.dirname(p))
    return out


def _teacher_used(run_dir, repo_root):
    """The checkpoint a distillation run loaded: its config's TEACHER_CKPT or the default location."""
    from ..engine.teacher import default_teacher_ckpt

    cfg = load_config(os.path.join(run_dir, "config.yaml"), validate=False)
    return cfg.DISTILLER.TEACHER_CKPT or default_teacher_ckpt(cfg)


def collect(plans, prefix, repo_root):
    rows, found = [], {}
    for p in plans:
        if p.runnable:
            found[id(p)] = find_summaries(p, prefix, repo_root)
    for p in plans:
        c = p.cell
        runs = found.get(id(p), {})
        best = mean_std([s["best_top1"] for s in runs.values()])
        last = mean_std([s["last_top1"] for s in runs.values()])
        status = p.status if not p.runnable else ("ok" if runs else "missing runs")
        teacher_used = ""
        if c.method == "teacher":
            used = set()
            for q in plans:  # distillation runs of this teacher in the same table
                if q.runnable and q.cell.teacher == c.teacher and q.cell.method not in ("teacher", "student"):
                    used |= {_teacher_used(s["_dir"], repo_root) for s in found[id(q)].values()
                             if os.path.isfile(os.path.join(s["_dir"], "config.yaml"))}
            teacher_used = ";".join(sorted(used))
        rows.append({
            "teacher": c.teacher, "student": c.student, "method": c.method, "note": c.note, "status": status,
            "n": len(runs), "seeds": " ".join(str(k) for k in sorted(runs)),
            "best_mean": best[0], "best_std": best[1], "last_mean": last[0], "last_std": last[1],
            "paper": c.top1, "diff": None if best[0] is None or c.top1 is None else best[0] - c.top1, "teacher_used": teacher_used,
        })
    return rows


def _f(v):
    return "" if v is None else f"{v:.2f}"


def _pm(mean, std):
    if mean is None:
        return "missing"
    return f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}")


def to_markdown(table, rows):
    lines = [f"Table {table}: ours = mean ± sample std (n-1) over seeds of the best-epoch and last-epoch test top-1; "
             "diff = ours (best) - paper.", "",
             "| teacher | student | method | note | n | ours best | ours last | paper | diff | status / teacher used |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = r["status"] + (f"; teacher used: {r['teacher_used']}" if r["teacher_used"] else "")
        diff = "" if r["diff"] is None else f"{r['diff']:+.2f}"
        lines.append(f"| {r['teacher']} | {r['student']} | {r['method']} | {r['note']} | {r['n']} | "
                     f"{_pm(r['best_mean'], r['best_std'])} | {_pm(r['last_mean'], r['last_std'])} | "
                     f"{'-' if r['paper'] is None else format(r['paper'], '.2f')} | {diff} | {extra} |")
    return "\n".join(lines) + "\n"


def write_csv(rows, path):
    fields = list(rows[0]) if rows else []
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (_f(v) if isinstance(v, float) and k != "paper" else v) for k, v in r.items()})
