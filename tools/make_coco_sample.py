"""Write a small generated dataset in COCO 2017's layout (COCO's 80 categories, three of them drawn), to try
TASK detection without COCO:

    python tools/make_coco_sample.py data/coco_sample [--train 16 --val 8 --width 96 --height 72]
"""

import argparse

import _path  # noqa: F401

from mdistiller.detection.sample import write_sample_coco
from mdistiller.utils.cli import run_cli


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root")
    p.add_argument("--train", type=int, default=16)
    p.add_argument("--val", type=int, default=8)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--height", type=int, default=72)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    write_sample_coco(a.root, a.train, a.val, a.width, a.height, seed=a.seed)
    print(f"wrote {a.train} train / {a.val} val images in COCO's layout under {a.root}")


if __name__ == "__main__":
    run_cli(main)
