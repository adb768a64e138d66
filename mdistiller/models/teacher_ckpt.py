"""Where a teacher's weights come from, and loading them with errors that say how to get the right file.

DISTILLER.TEACHER_CKPT empty means "the usual place":
- cifar100: the published teacher zoo, `<ckpt dir>/cifar_teachers/<name>_vanilla/ckpt_epoch_240.pth`, as
  `download_ckpts.sh` unpacks it (ckpt dir: $MDISTILLER_CKPT_DIR, default download_ckpts/ in the checkout);
- tiny_imagenet: `<ckpt dir>/tiny_imagenet_teachers/<name>_vanilla/ti_res18`, the published layout;
- imagenet: torchvision's ImageNet weights in torch's hub cache, downloaded on first use when online;
- fashion_mnist: no published teachers; the student_best.pth of our own vanilla run of the teacher
  (configs/fashion_mnist/vanilla/<name>.yaml, seed 0) under LOG.PREFIX.
A timm:/torchvision: teacher with MODEL.TEACHER_PRETRAINED uses its library's weights from the local cache
(models/external/pretrained.py), which must classify the run's classes.
"""

import json
import os
import shlex
import warnings

import torch

from ..config import get_cfg_defaults
from . import build_model, dataset_shape, folder_name, is_library_model
from .external import build_library_model, pretrained_num_classes, pretrained_weights_file
from ..data.fingerprint import file_sha256
from ..utils.checkpoint import checkpoint_top1, load_file, load_weights
from ..utils.env import REPO_ROOT
from ..utils.errors import CheckpointError

# Published top-1 of the teachers the papers use (the DOT, DKD and KD++ papers; RepDistiller for resnet110).
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


def library_pretrained_teacher(cfg):
    """Whether the teacher's weights are its library's pretrained ones: a timm:/torchvision: teacher, no
    DISTILLER.TEACHER_CKPT, MODEL.TEACHER_PRETRAINED."""
    return (is_library_model(cfg.DISTILLER.TEACHER) and not cfg.DISTILLER.TEACHER_CKPT
            and cfg.MODEL.TEACHER_PRETRAINED)


def default_teacher_ckpt(cfg):
    name, dataset = cfg.DISTILLER.TEACHER, cfg.DATASET.TYPE
    if library_pretrained_teacher(cfg):
        return pretrained_weights_file(name, "MODEL.TEACHER_PRETRAINED")
    if dataset == "cifar100":
        return os.path.join(ckpt_dir(), "cifar_teachers", f"{name}_vanilla", "ckpt_epoch_240.pth")
    if dataset == "tiny_imagenet":
        return os.path.join(ckpt_dir(), "tiny_imagenet_teachers", f"{name}_vanilla", "ti_res18")
    if dataset == "imagenet" and name in TORCHVISION_WEIGHTS:
        return torchvision_weights_path(name)
    return teacher_run_ckpt(cfg)


def teacher_train_command(cfg):
    """The tools/train.py command that trains DISTILLER.TEACHER alone where this run looks for it: the teacher's
    vanilla config under this run's LOG.PREFIX (and DATASET.ROOT), so following the hint from the directory the
    run was started in writes `<LOG.PREFIX>/<dataset>_none_<teacher>_vanilla_seed0/student_best.pth`."""
    name, dataset = cfg.DISTILLER.TEACHER, cfg.DATASET.TYPE
    here = os.path.abspath(os.getcwd()) == os.path.abspath(REPO_ROOT)
    script, config = os.path.join("tools", "train.py"), os.path.join("configs", dataset, "vanilla", f"{name}.yaml")
    if not here:  # paths the command needs wherever it is typed
        script, config = os.path.join(REPO_ROOT, script), os.path.join(REPO_ROOT, config)
    words = ["python", script, "--cfg", config]
    if not os.path.isfile(os.path.join(REPO_ROOT, "configs", dataset, "vanilla", f"{name}.yaml")):
        # no config file for this model: the dataset's vanilla recipe with the model and tag its files set
        words[-1] = os.path.join(os.path.dirname(config), "_recipe.yaml")
        words += ["DISTILLER.STUDENT", name, "EXPERIMENT.TAG", "vanilla"]
    words += ["LOG.PREFIX", cfg.LOG.PREFIX]
    if cfg.DATASET.ROOT != get_cfg_defaults().DATASET.ROOT:  # the teacher trains on the same copy of the data
        words += ["DATASET.ROOT", cfg.DATASET.ROOT]
    words += _dataset_section_pairs(cfg)
    return " ".join(shlex.quote(w) for w in words)


def _dataset_section_pairs(cfg):
    """KEY VALUE words for the keys of the dataset's own config section (IMAGE_FOLDER for image_folder: input size,
    normalisation) that differ from their defaults, so the teacher is trained on the same inputs."""
    section, defaults = cfg.DATASET.TYPE.upper(), get_cfg_defaults()
    if section not in cfg or section not in defaults:
        return []
    return [w for key, value in cfg[section].items() if value != defaults[section][key]
            for w in (f"{section}.{key}", str(value))]


def teacher_run_ckpt(cfg):
    """Where teacher_train_command's run leaves the teacher's best weights."""
    run = f"{cfg.DATASET.TYPE}_none_{folder_name(cfg.DISTILLER.TEACHER)}_vanilla_seed0"
    return os.path.join(cfg.LOG.PREFIX, run, "student_best.pth")


