"""Tiny-ImageNet MobileNetV2, the MobileNetV2 student of the published Tiny-ImageNet zoo (DOT).

A different network from the CIFAR "mobile_half": full width, ReLU6, biased convs everywhere (before BN too),
a 1x1 stem, and a 1x1 conv as classifier. Module names (pre.{0,1}, stageK[.i].residual.{0,1,3,4,6,7},
conv1.{0,1}, conv2) and shapes follow the published layout, so its checkpoints load with strict=True.

Facts of the published design kept here because the checkpoints were trained with them:
  - the stem is a 1x1 conv with padding 1, so a 64x64 input becomes 66x66 (the border is BN+ReLU6 of the
    bias alone);
  - only stages 2-4 downsample (66 -> 33 -> 17 -> 9); stages 5-7 stay at 9x9;
  - weights keep PyTorch's default init.
"""

import torch.nn as nn
import torch.nn.functional as F

from ..base import ClassifierWithFeatures
from ..registry import MODEL_REGISTRY

# (expansion t, output channels, blocks, first stride) of stage1 ... stage7.
_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 1),
    (6, 320, 1, 1),
)
_STEM_CHANNELS = 32
_LAST_CHANNELS = 1280
# Stages whose outputs are "feats" after the stem, the published model's tap points; the 1280-d last conv
# follows them as the deepest entry.
_TAPS = ("stage2", "stage3", "stage4")


class LinearBottleneck(nn.Module):
    """1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 linear projection (no activation), identity shortcut
    when shape allows. The output is linear, so it has no separate pre-activation."""

    def __init__(self, in_channels, out_channels, stride, t):
        super().__init__()
        hidden = in_channels * t
        self.use_residual = stride == 1 and in_channels == out_channels
        self.residual = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_channels, 1),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x):
        out = self.residual(x)
        return out + x if self.use_residual else out


class TinyImageNetMobileNetV2(ClassifierWithFeatures):
    """Stem, seven stages of linear bottlenecks, 1x1 conv to 1280 + ReLU6, global average pooling, 1x1-conv
    classifier.

    Features (see base.py): "feats" are the stem output (after its ReLU6), the outputs of stages 2, 3 and 4,
    and the 1280-d last conv after its ReLU6 (channels 32, 24, 32, 64, 1280; 66, 33, 17, 9, 9 pixels wide at
    64x64 input): the published model's own tap points, so feature methods (AT, CRD, ReviewKD) see what the
    published Tiny-ImageNet results were trained with. "preact_feats" are the same tensors except the last,
    taken after the BN and before the ReLU6: the stem has no separate pre-activation tap (as for every zoo
    model), and stages end in linear bottlenecks with no activation after them. "pooled_feat" is the pooled
    1280-d last conv, flattened to (N, 1280).
    """

    def __init__(self, num_classes=200):
        super().__init__()
        self.pre = nn.Sequential(
            nn.Conv2d(3, _STEM_CHANNELS, 1, padding=1),
            nn.BatchNorm2d(_STEM_CHANNELS),
            nn.ReLU6(inplace=True),
        )
        in_channels = _STEM_CHANNELS
        channels = {}
        for k, (t, out_channels, blocks, stride) in enumerate(_SETTING, start=1):
            layers = [LinearBottleneck(in_channels, out_channels, stride, t)]
            layers += [LinearBottleneck(out_channels, out_channels, 1, t) for _ in range(blocks - 1)]
            # Single-block stages are the block itself (stage1.residual..., stage7.residual... as published).
            self.add_module(f"stage{k}", layers[0] if blocks == 1 else nn.Sequential(*layers))
            channels[f"stage{k}"] = out_channels
            in_channels = out_channels
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, _LAST_CHANNELS, 1),
            nn.BatchNorm2d(_LAST_CHANNELS),
            nn.ReLU6(inplace=True),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.conv2 = nn.Conv2d(_LAST_CHANNELS, num_classes, 1)
        self._stage_channels = (_STEM_CHANNELS,) + tuple(channels[name] for name in _TAPS) + (_LAST_CHANNELS,)
        self.feat_dim = _LAST_CHANNELS

    def forward(self, x):
        out = self.pre(x)
        feats = [out]
        for k in range(1, len(_SETTING) + 1):
            name = f"stage{k}"
            out = getattr(self, name)(out)
            if name in _TAPS:
                feats.append(out)
        pre_last = self.conv1[1](self.conv1[0](out))
        last = F.relu6(pre_last)  # not the module's in-place ReLU6: pre_last must survive as a feature
        pooled = self.avgpool(last)
        logits = self.conv2(pooled).flatten(1)
        # Linear-bottleneck outputs (and the stem, by convention) have no separate pre-activation.
        return logits, self.make_features(feats + [last], feats + [pre_last], pooled.flatten(1))


@MODEL_REGISTRY.register("tiny_imagenet/MobileNetV2")
def mobilenetv2_tiny_imagenet(num_classes):
    """Full-width MobileNetV2 for 64x64 inputs, the published Tiny-ImageNet layout."""
    return TinyImageNetMobileNetV2(num_classes)
