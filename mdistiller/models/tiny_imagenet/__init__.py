"""Models for 64x64 inputs (Tiny-ImageNet, 200 classes). Every module here registers itself under
"tiny_imagenet/<name>" when imported; their state-dict layouts follow the published Tiny-ImageNet checkpoints
so those weights load with strict=True. (ShuffleV2 is the CIFAR network with a 200-way head, so it is
registered from models/cifar/shufflenetv2.py instead.)"""

from . import mobilenetv2  # noqa: F401  (registers itself)
