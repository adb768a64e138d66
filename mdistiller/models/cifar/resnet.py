"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4) of the published CIFAR-100 teacher zoo.

Module names (conv1/bn1/layerK.i.{conv1,bn1,conv2,bn2,downsample}/fc) and shapes follow the RepDistiller /
mdistiller layout exactly, so the published teacher checkpoints load with strict=True. Depth 6n+2: a 3x3
stem and three stages of n BasicBlocks at strides 1/2/2. Pooling is adaptive, so other input sizes
(e.g. 28x28 Fashion-MNIST upsampled or padded) still produce (N, C) pooled features.
"""

import torch.nn as nn
import torch.nn.functional as F

from ..base import ClassifierWithFeatures, init_conv_bn
from ..blocks import BasicBlock, Stage, stage_last_bns
from ..registry import MODEL_REGISTRY


class CifarResNet(ClassifierWithFeatures):
    """Stem + three stages + global average pooling + fc; forward returns (logits, features), see base.py."""

    def __init__(self, depth, channels, num_classes=100):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        c0, c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(3, c0, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c0)
        self.layer1 = self._make_stage(c0, c1, n, stride=1)
        self.layer2 = self._make_stage(c1, c2, n, stride=2)
        self.layer3 = self._make_stage(c2, c3, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)
        self._stage_channels = (c0, c1, c2, c3)
        self.feat_dim = c3
        init_conv_bn(self)

    @staticmethod
    def _make_stage(inplanes, planes, blocks, stride):
        layers = [BasicBlock(inplanes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return Stage(*layers)

    def bn_before_relu(self):
        return stage_last_bns((self.layer1, self.layer2, self.layer3))

    def forward(self, x):
        stem = F.relu(self.bn1(self.conv1(x)))
        feats, preacts = [stem], [stem]  # the stem has no separate pre-activation tap
        out = stem
        for stage in (self.layer1, self.layer2, self.layer3):
            out, preact = stage(out)
            feats.append(out)
            preacts.append(preact)
        pooled = self.avgpool(out).flatten(1)
        logits = self.fc(pooled)
        return logits, self.make_features(feats, preacts, pooled)


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)  # the "x4" teachers/students: 4x wider stages than _NARROW


def _register(name, depth, channels):
    def build(num_classes):
        return CifarResNet(depth, channels, num_classes)

    build.__name__ = name
    build.__doc__ = f"{name}: CIFAR ResNet-{depth}, channels {channels}."
    MODEL_REGISTRY.register(f"cifar/{name}")(build)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(f"resnet{_depth}", _depth, _NARROW)
_register("resnet8x4", 8, _WIDE)
_register("resnet32x4", 32, _WIDE)
