"""What a plan's runs read from disk that is not there: datasets, teacher checkpoints, pretrained weights.

Planning reads configs only (plan.py, stages.py): it needs neither data nor weights. This module then looks, without
loading, building or downloading anything, for each input a run reads when it starts, and names every one that is
missing with the command (or, where no command can do it, the step) that puts it where the run looks:
- the dataset under DATASET.ROOT (Fashion-MNIST also in Debian's folder);
- the teacher: a published checkpoint (CIFAR-100 zoo, torchvision's ImageNet weights), a timm/torchvision
  library's pretrained weights, or the checkpoint of a teacher run; a checkpoint that another run of the same plan
  writes is not missing (that run's stage comes first);
- a student's pretrained weights (a library student with MODEL.STUDENT_PRETRAINED, a detection backbone with
  DETECTION.STUDENT_PRETRAINED), and a detection run's DETECTION.DINO.CLASS_MEANS_FILE.
The places are the ones the runs read (models/teacher_ckpt.py, models/external/pretrained.py, the data loaders),
so MDISTILLER_CKPT_DIR, TORCH_HOME and HF_HOME / HF_HUB_CACHE count here as there; a relative DATASET.ROOT or
checkpoint is looked for from the current directory, where runs started here run.
"""

import os
import re
import shlex
from dataclasses import dataclass

from ..data import fashion_mnist
from ..detection.models import _imagenet_weights
from ..detection.task import TORCHVISION_TEACHER
from ..distillers import DISTILLER_REGISTRY
from ..models import is_library_model
from ..models.external.pretrained import (fetch_command, split_library_name, timm_weights_file,
                                          torch_hub_checkpoints, torchvision_weights)
from ..models.teacher_ckpt import (TORCHVISION_WEIGHTS, default_teacher_ckpt, how_to_get,
                                   library_pretrained_teacher)
from ..utils.env import REPO_ROOT
from .stages import teacher_checkpoint

COCO_URL = "http://images.cocodataset.org"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


@dataclass(frozen=True)
class Need:
    kind: str  # dataset, teacher checkpoint, teacher weights, student weights, backbone weights or class means
    what: str  # the dataset or model, e.g. "CIFAR-100", "resnet32x4 (cifar100)", "timm:vit_small_patch16_224"
    path: str  # the file or folder the run reads (or where the library's cache keeps it)
    fetch: str  # the command that puts it there, or the step where no command can


def _q(path):
    return shlex.quote(path)


def _download_ckpts_files():
    """The torchvision weight files `bash download_ckpts.sh imagenet` fetches (its TV_FILES line)."""
    try:
        with open(os.path.join(REPO_ROOT, "download_ckpts.sh")) as f:
            found = re.search(r'^TV_FILES="([^"]*)"', f.read(), re.M)
    except OSError:
        return ()
    return tuple(found.group(1).split()) if found else ()


def _hub_fetch(url):
    """The command that puts torchvision's weights file `url` in torch's hub cache (TORCH_HOME decides where)."""
    if os.path.basename(url) in _download_ckpts_files():
        return "bash download_ckpts.sh imagenet"
    return f"python -c \"import torch; torch.hub.load_state_dict_from_url('{url}')\""


def _hub_need(kind, what, url):
    path = os.path.join(torch_hub_checkpoints(), os.path.basename(url))
    return [] if os.path.isfile(path) else [Need(kind, what, path, _hub_fetch(url))]


# ---------------------------------------------------------------- datasets

def _cifar100(root):
    folder = os.path.join(root, "cifar-100-python")
    if all(os.path.isfile(os.path.join(folder, s)) for s in ("train", "test")):
        return []
    return [Need("dataset", "CIFAR-100", folder + os.sep,
                 f"python -c \"import torchvision; torchvision.datasets.CIFAR100('{root}', download=True)\"")]


def _fashion_mnist(root):
    raw = os.path.join(root, "FashionMNIST", "raw")
    if fashion_mnist._locate(fashion_mnist.DEBIAN_FASHION_MNIST_DIR) or fashion_mnist._locate(raw):
        return []
    if os.path.normpath(root) == "data":  # where tools/fetch_data.sh's download goes, from the repository root
        fetch = "bash tools/fetch_data.sh"
    else:
        fetch = ("python -c \"import torchvision; [torchvision.datasets.FashionMNIST('" + root
                 + "', train=t, download=True) for t in (True, False)]\"")
    return [Need("dataset", "Fashion-MNIST", raw + os.sep, fetch)]


def _tiny_imagenet(root):
    base = os.path.join(root, "tiny-imagenet-200")
    train, val = os.path.join(base, "train"), os.path.join(base, "val")
    sort = f"python tools/prepare_tiny_imagenet.py {_q(base)}"
    if not (os.path.isdir(train) and os.path.isdir(val)):
        return [Need("dataset", "Tiny-ImageNet", base + os.sep,
                     f"curl -LO {TINY_IMAGENET_URL} && unzip -q tiny-imagenet-200.zip -d {_q(root)} && {sort}")]
    if os.path.isdir(os.path.join(val, "images")):  # the archive's flat validation folder, not sorted yet
        return [Need("dataset", "Tiny-ImageNet (val/ sorted into class folders)", val + os.sep, sort)]
    return []


