"""timm and torchvision models as teachers or students: "timm:<name>" / "torchvision:<name>".

The libraries build the model (and load their pretrained weights from the local cache, pretrained.py); the model
then gets our feature contract (models/base.py) in place (contract.py), through timm's feature API
(timm_model.py) or taps found by a probe forward (torchvision_model.py). Its state_dict keys stay the library's.
timm and torchvision.models are imported only when such a model is built, so importing mdistiller does not.
"""

from .pretrained import pretrained_num_classes, pretrained_weights_file, split_library_name
from .timm_model import build_timm
from .torchvision_model import build_torchvision


def build_library_model(name, num_classes, image_size, pretrained=False, pretrained_key="MODEL.STUDENT_PRETRAINED"):
    """Library model `name` ("timm:<name>" / "torchvision:<name>") with `num_classes` outputs for
    `image_size` inputs; `pretrained`: the library's weights, from its local cache (`pretrained_key`: the config
    key that asked for them, named in the error when they are missing)."""
    library, model = split_library_name(name)
    build = build_timm if library == "timm" else build_torchvision
    return build(model, name, num_classes, image_size, pretrained, pretrained_key)


__all__ = ["build_library_model", "pretrained_num_classes", "pretrained_weights_file", "split_library_name"]
