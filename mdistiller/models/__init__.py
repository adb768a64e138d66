"""The model zoo: build any registered model by (name, dataset).

Models are registered per input *family* under "<family>/<name>" with a constructor `fn(num_classes)`,
because the same name (e.g. ResNet18) is a different network at 32x32, 64x64 and 224x224. A dataset maps to
one family; Fashion-MNIST shares the CIFAR family since its loader brings images to 32x32 RGB.

Every subpackage (cifar/, and later tiny_imagenet/, imagenet/) and every module in it is imported
automatically, so adding a model is one new file with `@MODEL_REGISTRY.register("<family>/<name>")`.
All models follow the feature contract documented in models/base.py.
"""

from ..utils.autoimport import import_submodules
from ..utils.errors import ConfigError
from .registry import MODEL_REGISTRY

# DATASET.TYPE -> (model family, default number of classes)
_DATASETS = {
    "cifar100": ("cifar", 100),
    "fashion_mnist": ("cifar", 10),
    "tiny_imagenet": ("tiny_imagenet", 200),
    "imagenet": ("imagenet", 1000),
}


def _family(dataset):
    if dataset not in _DATASETS:
        raise ConfigError(f"unknown dataset '{dataset}' for models; available: {', '.join(sorted(_DATASETS))}")
    return _DATASETS[dataset][0]


def num_classes_for(dataset):
    """Number of classes of a dataset, the default classifier width of `build_model`."""
    _family(dataset)
    return _DATASETS[dataset][1]


def model_names(dataset):
    """Sorted model names (without the family prefix) that `build_model` accepts for this dataset."""
    prefix = _family(dataset) + "/"
    return sorted(key[len(prefix):] for key in MODEL_REGISTRY.names() if key.startswith(prefix))


def build_model(name, dataset, num_classes=None):
    """Build model `name` for `dataset` with `num_classes` outputs (default: the dataset's class count)."""
    key = f"{_family(dataset)}/{name}"
    if key not in MODEL_REGISTRY:
        available = ", ".join(model_names(dataset)) or "(none)"
        raise ConfigError(f"unknown model '{name}' for dataset {dataset}; available: {available}")
    return MODEL_REGISTRY.get(key)(num_classes_for(dataset) if num_classes is None else num_classes)


import_submodules(__name__, __path__)

__all__ = ["MODEL_REGISTRY", "build_model", "model_names", "num_classes_for"]
