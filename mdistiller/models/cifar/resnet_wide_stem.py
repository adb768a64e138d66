"""CIFAR ResNet18 / ResNet50 of the published zoo (RepDistiller's "resnetv2"), also Tiny-ImageNet's ResNet18.

These are the ImageNet ResNet stages (64-128-256-512 planes, BasicBlock or Bottleneck) under a CIFAR stem: one
3x3 stride-1 conv and no max-pool, so a 32x32 input keeps full resolution through layer1 (32, 32, 16, 8, 4).
Module names differ from torchvision's in two places the published checkpoints fix: the projection shortcut is
`layerK.i.shortcut.{0,1}` and the classifier is `linear`. The published Tiny-ImageNet ResNet18 teacher has
exactly these keys with a 200-way head; pooling is adaptive, so at 64x64 it is the same network (final map 8x8),
registered as "tiny_imagenet/ResNet18". Init: kaiming-normal convs and unit/zero BN, no zero-init residual.

Features (models/base.py), 5 entries: [stem, layer1, layer2, layer3, layer4]; preact_feats take each layer's
last residual sum before its ReLU (the stem entry is the post-ReLU stem, which has no other tap).
"""

import torch.nn as nn
import torch.nn.functional as F

from ..base import ClassifierWithFeatures, init_conv_bn
from ..blocks import BasicBlock, Bottleneck, add_resnet_stages, run_resnet_stages, stage_last_bns
from ..registry import MODEL_REGISTRY


class _BasicBlock(BasicBlock):
    shortcut_attr = "shortcut"


class _Bottleneck(Bottleneck):
    shortcut_attr = "shortcut"


class CifarStemResNet(ClassifierWithFeatures):
    def __init__(self, block, layers, num_classes=100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        channels = add_resnet_stages(self, block, layers)
        inplanes = channels[-1]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(inplanes, num_classes)
        self._stage_channels = tuple(channels)
        self.feat_dim = inplanes
        init_conv_bn(self)

    def bn_before_relu(self):
        return stage_last_bns((self.layer1, self.layer2, self.layer3, self.layer4))

    def forward(self, x):
        out, feats, preacts = run_resnet_stages(self, F.relu(self.bn1(self.conv1(x))))
        pooled = self.avgpool(out).flatten(1)
        return self.linear(pooled), self.make_features(feats, preacts, pooled)


def _register(key, block, layers):
    def build(num_classes):
        return CifarStemResNet(block, layers, num_classes)

    build.__name__ = key.split("/")[1]
    build.__doc__ = f"{key}: ResNet stages {layers} of {block.__name__.strip('_')} under a 3x3 CIFAR stem."
    MODEL_REGISTRY.register(key)(build)


_register("cifar/ResNet18", _BasicBlock, (2, 2, 2, 2))
_register("cifar/ResNet50", _Bottleneck, (3, 4, 6, 3))
_register("tiny_imagenet/ResNet18", _BasicBlock, (2, 2, 2, 2))
