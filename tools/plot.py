"""The DOT paper's figures from finished runs, as PNG files.

    python tools/plot.py RUN_DIR... [--out DIR] [--labels L...] [--logit-corr]

- accuracy.png: test top-1 per epoch of every run (metrics.jsonl's test_top1), one line each: the figure to look
  at first, since the others explain it.
- losses.png (DOT fig. 3 and 6): the training task loss and distillation loss per epoch of every run. These are
  the trainer's monitor/ce and monitor/kl: unweighted, so a KD run (CE weight 0.1) and the student alone compare;
  the student alone has monitor/kl when it ran with LOG.MONITOR_TEACHER. Runs from before the monitor fall back
  to their weighted loss/task_total and loss/distill_total, and the legend says so.
- cosines.png (fig. 5): cos(v_task, v) and cos(v_distill, v) per iteration of runs trained with
  SOLVER.DOT.LOG_COSINE (TensorBoard scalars; epoch means where those are absent). A KD run under plain SGD has
  these curves too: train it with SOLVER.UPDATE_RULE dot SOLVER.DOT.DELTA 0.0, which is SGD exactly.
- logit_corr.png (fig. 7, with --logit-corr): |corr(student logits) - corr(teacher logits)| over the test set for
  every distillation run, its student_best.pth against the teacher the run used, with the mean in each title.

A summary of the plotted numbers is printed and written to plot_data.json next to the figures.
"""

import argparse
import json
import os

import _path  # noqa: F401

from mdistiller.analysis.run_logs import epoch_records, run_config, run_label, step_scalars
from mdistiller.utils.cli import run_cli
from mdistiller.utils.errors import UserError


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def loss_curves(runs):
    """{label: {"epochs", "task", "distill", "weighted"}} from metrics.jsonl."""
    out = {}
    for label, run_dir in runs:
        recs = epoch_records(run_dir)
        monitored = all("monitor/ce" in r for r in recs)
        task_key, distill_key = ("monitor/ce", "monitor/kl") if monitored else ("loss/task_total",
                                                                                 "loss/distill_total")
        out[label] = {"epochs": [r["epoch"] for r in recs],
                      "task": [r.get(task_key) for r in recs],
                      "distill": [r.get(distill_key) for r in recs],
                      "weighted": not monitored}
    return out


def accuracy_curves(runs):
    """{label: {"epochs", "test_top1"}} from metrics.jsonl."""
    out = {}
    for label, run_dir in runs:
        recs = [r for r in epoch_records(run_dir) if "test_top1" in r]
        out[label] = {"epochs": [r["epoch"] for r in recs], "test_top1": [r["test_top1"] for r in recs]}
    return out


