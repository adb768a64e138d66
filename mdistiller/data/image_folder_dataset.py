"""Your own images (DATASET.TYPE image_folder): DATASET.ROOT/{train,val}/<class>/<image files>.

Classes are the sorted folder names of train/ (val/ must have the same ones); any file torchvision's ImageFolder
reads counts as an image. The input size, normalisation and resizing live in this dataset's own config section
IMAGE_FOLDER, registered with it, so a run's config.yaml holds everything tools/eval.py --run-config needs.
Checks run before any split is opened so that a malformed tree is one DataError naming the folder and the fix,
not ImageFolder's error about a class list.
"""

import math
import os

from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from yacs.config import CfgNode as CN

from ..utils.errors import ConfigError, DataError
from .image_folder import check_same_classes, class_dirs, folder_bundle
from .registry import DATASET_REGISTRY

# "crop": RandomResizedCrop + flip for training, Resize(size * 256 / 224) + CenterCrop for testing (the ImageNet
# recipe, for photos larger than the input); "resize": the whole image resized to size x size (+ flip for
# training), for images already about the input size, where cropping would cut away most of each image.
TRANSFORMS = ("crop", "resize")

_cfg = CN()
_cfg.IMAGE_SIZE = 224  # the models' input: square, IMAGE_SIZE x IMAGE_SIZE
_cfg.MEAN = [0.485, 0.456, 0.406]  # per-channel normalisation (RGB, of pixels in [0, 1]); ImageNet's by default
_cfg.STD = [0.229, 0.224, 0.225]
_cfg.TRANSFORM = "crop"  # crop or resize, see TRANSFORMS above


def transforms_for(train, size, mode, mean, std):
    """The per-sample PIL transform of one split."""
    if mode == "resize":
        ops = [transforms.Resize((size, size))] + ([transforms.RandomHorizontalFlip()] if train else [])
    elif train:
        ops = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
    else:  # the ImageNet ratio: crop 224 of 256
        ops = [transforms.Resize(math.floor(size * 256 / 224)), transforms.CenterCrop(size)]
    return transforms.Compose(ops + [transforms.ToTensor(), transforms.Normalize(mean, std)])


def _has_image(folder):
    """Whether `folder` (searched recursively, as ImageFolder does) holds a file ImageFolder would read."""
    for _, _, files in os.walk(folder, followlinks=True):
        if any(has_file_allowed_extension(f, IMG_EXTENSIONS) for f in files):
            return True
    return False


def check_tree(root):
    """The class names of a valid DATASET.ROOT/{train,val}/<class>/ tree; a DataError for the first problem."""
    layout = "DATASET.ROOT must hold train/<class>/<images> and val/<class>/<images>, one folder per class"
    if not os.path.isdir(root):
        raise DataError(f"image_folder: {root} is not a directory; set DATASET.ROOT to your dataset's folder "
                        f"({layout})")
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    for d in (train_dir, val_dir):
        if not os.path.isdir(d):
            raise DataError(f"image_folder: {d} not found; {layout}")
    classes = class_dirs(train_dir)
    if not classes:
        raise DataError(f"image_folder: {train_dir} has no class folders; put each class's images in "
                        f"{train_dir}/<class>/")
    check_same_classes(train_dir, val_dir, fix=f"give {val_dir} one folder (with images) per class of {train_dir}")
    exts = " ".join(IMG_EXTENSIONS)
    for split_dir in (train_dir, val_dir):
        for c in classes:
            if not _has_image(os.path.join(split_dir, c)):
                raise DataError(f"image_folder: {os.path.join(split_dir, c)} holds no image file ({exts}); add "
                                f"images to it, or remove class {c} from both train/ and val/")
    return classes


def _validate(cfg):
    c = cfg.IMAGE_FOLDER
    if c.IMAGE_SIZE <= 0:
        raise ConfigError(f"config key IMAGE_FOLDER.IMAGE_SIZE: must be > 0 pixels, got {c.IMAGE_SIZE}")
    for key in ("MEAN", "STD"):
        if len(c[key]) != 3:
            raise ConfigError(f"config key IMAGE_FOLDER.{key}: needs 3 values (R, G, B), got {list(c[key])}")
    if min(c.STD) <= 0:
        raise ConfigError(f"config key IMAGE_FOLDER.STD: every value must be > 0, got {list(c.STD)}")
    if c.TRANSFORM not in TRANSFORMS:
        raise ConfigError(f"config key IMAGE_FOLDER.TRANSFORM: must be one of {', '.join(TRANSFORMS)}, "
                          f"got '{c.TRANSFORM}'")


@DATASET_REGISTRY.register("image_folder", config=_cfg, section="IMAGE_FOLDER")
def load(cfg):
    root, c = cfg.DATASET.ROOT, cfg.IMAGE_FOLDER
    check_tree(root)
    size, mode, mean, std = int(c.IMAGE_SIZE), c.TRANSFORM, tuple(c.MEAN), tuple(c.STD)
    return folder_bundle("image_folder", os.path.join(root, "train"), os.path.join(root, "val"), size, mean, std,
                         lambda train: transforms_for(train, size, mode, mean, std),
                         fix="give val/ one folder per class of train/")


load.validate_config = _validate
