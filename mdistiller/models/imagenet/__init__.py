"""Models for 224x224 inputs (ImageNet). Every module here registers itself under "imagenet/<name>" when
imported; their state-dict layouts follow the published ImageNet checkpoints (torchvision's for the ResNets
and MobileNetV2, the OFD/mdistiller release for MobileNetV1) so those weights load with strict=True."""

from . import mobilenetv1, mobilenetv2, resnet  # noqa: F401  (each registers itself)
