"""CIFAR ShuffleNetV1 (groups 3, stages of 240/480/960 channels), the ShuffleV1 student of the published zoo.

Module names (conv1/bn1, layerK.i.{conv1,bn1,conv2,bn2,conv3,bn3}, linear) and shapes follow the
RepDistiller / mdistiller layout, so published checkpoints load with strict=True. For 32x32 inputs the stem
is a 1x1 conv without max-pooling, and each of the three stages halves the resolution (32 -> 16 -> 8 -> 4).
Weights keep PyTorch's default init, as the published model did.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..base import ClassifierWithFeatures
from ..blocks import channel_shuffle
from ..registry import MODEL_REGISTRY

_STEM_CHANNELS = 24


class ShuffleUnit(nn.Module):
    """Grouped 1x1 reduce + ReLU, channel shuffle, 3x3 depthwise (carrying the stride), grouped 1x1 expand.

    Stride 1: the branch is added to the input; stride 2: concatenated with a 3x3 average-pooled input (so
    the branch only produces out_planes - in_planes channels). The first unit after the 24-channel stem uses
    an ungrouped reduce conv, since 24 input channels are too few to split. Returns (out, preact), preact
    being the merged tensor before the final ReLU.
    """

    def __init__(self, in_planes, out_planes, stride, groups):
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        self.reduce_groups = 1 if in_planes == _STEM_CHANNELS else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, 1, groups=self.reduce_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, 3, stride, 1, groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.reduce_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            preact = torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1)
        else:
            preact = out + x
        return F.relu(preact), preact


class ShuffleStage(nn.Sequential):
    """Units of one stage; returns (out, preact) of the last unit."""

    def forward(self, x):
        preact = None
        for unit in self:
            x, preact = unit(x)
        return x, preact


class ShuffleNetV1(ClassifierWithFeatures):
    """1x1 stem, three stages of shuffle units, global average pooling, linear classifier.

    Features (see base.py): "feats" are the stem output (after its ReLU) and each stage's output (after the
    last unit's ReLU). "preact_feats" are the stem output again (no separate tap) and each stage's last unit
    before that ReLU, i.e. the sum of branch and shortcut. "pooled_feat" is the pooled last stage (960-d).
    """

    def __init__(self, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups=3, num_classes=100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, _STEM_CHANNELS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM_CHANNELS)
        in_planes = _STEM_CHANNELS
        for k, (planes, blocks) in enumerate(zip(out_planes, num_blocks), start=1):
            # The stride-2 first unit concatenates its input, so its branch makes only the missing channels.
            units = [ShuffleUnit(in_planes, planes - in_planes, 2, groups)]
            units += [ShuffleUnit(planes, planes, 1, groups) for _ in range(blocks - 1)]
            self.add_module(f"layer{k}", ShuffleStage(*units))
            in_planes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)
        self._stage_channels = (_STEM_CHANNELS,) + tuple(out_planes)
        self.feat_dim = in_planes

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        feats, preacts = [out], [out]  # the stem has no separate pre-activation tap
        for stage in (self.layer1, self.layer2, self.layer3):
            out, preact = stage(out)
            feats.append(out)
            preacts.append(preact)
        pooled = self.avgpool(out).flatten(1)
        return self.linear(pooled), self.make_features(feats, preacts, pooled)


@MODEL_REGISTRY.register("cifar/ShuffleV1")
def shufflev1(num_classes):
    """ShuffleNetV1, groups 3, stages 240/480/960 with 4/8/4 units."""
    return ShuffleNetV1(num_classes=num_classes)
