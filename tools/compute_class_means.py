"""Compute (or find cached) the teacher class means KD++ uses, in one teacher pass over the training set.

    python tools/compute_class_means.py --cfg configs/cifar100/kdpp/resnet32x4_resnet8x4.yaml [--force] [KEY VALUE ...]

Training computes them itself when the cache is missing; this tool does it ahead of time (e.g. once, before
launching several ++ runs on one teacher). The cache is written next to the teacher checkpoint, named by the
checkpoint's SHA-256, the training images used (dataset, DATASET.TRAIN_SUBSET) and the recipe
(DINO.CLASS_MEANS_AUGMENT, DINO.CLASS_MEANS_DECIMALS): see mdistiller/distillers/class_means.py. Prints the cache path; --force recomputes even when a cache matches.
"""

import argparse

import _path  # noqa: F401

from mdistiller.config import load_config
from mdistiller.data import build_dataloaders
from mdistiller.engine.class_means import class_means_for_run
from mdistiller.models.teacher_ckpt import build_teacher
from mdistiller.utils.cli import parse_args_anywhere, run_cli
from mdistiller.utils.env import resolve_device


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="config file (YAML); its teacher, dataset and subset count")
    parser.add_argument("--force", action="store_true", help="recompute even when a matching cache exists")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs overriding the config")
    args = parse_args_anywhere(parser, argv)  # --force also after the KEY VALUE pairs
    cfg = load_config(args.cfg, args.opts)
    device = resolve_device(cfg.EXPERIMENT.DEVICE)
    _, _, meta = build_dataloaders(cfg, device)
    teacher = build_teacher(cfg, meta.num_classes, meta.image_size).to(device)
    means, counts, path = class_means_for_run(cfg, teacher, meta, device, force=args.force)
    print(f"{cfg.DISTILLER.TEACHER} class means: {means.shape[0]} classes x {means.shape[1]} dims over "
          f"{int(counts.sum())} {meta.name} training images -> {path}")


if __name__ == "__main__":
    run_cli(main)
