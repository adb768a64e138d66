"""Print the model zoo as a Markdown table: parameters, FLOPs at the dataset's input size, published teacher top-1.

    python tools/model_table.py [--datasets cifar100 tiny_imagenet imagenet] [--out model_table.md]   (paste into docs/models.md)

FLOPs are counted by torch.utils.flop_counter (2 per multiply-add) for one image, forward only, in eval mode.
"""

import argparse
import re

import _path  # noqa: F401
import torch
from torch.utils.flop_counter import FlopCounterMode

from mdistiller.models.teacher_ckpt import PUBLISHED_TOP1
from mdistiller.models import build_model, model_names

INPUT_SIZE = {"cifar100": 32, "tiny_imagenet": 64, "imagenet": 224}


def measure(name, dataset):
    model = build_model(name, dataset).eval()
    params = sum(p.numel() for p in model.parameters())
    x = torch.zeros(1, 3, INPUT_SIZE[dataset], INPUT_SIZE[dataset])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return params, counter.get_total_flops()


def natural_key(name):
    """resnet8 < resnet14 < resnet110: compare digit runs as numbers."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def table(datasets):
    lines = ["| dataset | model | input | params | FLOPs | published teacher top-1 |", "|---|---|---|---|---|---|"]
    for dataset in datasets:
        for name in sorted(model_names(dataset), key=natural_key):
            params, flops = measure(name, dataset)
            top1 = PUBLISHED_TOP1.get((dataset, name))
            size = INPUT_SIZE[dataset]
            lines.append(f"| {dataset} | {name} | {size}x{size} | {params / 1e6:.2f}M | "
                         f"{flops / 1e6:,.1f}M | {'' if top1 is None else f'{top1:.2f}'} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(INPUT_SIZE), choices=list(INPUT_SIZE))
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args()
    text = table(args.datasets)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
