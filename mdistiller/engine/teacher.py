"""Where a teacher's weights come from, and loading them with errors that say how to get the right file.

DISTILLER.TEACHER_CKPT empty means "the usual place":
- cifar100: the published teacher zoo, `<ckpt dir>/cifar_teachers/<name>_vanilla/ckpt_epoch_240.pth`, as
  `download_ckpts.sh` unpacks it (ckpt dir: $MDISTILLER_CKPT_DIR, default download_ckpts/ in the checkout);
- tiny_imagenet: `<ckpt dir>/tiny_imagenet_teachers/<name>_vanilla/ti_res18`, the published layout;
- imagenet: torchvision's ImageNet weights in torch's hub cache, downloaded on first use when online;
- fashion_mnist: no published teachers; the student_best.pth of our own vanilla run of the teacher
  (configs/fashion_mnist/vanilla/<name>.yaml, seed 0) under LOG.PREFIX.
"""

import os

import torch

from ..models import build_model
from ..utils.checkpoint import load_weights
from ..utils.env import REPO_ROOT
from ..utils.errors import CheckpointError

# Published top-1 of the teachers the papers use (../shared/reference; protocols.md for resnet110).
PUBLISHED_TOP1 = {
    ("cifar100", "resnet56"): 72.34, ("cifar100", "resnet110"): 74.31, ("cifar100", "resnet32x4"): 79.42,
    ("cifar100", "ResNet50"): 79.34, ("cifar100", "wrn_40_2"): 75.61, ("cifar100", "vgg13"): 74.64,
    ("tiny_imagenet", "ResNet18"): 62.99,
    ("imagenet", "ResNet34"): 73.31, ("imagenet", "ResNet50"): 76.16,
}

# torchvision's ImageNet-1k weights (IMAGENET1K_V1): the file name carries the first hex digits of its SHA-256.
TORCHVISION_WEIGHTS = {
    "ResNet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "ResNet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "ResNet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "ResNet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    "ResNet152": "https://download.pytorch.org/models/resnet152-394f9c45.pth",
    "MobileNetV2": "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
}


def ckpt_dir():
    return os.environ.get("MDISTILLER_CKPT_DIR") or os.path.join(REPO_ROOT, "download_ckpts")


def torchvision_weights_path(name):
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(TORCHVISION_WEIGHTS[name]))


def default_teacher_ckpt(cfg):
    name, dataset = cfg.DISTILLER.TEACHER, cfg.DATASET.TYPE
    if dataset == "cifar100":
        return os.path.join(ckpt_dir(), "cifar_teachers", f"{name}_vanilla", "ckpt_epoch_240.pth")
    if dataset == "tiny_imagenet":
        return os.path.join(ckpt_dir(), "tiny_imagenet_teachers", f"{name}_vanilla", "ti_res18")
    if dataset == "imagenet" and name in TORCHVISION_WEIGHTS:
        return torchvision_weights_path(name)
    run = f"{dataset}_none_{name}_vanilla_seed0"
    return os.path.join(cfg.LOG.PREFIX, run, "student_best.pth")


def how_to_get(cfg):
    name, dataset = cfg.DISTILLER.TEACHER, cfg.DATASET.TYPE
    train = f"train it with `python tools/train.py --cfg configs/{dataset}/vanilla/{name}.yaml`"
    if dataset == "cifar100":
        return f"run `bash download_ckpts.sh` for the published teachers, or {train} and set DISTILLER.TEACHER_CKPT"
    if dataset == "imagenet" and name in TORCHVISION_WEIGHTS:
        return (f"download {TORCHVISION_WEIGHTS[name]} to {torchvision_weights_path(name)} "
                f"(`bash download_ckpts.sh imagenet` does), or set DISTILLER.TEACHER_CKPT")
    return f"{train}, or set DISTILLER.TEACHER_CKPT to its checkpoint"


def _fetch_torchvision(name, path):
    """Download torchvision weights to the hub cache when online; on failure the caller reports how to get them."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.hub.download_url_to_file(TORCHVISION_WEIGHTS[name], path, hash_prefix=None, progress=True)
    except Exception:  # offline, proxy, HTTP error: the missing-file message below says what to do
        if os.path.exists(path):
            os.remove(path)


def teacher_ckpt_path(cfg):
    path = cfg.DISTILLER.TEACHER_CKPT or default_teacher_ckpt(cfg)
    name = cfg.DISTILLER.TEACHER
    if (not cfg.DISTILLER.TEACHER_CKPT and cfg.DATASET.TYPE == "imagenet" and name in TORCHVISION_WEIGHTS
            and not os.path.exists(path)):
        _fetch_torchvision(name, path)
    return path


def build_teacher(cfg, num_classes):
    """The teacher model with its weights loaded strictly; every failure is one CheckpointError line."""
    name = cfg.DISTILLER.TEACHER
    teacher = build_model(name, cfg.DATASET.TYPE, num_classes)
    path = teacher_ckpt_path(cfg)
    if not os.path.isfile(path):
        raise CheckpointError(f"teacher checkpoint for {name} ({cfg.DATASET.TYPE}) not found at {path}; "
                              f"{how_to_get(cfg)}")
    return load_weights(teacher, path, name, how_to_get(cfg))
