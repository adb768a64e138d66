"""The README's main job: train the Fashion-MNIST runs and print one result table.

Every run is started with resume semantics, so running the job again reuses finished runs (it only prints the
table) and continues an interrupted one where it stopped. Extra `KEY VALUE` pairs apply to every run (e.g.
`LOG.PREFIX /tmp/x`). The table is also written to <LOG.PREFIX>/main_job.md.
"""

import argparse
import os
import time

import _path  # noqa: F401

from mdistiller.config import load_config
from mdistiller.distillers import DISTILLER_REGISTRY
from mdistiller.engine.launch import train_from_config
from mdistiller.models import build_model
from mdistiller.utils.cli import run_cli

CONFIG_DIR = os.path.join(_path.ROOT, "configs", "fashion_mnist")

# (row label, config file relative to configs/fashion_mnist). Teacher first: later rows distil from it.
RUNS = [
    ("teacher", "vanilla/resnet20.yaml"),
    ("student alone", "vanilla/resnet8.yaml"),
    ("KD", "kd/resnet20_resnet8.yaml"),
    ("DKD", "dkd/resnet20_resnet8.yaml"),
    ("KD+DOT", "dot/kd_resnet20_resnet8.yaml"),
]


def count_params(name, dataset):
    return sum(p.numel() for p in build_model(name, dataset).parameters())


def format_table(rows):
    header = ["run", "model", "params", "best top-1", "last top-1", "best epoch", "minutes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append(f"| {r['label']} | {r['model']} | {r['params'] / 1e6:.2f}M | {r['best_top1']:.2f} | "
                     f"{r['last_top1']:.2f} | {r['best_epoch']}/{r['epochs']} | {r['minutes']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs applied to every run")
    args = p.parse_args(argv)
    start = time.time()
    rows, teacher_ckpt = [], None
    for label, rel in RUNS:
        overrides = list(args.opts)
        cfg = load_config(os.path.join(CONFIG_DIR, rel), overrides, validate=False)
        if DISTILLER_REGISTRY.loads_teacher(cfg):
            overrides += ["DISTILLER.TEACHER_CKPT", teacher_ckpt]
        cfg = load_config(os.path.join(CONFIG_DIR, rel), overrides)
        print(f"=== {label}: {rel} ===", flush=True)
        summary = train_from_config(cfg, resume=True)
        if label == "teacher":
            teacher_ckpt = os.path.join(summary["run_dir"], "student_best.pth")
        model = cfg.DISTILLER.STUDENT
        rows.append({"label": label, "model": model, "params": count_params(model, cfg.DATASET.TYPE),
                     "minutes": summary["wall_time_s"] / 60, **summary})
    table = format_table(rows)
    prefix = load_config(None, args.opts, validate=False).LOG.PREFIX
    os.makedirs(prefix, exist_ok=True)
    with open(os.path.join(prefix, "main_job.md"), "w") as f:
        f.write(table + "\n")
    print("\nFashion-MNIST test accuracy (%):\n" + table)
    print(f"\nmain job wall time: {(time.time() - start) / 60:.1f} min (finished runs are reused)")


if __name__ == "__main__":
    run_cli(main)