def _imagenet(root):
    base = os.path.join(root, "imagenet")
    if all(os.path.isdir(os.path.join(base, s)) for s in ("train", "val")):
        return []
    return [Need("dataset", "ImageNet-1k", base + os.sep,
                 f"no public download (sign-in at https://image-net.org): unpack ILSVRC2012's train images as "
                 f"{base}/train/<wnid>/*.JPEG and its val images in {base}/val/, then `python "
                 f"tools/prepare_imagenet_val.py {_q(os.path.join(base, 'val'))} --labels LOC_val_solution.csv`")]


def _coco(root):
    paths = [os.path.join(root, "annotations", f"instances_{s}2017.json") for s in ("train", "val")]
    paths += [os.path.join(root, f"{s}2017") for s in ("train", "val")]
    if all(os.path.exists(p) for p in paths):
        return []
    return [Need("dataset", "COCO 2017", root + os.sep,
                 f"for f in zips/train2017.zip zips/val2017.zip annotations/annotations_trainval2017.zip; do "
                 f"curl -LO {COCO_URL}/$f && unzip -q -d {_q(root)} $(basename $f); done")]


def _image_folder(root):
    if all(os.path.isdir(os.path.join(root, s)) for s in ("train", "val")):
        return []
    return [Need("dataset", "image_folder", root + os.sep,
                 f"your own images as {root}/train/<class>/ and {root}/val/<class>/ (docs/datasets.md)")]


DATASETS = {"cifar100": _cifar100, "fashion_mnist": _fashion_mnist, "tiny_imagenet": _tiny_imagenet,
            "imagenet": _imagenet, "coco": _coco, "image_folder": _image_folder}


def dataset_needs(cfg):
    check = DATASETS.get(cfg.DATASET.TYPE)
    return check(cfg.DATASET.ROOT) if check else []


# ---------------------------------------------------------------- weights

def _library_need(kind, name, key):
    """A timm:/torchvision: model's pretrained weights in its library's cache (models/external/pretrained.py)."""
    library, model = split_library_name(name)
    if library == "timm":
        path, _, where = timm_weights_file(model, name, key)
    else:
        _, where = torchvision_weights(model, name, key)
        path = where if os.path.isfile(where) else None
    if path:
        return []
    return [Need(kind, name, where, f"{fetch_command(name)} (on a machine with internet; then copy its cache "
                                   "folder here)")]


def _detection_teacher(cfg, planned):
    ckpt = teacher_checkpoint(cfg)
    if ckpt == TORCHVISION_TEACHER:
        from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

        return _hub_need("teacher weights", "torchvision Faster R-CNN R50-FPN (COCO)",
                         FasterRCNN_ResNet50_FPN_Weights.COCO_V1.url)
    if not ckpt or planned or os.path.isfile(ckpt):
        return []
    teacher = cfg.DISTILLER.TEACHER
    return [Need("teacher checkpoint", f"{teacher} (coco)", ckpt,
                 f"python tools/train.py --cfg configs/coco/teacher/{teacher}.yaml, then point "
                 "DISTILLER.TEACHER_CKPT at its student_best.pth")]


def teacher_needs(cfg, planned=False):
    """`planned`: the teacher checkpoint is written by a run of the same plan (StagedRun.reads)."""
    if cfg.TASK == "detection":
        return _detection_teacher(cfg, planned)
    if not DISTILLER_REGISTRY.loads_teacher(cfg):
        return []
    name, dataset = cfg.DISTILLER.TEACHER, cfg.DATASET.TYPE
    if library_pretrained_teacher(cfg):
        return _library_need("teacher weights", name, "MODEL.TEACHER_PRETRAINED")
    path = cfg.DISTILLER.TEACHER_CKPT or default_teacher_ckpt(cfg)
    if planned or os.path.isfile(path):
        return []
    if not cfg.DISTILLER.TEACHER_CKPT and dataset == "cifar100":
        fetch = "bash download_ckpts.sh"
    elif not cfg.DISTILLER.TEACHER_CKPT and dataset == "imagenet" and name in TORCHVISION_WEIGHTS:
        fetch = _hub_fetch(TORCHVISION_WEIGHTS[name])
    else:
        fetch = how_to_get(cfg)
    return [Need("teacher checkpoint", f"{name} ({dataset})", path, fetch)]


def student_needs(cfg):
    if cfg.TASK == "detection":
        needs = []
        if cfg.DETECTION.STUDENT_PRETRAINED:
            needs += _hub_need("backbone weights", f"{cfg.DISTILLER.STUDENT} (ImageNet)",
                               _imagenet_weights(cfg.DISTILLER.STUDENT).url)
        means = cfg.DETECTION.DINO.CLASS_MEANS_FILE
        if means and not os.path.isfile(means):
            needs.append(Need("class means", cfg.DISTILLER.TEACHER, means,
                              "KD++'s class-means JSON of this teacher, or leave DETECTION.DINO.CLASS_MEANS_FILE "
                              "empty (the run collects the means)"))
        return needs
    if cfg.MODEL.STUDENT_PRETRAINED and is_library_model(cfg.DISTILLER.STUDENT):
        return _library_need("student weights", cfg.DISTILLER.STUDENT, "MODEL.STUDENT_PRETRAINED")
    return []


def run_needs(staged_run):
    """Every missing input of one StagedRun (its resolved config)."""
    cfg = staged_run.cfg
    return dataset_needs(cfg) + teacher_needs(cfg, bool(staged_run.reads)) + student_needs(cfg)


def missing_inputs(staged):
    """[(Need, number of runs that read it)] over a plan's StagedRuns, each input once, in plan order."""
    counts = {}
    for s in staged:
        for need in dict.fromkeys(run_needs(s)):
            counts[need] = counts.get(need, 0) + 1
    return list(counts.items())
