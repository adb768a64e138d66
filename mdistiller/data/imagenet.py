"""ImageNet-1k as class-per-folder trees <ROOT>/imagenet/{train,val}/<wnid>/*.JPEG, standard 224 recipe.

The validation split must already be sorted into class folders: tools/prepare_imagenet_val.py does it once, which
is left to the user rather than done here so that loading never moves files behind the user's back.
"""

import os

from torchvision import transforms

from ..utils.errors import DataError
from .image_folder import class_dirs, folder_bundle
from .registry import DATASET_REGISTRY

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
FOLDER = "imagenet"


def transforms_for(train):
    if train:
        ops = [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip()]
    else:
        ops = [transforms.Resize(256), transforms.CenterCrop(224)]
    return transforms.Compose(ops + [transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


@DATASET_REGISTRY.register("imagenet")
def load(cfg):
    base = os.path.join(cfg.DATASET.ROOT, FOLDER)
    train_dir, val_dir = os.path.join(base, "train"), os.path.join(base, "val")
    for d in (train_dir, val_dir):
        if not os.path.isdir(d):
            raise DataError(f"ImageNet not found: expected {d}/<wnid>/*.JPEG (class-per-folder train and val "
                            f"splits under {base}); set DATASET.ROOT to the folder that contains imagenet/")
    sort = (f"`python tools/prepare_imagenet_val.py {val_dir} --labels LOC_val_solution.csv` (or a 'filename wnid' "
            "file, or the ILSVRC2012 devkit folder) sorts it")
    if not class_dirs(val_dir):
        raise DataError(f"{val_dir} has no class folders (ImageNet's flat validation folder?); {sort}")
    return folder_bundle("imagenet", train_dir, val_dir, 224, MEAN, STD, transforms_for,
                         fix=f"sort val/ into one folder per class, as train/ is: {sort}")
