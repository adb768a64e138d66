"""ImageNet ResNets (ResNet18/34/50/101/152) with torchvision's exact state-dict layout.

Module names (conv1/bn1/layerK.i.{conv1,bn1,conv2,bn2[,conv3,bn3],downsample.0/.1}/fc) and shapes are the
ones of torchvision's resnet*, so its published weights (the usual ImageNet teachers) load with strict=True.
Bottleneck puts the stride on the 3x3 conv (torchvision's "v1.5"), which is what those weights were trained
with; putting it on the first 1x1 (the original paper) would load the same tensors but compute a different net.
Init matches torchvision's default (kaiming fan_out convs, BN 1/0, no zero-init of the last BN).

Features (see models/base.py), 5 entries as ReviewKD uses on ImageNet:
  feats        = [stem (after ReLU and max-pool, stride 4), layer1, layer2, layer3, layer4]
  preact_feats = the same, each layer's output taken before its last block's final ReLU (the residual
                 sum); the stem entry is the same tensor as in feats.
"""

import torch.nn as nn
import torch.nn.functional as F

from ..base import ClassifierWithFeatures, init_conv_bn
from ..blocks import BasicBlock, Bottleneck, add_resnet_stages, run_resnet_stages, stage_last_bns
from ..registry import MODEL_REGISTRY


class ImageNetResNet(ClassifierWithFeatures):
    """7x7/2 stem + 3x3/2 max-pool, four stages at strides 1/2/2/2, adaptive average pooling, fc."""

    def __init__(self, block, layers, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = add_resnet_stages(self, block, layers)
        inplanes = channels[-1]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        self._stage_channels = tuple(channels)
        self.feat_dim = inplanes
        init_conv_bn(self)  # the fc keeps nn.Linear's default init, as in torchvision

    def bn_before_relu(self):
        return stage_last_bns((self.layer1, self.layer2, self.layer3, self.layer4))

    def forward(self, x):
        out, feats, preacts = run_resnet_stages(self, self.maxpool(F.relu(self.bn1(self.conv1(x)))))
        pooled = self.avgpool(out).flatten(1)
        return self.fc(pooled), self.make_features(feats, preacts, pooled)


_CONFIGS = {
    "ResNet18": (BasicBlock, (2, 2, 2, 2)),
    "ResNet34": (BasicBlock, (3, 4, 6, 3)),
    "ResNet50": (Bottleneck, (3, 4, 6, 3)),
    "ResNet101": (Bottleneck, (3, 4, 23, 3)),
    "ResNet152": (Bottleneck, (3, 8, 36, 3)),
}


def _register(name, block, layers):
    def build(num_classes):
        return ImageNetResNet(block, layers, num_classes)

    build.__name__ = name
    build.__doc__ = f"{name}: ImageNet ResNet with {block.__name__} blocks {layers}, torchvision layout."
    MODEL_REGISTRY.register(f"imagenet/{name}")(build)


for _name, (_block, _layers) in _CONFIGS.items():
    _register(_name, _block, _layers)
