"""CIFAR MobileNetV2 at half width ("mobile_half"), the MobileNetV2 student of the published CIFAR-100 zoo.

Module names (conv1.{0,1} / blocks.i.j.conv.{0,1,3,4,6,7} / conv2.{0,1} / classifier.0) and shapes follow the
RepDistiller / mdistiller layout, so published checkpoints load with strict=True. The design: expansion 6,
width multiplier 0.5 on every stage (but not on the 1280-d last conv, which the zoo only widens for
multipliers above 1), a stride-2 3x3 stem, ReLU (not ReLU6) everywhere, and one stage stride fewer than
ImageNet's (32x32 -> 2x2). Every block, even the t=1 first one, keeps its 1x1 expansion conv, because the
published checkpoints have it.
"""

import torch.nn as nn

from ..base import ClassifierWithFeatures, init_conv_bn
from ..registry import MODEL_REGISTRY

# (expansion t, output channels c at width 1, blocks n, first stride s), as in the MobileNetV2 paper except
# the stride of the second stage (1 here), which keeps 32x32 inputs from shrinking too early.
_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# Indices of the block groups whose outputs are "feats" (after the stem): the last group of each resolution
# the published model taps, i.e. the 24-, 32-, 96- and 320-channel groups (scaled by the width multiplier).
_TAPS = (1, 2, 4, 6)


def _conv_bn_relu(inp, oup, kernel_size, stride):
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand + ReLU, 3x3 depthwise + ReLU, 1x1 linear projection (no activation), identity shortcut
    when shape allows. The output is linear, so it has no separate pre-activation."""

    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_residual = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_residual else out


class CifarMobileNetV2(ClassifierWithFeatures):
    """Stem, seven groups of inverted residuals, 1x1 conv to 1280, global average pooling, linear classifier.

    Features (see base.py): "feats" are the stem output (after its ReLU) and the outputs of block groups
    1, 2, 4 and 6 (5 tensors, as published: 16x16, 16x16, 8x8, 4x4, 2x2 at 32x32 input). The published model
    returns no "preact_feats"; here they are the same tensors as "feats": the stem has no separate
    pre-activation tap (as for every zoo model), and each group ends in a linear bottleneck with no ReLU
    after it, so its output already is its pre-activation. "pooled_feat" is the pooled 1280-d last conv.
    """

    def __init__(self, num_classes=100, expansion=6, width_mult=0.5):
        super().__init__()
        inp = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, inp, 3, stride=2)
        self.blocks = nn.ModuleList()
        group_channels = []
        for t, c, n, s in _SETTING:
            oup = int(c * width_mult)
            t = expansion if t != 1 else 1
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(inp, oup, s if i == 0 else 1, t))
                inp = oup
            self.blocks.append(nn.Sequential(*layers))
            group_channels.append(oup)
        last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(inp, last_channel, 1, stride=1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last_channel, num_classes))
        self._stage_channels = (int(32 * width_mult),) + tuple(group_channels[i] for i in _TAPS)
        self.feat_dim = last_channel
        self._init_weights()

    def _init_weights(self):
        """He-normal (fan_out) convs, unit/zero BN, N(0, 0.01) classifier: the published model's init."""
        init_conv_bn(self)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def bn_before_relu(self):
        """The projection BN of each tapped group's last block, as the published code lists them (these
        outputs have no ReLU after them: OFD's margin then only shapes the loss)."""
        return [self.blocks[i][-1].conv[-1] for i in _TAPS]

    def forward(self, x):
        out = self.conv1(x)
        feats = [out]
        for i, group in enumerate(self.blocks):
            out = group(out)
            if i in _TAPS:
                feats.append(out)
        pooled = self.avgpool(self.conv2(out)).flatten(1)
        logits = self.classifier(pooled)
        # Linear-bottleneck outputs (and the stem, by convention) have no separate pre-activation.
        return logits, self.make_features(feats, feats, pooled)


@MODEL_REGISTRY.register("cifar/MobileNetV2")
def mobilenetv2_half(num_classes):
    """MobileNetV2, expansion 6, width 0.5 ("mobile_half" of the published zoo)."""
    return CifarMobileNetV2(num_classes, expansion=6, width_mult=0.5)