def plot_accuracy(curves, path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for label, c in curves.items():
        ax.plot(c["epochs"], c["test_top1"], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("test accuracy")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _two_panels(path, panels, draw):
    """One figure of two side-by-side panels: draw(ax, key) for each (key, title) in panels, then a grid, the
    legend and the PNG at `path`."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, title) in zip(axes, panels):
        draw(ax, key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a panel no run has data for stays without a legend
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_losses(curves, path):
    def draw(ax, key):
        for label, c in curves.items():
            pts = [(e, v) for e, v in zip(c["epochs"], c[key]) if v is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label + (" (weighted)" if c["weighted"] else ""))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(_integer_ticks())

    _two_panels(path, (("task", "training task loss (CE)"),
                       ("distill", "training distillation loss (T$^2$ KL to the teacher)")), draw)


def cosine_curves(runs):
    """{label: {"cos_task": [(step, v)], "cos_distill": [...], "per": "step"|"epoch"}} for runs that logged them."""
    out = {}
    for label, run_dir in runs:
        task, distill = step_scalars(run_dir, "dot/cos_task"), step_scalars(run_dir, "dot/cos_distill")
        per = "step"
        if not task:
            recs = [r for r in epoch_records(run_dir) if "dot/cos_task" in r]
            task = [(r["epoch"], r["dot/cos_task"]) for r in recs]
            distill = [(r["epoch"], r["dot/cos_distill"]) for r in recs]
            per = "epoch"
        if task:
            out[label] = {"cos_task": task, "cos_distill": distill, "per": per}
    return out


def plot_cosines(curves, path):
    def draw(ax, key):
        for label, c in curves.items():
            ax.plot(*zip(*c[key]), label=label, lw=1)
        per = {c["per"] for c in curves.values()}
        ax.set_xlabel("iteration" if per == {"step"} else "iteration / epoch (see legend)")

    _two_panels(path, (("cos_distill", "cos(v_distill, v)"), ("cos_task", "cos(v_task, v)")), draw)


def logit_corr(runs, device):
    """{label: (C, C) |corr difference| tensor} for the distillation runs, on each run's own test split."""
    from mdistiller.analysis.logit_corr import correlation_difference, predict
    from mdistiller.data import build_dataloaders
    from mdistiller.models.teacher_ckpt import build_teacher
    from mdistiller.models import build_model
    from mdistiller.utils.checkpoint import load_weights

    out = {}
    for label, run_dir in runs:
        cfg = run_config(run_dir)
        if cfg.DISTILLER.TYPE == "NONE":
            continue
        _, test_loader, meta = build_dataloaders(cfg, device, only_test=True)
        student = build_model(cfg.DISTILLER.STUDENT, num_classes=meta.num_classes, image_size=meta.image_size)
        ckpt = os.path.join(run_dir, "student_best.pth")
        if not os.path.isfile(ckpt):
            raise UserError(f"{ckpt} not found: --logit-corr needs the run's saved student")
        load_weights(student, ckpt, cfg.DISTILLER.STUDENT)
        teacher = build_teacher(cfg, meta.num_classes, meta.image_size)
        out[label] = correlation_difference(predict(student, test_loader, device), predict(teacher, test_loader, device))
    return out


def plot_logit_corr(diffs, path):
    plt = _pyplot()
    n = len(diffs)
    # constrained layout places the shared colour bar beside the panels, and the tight bounding box drops the
    # blank border a fixed figure size leaves around square heat maps.
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 1, 4), squeeze=False, layout="constrained")
    vmax = max(float(d.max()) for d in diffs.values())
    for ax, (label, d) in zip(axes[0], diffs.items()):
        im = ax.imshow(d.numpy(), cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"{label}\nmean |diff| {float(d.mean()):.4f}", fontsize=9)
        ax.set_xlabel("class")
        ax.set_ylabel("class")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=120, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (output/<run>)")
    p.add_argument("--labels", nargs="+", help="legend labels, one per RUN_DIR (default: from each config)")
    p.add_argument("--out", default="figures", help="folder for the PNG files (default: figures/)")
    p.add_argument("--logit-corr", action="store_true", help="also draw fig. 7 (runs the models on the test set)")
    p.add_argument("--device", default="cpu", help="for --logit-corr: cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        raise UserError(f"--labels has {len(args.labels)} names for {len(args.runs)} run directories")
    labels = args.labels or [run_label(run_config(d)) for d in args.runs]
    if len(set(labels)) != len(labels):
        raise UserError(f"two runs would share a legend label ({', '.join(labels)}); name them with --labels")
    for d in args.runs:
        run_config(d)  # every argument is a run directory, checked before any work
    runs = list(zip(labels, args.runs))
    os.makedirs(args.out, exist_ok=True)
    data = {}

    acc = accuracy_curves(runs)
    plot_accuracy(acc, os.path.join(args.out, "accuracy.png"))
    data["accuracy"] = acc
    print(f"{'run':<28} {'best test top-1':>15} {'last test top-1':>15}")
    for label, c in acc.items():
        best = max(c["test_top1"], default=None)
        last = c["test_top1"][-1] if c["test_top1"] else None
        print(f"{label:<28} {'-' if best is None else format(best, '.2f'):>15} "
              f"{'-' if last is None else format(last, '.2f'):>15}")

    losses = loss_curves(runs)
    plot_losses(losses, os.path.join(args.out, "losses.png"))
    data["losses"] = losses
    print(f"{'run':<28} {'last task loss':>14} {'last distill loss':>17}")
    for label, c in losses.items():
        t, d = (c["task"][-1], c["distill"][-1]) if c["epochs"] else (None, None)
        print(f"{label:<28} {'-' if t is None else format(t, '.4f'):>14} {'-' if d is None else format(d, '.4f'):>17}")
    written = ["accuracy.png", "losses.png"]

    cos = cosine_curves(runs)
    if cos:
        plot_cosines(cos, os.path.join(args.out, "cosines.png"))
        data["cosines"] = cos
        written.append("cosines.png")
        for label, c in cos.items():
            mean = lambda pts: sum(v for _, v in pts) / len(pts)  # noqa: E731
            print(f"{label:<28} mean cos(v_task, v) {mean(c['cos_task']):.3f}  "
                  f"mean cos(v_distill, v) {mean(c['cos_distill']):.3f}")

    if args.logit_corr:
        import torch

        diffs = logit_corr(runs, torch.device(args.device))
        if not diffs:
            raise UserError("--logit-corr needs at least one distillation run among the RUN_DIRs")
        plot_logit_corr(diffs, os.path.join(args.out, "logit_corr.png"))
        data["logit_corr_mean_abs_diff"] = {k: float(v.mean()) for k, v in diffs.items()}
        written.append("logit_corr.png")
        for label, v in data["logit_corr_mean_abs_diff"].items():
            print(f"{label:<28} mean |corr(student) - corr(teacher)| {v:.4f}")

    with open(os.path.join(args.out, "plot_data.json"), "w") as f:
        json.dump(data, f, indent=1)
    print(f"wrote {', '.join(os.path.join(args.out, w) for w in written + ['plot_data.json'])}")
    return 0


if __name__ == "__main__":
    run_cli(main)
