"""Opening class-per-folder image trees (ImageNet, prepared Tiny-ImageNet) with user-fixable errors.

torchvision's ImageFolder numbers classes by the sorted folder names of each split separately; a split with a
missing or extra class would silently shift every label after it, so the class lists are checked to agree.
"""

import os

import torch
from torchvision.datasets import ImageFolder

from ..utils.errors import DataError
from .bundle import DatasetBundle, FolderSplit


def class_dirs(path):
    """Sorted names of the sub-folders of `path` (the classes, for a class-per-folder tree)."""
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise DataError(f"cannot list {path}: {e}") from None


def check_same_classes(train_dir, other_dir, fix=""):
    train, other = class_dirs(train_dir), class_dirs(other_dir)
    if train != other:
        missing, extra = sorted(set(train) - set(other)), sorted(set(other) - set(train))
        raise DataError(f"{other_dir} does not have the classes of {train_dir}: missing {missing[:5]}"
                        f"{'...' if len(missing) > 5 else ''}, extra {extra[:5]}{'...' if len(extra) > 5 else ''}"
                        f"{'; ' + fix if fix else ''}")
    return train


def open_folder(path, transform, classes):
    """A FolderSplit over `path` whose labels index `classes` (the training split's sorted class list)."""
    try:
        dataset = ImageFolder(path, transform=transform)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"cannot read the image folder {path}: {e}") from None
    if dataset.classes != list(classes):
        raise DataError(f"{path} has classes {dataset.classes[:3]}... but the training split has "
                        f"{list(classes)[:3]}...; the splits must have the same class folders")
    return FolderSplit(dataset, torch.tensor(dataset.targets, dtype=torch.int64))


def folder_bundle(name, train_dir, val_dir, image_size, mean, std, transforms_for, fix):
    """The DatasetBundle of a class-per-folder dataset whose train and val splits share one class list;
    `transforms_for(train)` gives each split's per-sample transform, `fix` says how to repair mismatched splits."""
    classes = check_same_classes(train_dir, val_dir, fix=fix)
    if not classes:
        raise DataError(f"{train_dir} has no class folders")
    return DatasetBundle(name=name, num_classes=len(classes), image_size=image_size, mean=mean, std=std,
                         train=lambda: open_folder(train_dir, transforms_for(True), classes),
                         test=lambda: open_folder(val_dir, transforms_for(False), classes),
                         sources=(train_dir, val_dir), classes=tuple(classes))