def how_to_get(cfg):
    name, dataset = cfg.DISTILLER.TEACHER, cfg.DATASET.TYPE
    train = f"train it with `{teacher_train_command(cfg)}`"
    then_set = f" and set DISTILLER.TEACHER_CKPT {teacher_run_ckpt(cfg)}"
    if dataset == "cifar100":
        return f"run `bash download_ckpts.sh` for the published teachers, or {train}{then_set}"
    if dataset == "imagenet" and name in TORCHVISION_WEIGHTS:
        return (f"download {TORCHVISION_WEIGHTS[name]} to {torchvision_weights_path(name)} "
                f"(`bash download_ckpts.sh imagenet` does), or set DISTILLER.TEACHER_CKPT")
    if cfg.DISTILLER.TEACHER_CKPT or default_teacher_ckpt(cfg) != teacher_run_ckpt(cfg):
        return f"{train}{then_set}, or set DISTILLER.TEACHER_CKPT to a checkpoint you have"
    return f"{train} (it lands at {teacher_run_ckpt(cfg)}, where this run looks), or set DISTILLER.TEACHER_CKPT"


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


def build_teacher(cfg, num_classes, image_size=None):
    """The teacher model with its weights loaded strictly; every failure is one CheckpointError line.
    `image_size`: the input size (default: the built-in dataset's)."""
    name = cfg.DISTILLER.TEACHER
    if image_size is None:
        image_size = dataset_shape(cfg.DATASET.TYPE)[1]
    if library_pretrained_teacher(cfg):
        return _library_teacher(name, num_classes, image_size)
    teacher = build_model(name, num_classes=num_classes, image_size=image_size)
    path = teacher_ckpt_path(cfg)
    if not os.path.isfile(path):
        raise CheckpointError(f"teacher checkpoint for {name} ({cfg.DATASET.TYPE}) not found at {path}; "
                              f"{how_to_get(cfg)}")
    if teacher_run_finished(path) is False:
        warnings.warn(f"teacher checkpoint {path} belongs to a training run that has not finished (its folder has "
                      "config.yaml but no summary.json): this run distils from a partly trained teacher; finish "
                      "or --resume the teacher's run first", stacklevel=2)
    return load_weights(teacher, path, name, how_to_get(cfg))


def _library_teacher(name, num_classes, image_size):
    """The teacher with its library's pretrained weights, which must classify this run's classes."""
    classes = pretrained_num_classes(name, "MODEL.TEACHER_PRETRAINED")
    if classes != num_classes:
        raise CheckpointError(
            f"DISTILLER.TEACHER {name}: its library's pretrained weights classify {classes} classes and this "
            f"dataset has {num_classes}: fine-tune the teacher on this dataset first (train it as a student: "
            f"DISTILLER.TYPE NONE DISTILLER.STUDENT {name} MODEL.STUDENT_PRETRAINED True), then pass that run's "
            "student_best.pth as DISTILLER.TEACHER_CKPT")
    return build_library_model(name, num_classes, image_size, True, "MODEL.TEACHER_PRETRAINED")


def teacher_run_finished(path):
    """For a checkpoint our trainer wrote into a run directory (student_best.pth, latest.pth, ...): whether that
    run has finished (summary.json is written after its last epoch). None for any other file."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(path) not in _RUN_FILE_TOP1 or not os.path.isfile(os.path.join(folder, "config.yaml")):
        return None
    return os.path.isfile(os.path.join(folder, "summary.json"))


# Which summary.json figure describes a checkpoint file of one of our runs, by its name.
_RUN_FILE_TOP1 = {"student_best.pth": "best_top1", "best.pth": "best_top1",
                  "student_last.pth": "last_top1", "latest.pth": "last_top1"}


def _teacher_top1(cfg, path):
    """(test top-1, source) of the teacher weights at `path`, from what exists, else (None, None): the number the
    checkpoint holds, then the summary.json of the run that wrote it, then the published figure for the published
    checkpoint at its default location."""
    top1, source = checkpoint_top1(load_file(path, "teacher checkpoint"))
    if top1 is not None:
        return top1, source
    key = _RUN_FILE_TOP1.get(os.path.basename(path))
    summary = os.path.join(os.path.dirname(path), "summary.json")
    if key and os.path.isfile(summary):
        try:
            with open(summary) as f:
                value = json.load(f).get(key)
            if isinstance(value, (int, float)):
                return float(value), f"{summary} {key}"
        except (OSError, ValueError):
            pass
    published = PUBLISHED_TOP1.get((cfg.DATASET.TYPE, cfg.DISTILLER.TEACHER))
    if published is not None and not cfg.DISTILLER.TEACHER_CKPT:
        return published, "published top-1 of this teacher (default checkpoint location)"
    return None, None


def teacher_record(cfg):
    """What summary.json records about the teacher a run loaded: {"name", "checkpoint" (absolute path), "sha256"
    (of the file's content, full hex), "top1" (its test top-1 when known, else None), "top1_source"}. The run's
    config.yaml keeps DISTILLER.TEACHER_CKPT as the user gave it (often empty: the default location)."""
    path = os.path.abspath(teacher_ckpt_path(cfg))
    # library weights (often safetensors) carry no top-1 on this dataset
    top1, source = (None, None) if library_pretrained_teacher(cfg) else _teacher_top1(cfg, path)
    return {"name": cfg.DISTILLER.TEACHER, "checkpoint": path, "sha256": file_sha256(path), "top1": top1,
            "top1_source": source, "run_finished": teacher_run_finished(path)}
