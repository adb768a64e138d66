"""Models for 32x32 inputs (CIFAR-100, and Fashion-MNIST brought to 32x32). Every module here registers itself
under "cifar/<name>" when imported; a new architecture is one new file and its name in the list below."""

from . import mobilenetv2, resnet, resnet_wide_stem, shufflenetv1, shufflenetv2, vgg, wrn  # noqa: F401
