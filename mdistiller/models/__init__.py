"""The model zoo: build any model by name for a number of classes and an input size.

Our own architectures (the published CIFAR / Tiny-ImageNet / ImageNet networks, whose checkpoints the papers
release) are registered per input *family* under "<family>/<name>" with a constructor `fn(num_classes)`, because
the same name (e.g. ResNet18) is a different network at 32x32, 64x64 and 224x224. A model is built from the
family that has the name and whose native input size is nearest to the requested one; every family pools
adaptively, so any input size runs. Names with a library prefix ("timm:vit_small_patch16_224",
"torchvision:resnet18") come from those libraries' registries through models/external/.

The families (cifar/, tiny_imagenet/, imagenet/) list their modules explicitly, so adding a model is one new
file with `@MODEL_REGISTRY.register("<family>/<name>")` and its name in its family's list. All models follow the feature contract
documented in models/base.py.
"""

import math

from ..utils.errors import ConfigError
from .external import build_library_model  # imports timm / torchvision.models only when it builds a model
from .registry import MODEL_REGISTRY

# family -> the input size its architectures were designed for
FAMILY_SIZES = {"cifar": 32, "tiny_imagenet": 64, "imagenet": 224}
# The built-in datasets' (classes, input size): defaults for build_model(name, dataset) and the tools.
DATASET_SHAPES = {
    "cifar100": (100, 32),
    "fashion_mnist": (10, 32),
    "tiny_imagenet": (200, 64),
    "imagenet": (1000, 224),
}
LIBRARY_PREFIXES = ("timm:", "torchvision:")


def is_library_model(name):
    return name.startswith(LIBRARY_PREFIXES)


def folder_name(name):
    """`name` as a portable folder-name part: timm:vit_small_patch16_224 -> timm-vit_small_patch16_224."""
    return name.replace(":", "-")


def dataset_shape(dataset):
    """(classes, input size) of a built-in dataset."""
    if dataset not in DATASET_SHAPES:
        raise ConfigError(f"unknown dataset '{dataset}' for models; built-in: {', '.join(sorted(DATASET_SHAPES))} "
                          "(other data: pass num_classes and image_size)")
    return DATASET_SHAPES[dataset]


def num_classes_for(dataset):
    """Number of classes of a built-in dataset, the default classifier width of `build_model`."""
    return dataset_shape(dataset)[0]


def families_of(name):
    return [f for f in FAMILY_SIZES if f"{f}/{name}" in MODEL_REGISTRY]


def model_names(dataset=None):
    """Sorted names of our own models: all of them, or (given a built-in dataset) those of its input family."""
    if dataset is None:
        return sorted({key.split("/", 1)[1] for key in MODEL_REGISTRY.names()})
    size = dataset_shape(dataset)[1]
    return sorted(n for n in model_names() if FAMILY_SIZES[family_for(n, size)] == size)


def family_for(name, image_size):
    """The family whose architecture `name` runs at `image_size`: the one nearest in scale among those with it."""
    families = families_of(name)
    if not families:
        raise ConfigError(f"unknown model '{name}'; ours: {', '.join(model_names())}; or any timm / torchvision "
                          "model as timm:<name> / torchvision:<name>")
    return min(families, key=lambda f: abs(math.log(image_size / FAMILY_SIZES[f])))


def check_model_name(name, role="model"):
    """ConfigError naming `role` unless `name` is one of ours or has a library prefix (checked when built)."""
    if is_library_model(name):
        return
    if not families_of(name):
        raise ConfigError(f"config key {role}: unknown model '{name}'; ours: {', '.join(model_names())}; or any "
                          "timm / torchvision model as timm:<name> / torchvision:<name>")


def build_model(name, dataset=None, num_classes=None, image_size=None, pretrained=False):
    """Model `name` with `num_classes` outputs for `image_size` inputs. `dataset`, a built-in dataset's name,
    supplies whichever of the two is not given. `pretrained`: the library's weights (timm:/torchvision: only)."""
    if dataset is not None:
        classes, size = dataset_shape(dataset)
        num_classes = classes if num_classes is None else num_classes
        image_size = size if image_size is None else image_size
    if num_classes is None or image_size is None:
        raise TypeError("build_model needs num_classes and image_size (or a built-in dataset's name)")
    if is_library_model(name):
        return build_library_model(name, num_classes, image_size, pretrained)
    if pretrained:
        raise ConfigError(f"pretrained weights are for timm:/torchvision: models; '{name}' is one of ours: give its "
                          "checkpoint instead (DISTILLER.TEACHER_CKPT for a teacher)")
    return MODEL_REGISTRY.get(f"{family_for(name, image_size)}/{name}")(num_classes)


from . import cifar, imagenet, tiny_imagenet  # noqa: E402,F401  (the families; each registers its models)

__all__ = ["MODEL_REGISTRY", "DATASET_SHAPES", "build_model", "check_model_name", "dataset_shape", "family_for",
           "folder_name",
           "is_library_model", "model_names", "num_classes_for"]
