"""CIFAR ShuffleNetV2 (1x: stages of 116/232/464 channels, 1024-d last conv), the ShuffleV2 student of the
published zoo; also registered as "tiny_imagenet/ShuffleV2".

Module names (conv1/bn1, layerK.0.{conv1..conv5,bn1..bn5} for the down-sampling unit, layerK.i.{conv1..3,
bn1..3} for the others, conv2/bn2, linear) and shapes follow the RepDistiller / mdistiller layout, so
published checkpoints load with strict=True. The stem is a 1x1 conv without max-pooling, so each of the three
stages halves the input (32 -> 16 -> 8 -> 4). The published Tiny-ImageNet ShuffleV2 has exactly the same keys
and shapes except the 200-way linear head (it pools globally, which our adaptive pooling does at any input
size), hence one class for both. Weights keep PyTorch's default init, as the published model did.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..base import ClassifierWithFeatures
from ..blocks import channel_shuffle
from ..registry import MODEL_REGISTRY

_STEM_CHANNELS = 24


class DownUnit(nn.Module):
    """Stride-2 unit: both branches see the whole input and each makes half of the output channels.
    Left: 3x3 depthwise (stride 2) then 1x1 + ReLU; right: 1x1 + ReLU, 3x3 depthwise (stride 2), 1x1 + ReLU."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class BasicUnit(nn.Module):
    """Stride-1 unit: split channels in half, pass the first half through, transform the second
    (1x1 + ReLU, 3x3 depthwise, 1x1 + ReLU), concatenate and shuffle.

    Returns (out, preact): preact is the same concatenation and shuffle with the branch taken before its final
    ReLU. The pass-through half is already non-negative (every unit's output is), so out == relu(preact)
    exactly, channel for channel. (The published model returned the pre-activation unshuffled, i.e. with its
    channels in a different order than the output; ours lines up with the feature it belongs to.)
    """

    def __init__(self, channels):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x):
        keep, branch = x.chunk(2, dim=1)
        branch = F.relu(self.bn1(self.conv1(branch)))
        branch = self.bn3(self.conv3(self.bn2(self.conv2(branch))))
        preact = channel_shuffle(torch.cat([keep, branch], 1), 2)
        out = channel_shuffle(torch.cat([keep, F.relu(branch)], 1), 2)
        return out, preact


class ShuffleStage(nn.Sequential):
    """A down-sampling unit then basic units; returns (out, preact) of the last basic unit."""

    def forward(self, x):
        x = self[0](x)
        preact = x
        for unit in self[1:]:
            x, preact = unit(x)
        return x, preact


class ShuffleNetV2(ClassifierWithFeatures):
    """1x1 stem, three stages, 1x1 conv to 1024 + ReLU, global average pooling, linear classifier.

    Features (see base.py): "feats" are the stem output (after its ReLU) and each stage's output.
    "preact_feats" are the stem output again (no separate tap) and each stage's last unit with its branch
    taken before the final ReLU (see BasicUnit). "pooled_feat" is the pooled 1024-d last conv.
    """

    def __init__(self, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3), num_classes=100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, _STEM_CHANNELS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM_CHANNELS)
        in_channels = _STEM_CHANNELS
        for k, (channels, blocks) in enumerate(zip(out_channels[:3], num_blocks), start=1):
            units = [DownUnit(in_channels, channels)] + [BasicUnit(channels) for _ in range(blocks)]
            self.add_module(f"layer{k}", ShuffleStage(*units))
            in_channels = channels
        self.conv2 = nn.Conv2d(in_channels, out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_channels[3], num_classes)
        self._stage_channels = (_STEM_CHANNELS,) + tuple(out_channels[:3])
        self.feat_dim = out_channels[3]

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        feats, preacts = [out], [out]  # the stem has no separate pre-activation tap
        for stage in (self.layer1, self.layer2, self.layer3):
            out, preact = stage(out)
            feats.append(out)
            preacts.append(preact)
        pooled = self.avgpool(F.relu(self.bn2(self.conv2(out)))).flatten(1)
        return self.linear(pooled), self.make_features(feats, preacts, pooled)


@MODEL_REGISTRY.register("cifar/ShuffleV2")
def shufflev2(num_classes):
    """ShuffleNetV2 1x: stages 116/232/464 with 1+3/1+7/1+3 units, 1024-d last conv."""
    return ShuffleNetV2(num_classes=num_classes)


@MODEL_REGISTRY.register("tiny_imagenet/ShuffleV2")
def shufflev2_tiny_imagenet(num_classes):
    """The same ShuffleNetV2 1x for 64x64 Tiny-ImageNet (the published checkpoint differs only in its head)."""
    return ShuffleNetV2(num_classes=num_classes)
