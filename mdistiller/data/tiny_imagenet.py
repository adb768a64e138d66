"""Tiny-ImageNet (200 classes, 64x64) from the official archive's layout under <ROOT>/tiny-imagenet-200/.

The official validation split is one flat folder plus an annotation file; it must be sorted into class folders
once by tools/prepare_tiny_imagenet.py, which is left to the user rather than done here so that loading never
moves files behind the user's back.
"""

import os

from torchvision import transforms

from ..utils.errors import DataError
from .image_folder import folder_bundle
from .registry import DATASET_REGISTRY

MEAN = (0.4802, 0.4481, 0.3975)
STD = (0.2302, 0.2265, 0.2262)
FOLDER = "tiny-imagenet-200"


def transforms_for(train):
    ops = [transforms.RandomRotation(20), transforms.RandomHorizontalFlip()] if train else []
    return transforms.Compose(ops + [transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


@DATASET_REGISTRY.register("tiny_imagenet")
def load(cfg):
    base = os.path.join(cfg.DATASET.ROOT, FOLDER)
    train_dir, val_dir = os.path.join(base, "train"), os.path.join(base, "val")
    for d in (train_dir, val_dir):
        if not os.path.isdir(d):
            raise DataError(f"Tiny-ImageNet not found: {d} is missing; download "
                            f"http://cs231n.stanford.edu/tiny-imagenet-200.zip, unzip it in {cfg.DATASET.ROOT}, "
                            f"then run `python tools/prepare_tiny_imagenet.py {base}`")
    if os.path.isdir(os.path.join(val_dir, "images")):
        raise DataError(f"{val_dir} is not sorted into class folders yet; run "
                        f"`python tools/prepare_tiny_imagenet.py {base}` once")
    return folder_bundle("tiny_imagenet", train_dir, val_dir, 64, MEAN, STD, transforms_for,
                         fix=f"re-extract the archive and run `python tools/prepare_tiny_imagenet.py {base}`")
