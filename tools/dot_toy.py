"""The toy experiment of the DOT appendix (A.2, figure 8): SGD and DOT on one 2-d logit vector.

    python tools/dot_toy.py [--out docs/dot_toy.png] [--steps 300] [--lr 0.1] [--alpha 0.5] [--delta 0.075]

A trainable pair of logits z, a cross-entropy loss towards class 1 (weight alpha) and a distillation loss towards
a constant teacher prediction p_T = (0.3, 0.7) (weight 1 - alpha, KL(p_T || softmax(z))), optimised from z = 0
by SGD with momentum mu and by DOT (task momentum mu - Delta, distillation momentum mu + Delta) through the
same DOTOptimizer the trainer uses. Prints both final predictions of class 1 and, with --out, plots them
against the iteration (figure 8).

Why DOT ends nearer the teacher: with constant gradients a momentum buffer settles at g / (1 - momentum), so
at DOT's fixed point the distillation gradient counts (1 - mu + Delta) / (1 - mu - Delta) times more than the
task gradient (7x at mu 0.9, Delta 0.075). SGD settles where alpha CE + (1 - alpha) KL is smallest, p = alpha +
(1 - alpha) 0.7 (0.85 at alpha 0.5); DOT where alpha CE + 7 (1 - alpha) KL is, p = 0.7375.
"""

import argparse
import json

import _path  # noqa: F401
import torch
import torch.nn.functional as F

from mdistiller.engine.dot import two_pass_grads
from mdistiller.engine.dot_optimizer import DOTOptimizer
from mdistiller.utils.cli import run_cli

TEACHER = (0.3, 0.7)


def optimise(delta, steps=300, lr=0.1, momentum=0.9, alpha=0.5):
    """Prediction of class 1 after each step, optimising from z = 0 with DOT at `delta` (0: SGD with momentum)."""
    z = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor(TEACHER, dtype=torch.float64)
    opt = DOTOptimizer([z], lr=lr, momentum=momentum, delta=delta)
    trajectory = []
    for _ in range(steps):
        log_p = F.log_softmax(z, dim=0)
        task = alpha * -log_p[1]
        distill = (1 - alpha) * (teacher * (teacher.log() - log_p)).sum()
        opt.step_with_grads(*two_pass_grads(task, distill, [z]))
        trajectory.append(float(torch.softmax(z.detach(), dim=0)[1]))
    return trajectory


def plot(curves, path, target):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for label, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, label=label, linewidth=1.6)
    ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"teacher prediction {target}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("student prediction of class 1")
    ax.set_title("DOT appendix A.2: CE towards class 1 + KD towards 0.7")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the figure to this PNG")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--delta", type=float, default=0.075)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the CE loss; the KD loss gets 1 - alpha")
    p.add_argument("--json", action="store_true", help="end with one JSON line of both final predictions")
    args = p.parse_args(argv)
    kw = dict(steps=args.steps, lr=args.lr, momentum=args.momentum, alpha=args.alpha)
    sgd, dot = optimise(0.0, **kw), optimise(args.delta, **kw)
    print(f"final prediction of class 1 (teacher {TEACHER[1]}):  SGD {sgd[-1]:.4f}  DOT {dot[-1]:.4f}")
    if args.out:
        plot({"SGD": sgd, f"DOT (Delta {args.delta})": dot}, args.out, TEACHER[1])
        print(f"wrote {args.out}")
    if args.json:
        print(json.dumps({"sgd": sgd[-1], "dot": dot[-1], "teacher": TEACHER[1]}))


if __name__ == "__main__":
    run_cli(main)
