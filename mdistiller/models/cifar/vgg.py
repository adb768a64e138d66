"""VGG with BatchNorm (vgg8, vgg11, vgg13, vgg16, vgg19) as in the published CIFAR-100 zoo.

Five conv blocks of (conv3x3 with bias, BN, ReLU) layers; the last ReLU of each block is applied in forward,
not inside the block, so the block's output is its pre-activation (module names blockK.{0,1,3,4,...} follow
from that layout). Blocks are separated by 2x2 max-pools, except that the pool between blocks 3 and 4 is only
applied to 64x64 inputs (32x32 CIFAR images would otherwise shrink to 2x2), then global average pooling and a
512 -> classes `classifier`. vgg8 is the one-conv-per-block variant used as a CRD student.

Features (models/base.py), 5 entries: the post-ReLU output of each block; preact_feats the same before that
ReLU (for block0 too, since it has its own tap).
"""

import torch.nn as nn
import torch.nn.functional as F

from ..base import ClassifierWithFeatures, init_conv_bn
from ..registry import MODEL_REGISTRY

_CONFIGS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def _block(in_channels, widths):
    layers = []
    for w in widths:
        layers += [nn.Conv2d(in_channels, w, kernel_size=3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        in_channels = w
    return nn.Sequential(*layers[:-1])  # the last ReLU is taken in forward, to expose the pre-activation


class VGG(ClassifierWithFeatures):
    def __init__(self, config, num_classes=100):
        super().__init__()
        in_channels = 3
        for i, widths in enumerate(config):
            setattr(self, f"block{i}", _block(in_channels, widths))
            in_channels = widths[-1]
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)
        self._stage_channels = tuple(w[-1] for w in config)
        self.feat_dim = in_channels
        self._init_weights()

    def _init_weights(self):
        """The published init: He-normal (fan_out) convs with zero bias, BN 1/0, classifier N(0, 0.01)."""
        init_conv_bn(self)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def bn_before_relu(self):
        """Each block's last layer is its BN (the ReLU is taken in forward); block0 excluded, as the
        published code lists blocks 1-4 (the entries of preact_feats after the first)."""
        return [getattr(self, f"block{i}")[-1] for i in range(1, 5)]

    def forward(self, x):
        full_size = x.shape[2] == 64
        feats, preacts = [], []
        out = x
        for i in range(5):
            if i > 0 and (i != 4 or full_size):
                out = self.pool(out)
            pre = getattr(self, f"block{i}")(out)
            out = F.relu(pre)
            preacts.append(pre)
            feats.append(out)
        pooled = self.avgpool(out).flatten(1)
        return self.classifier(pooled), self.make_features(feats, preacts, pooled)


def _register(name, config):
    def build(num_classes):
        return VGG(config, num_classes)

    build.__name__ = name
    build.__doc__ = f"{name}: VGG with BatchNorm, conv widths per block {config}."
    MODEL_REGISTRY.register(f"cifar/{name}")(build)


for _name, _config in _CONFIGS.items():
    _register(_name, _config)
