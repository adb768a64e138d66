"""MobileNetV1 (width 1.0) in the layout of the published ImageNet student checkpoint (OFD / mdistiller).

The checkpoint's keys are "model.<i>.<j>..." plus "fc": `model` is a Sequential of 14 conv-bn-relu stacks,
  model.0       = 3x3/2 conv 3->32, BN, ReLU                                  (full conv stem)
  model.1..13   = 3x3 depthwise conv, BN, ReLU, 1x1 pointwise conv, BN, ReLU  (depthwise-separable blocks)
with no conv biases, and fc = Linear(1024, num_classes). The strides are those of the MobileNetV1 paper:
2 on model.0, 2, 4, 6 and 12, so 224x224 inputs end at 7x7. Pooling is adaptive and kept outside `model`,
which holds only parametrised stacks (the published net's parameter-free pool adds no keys).
"""

import torch.nn as nn

from ..base import ClassifierWithFeatures, init_conv_bn
from ..registry import MODEL_REGISTRY

# (out_channels, stride) of the depthwise-separable blocks model.1 .. model.13
_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
           (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
# indices into `model` whose outputs are the features, the published model's taps: the last stack at strides
# 4, 8, 16 and 32 (nothing is tapped at stride 2)
_TAPS = (3, 5, 11, 13)


class ConvStack(nn.Sequential):
    """conv-bn-relu layers ending in a ReLU; `forward_with_preact` also returns the input of that last ReLU."""

    def forward_with_preact(self, x):
        for layer in list(self)[:-1]:
            x = layer(x)
        return self[-1](x), x


def conv_bn(inp, oup, stride):
    return ConvStack(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU())


def conv_dw(inp, oup, stride):
    # The inner ReLU may act in place; the last one may not, since its input is returned as a pre-activation.
    return ConvStack(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp), nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(),
    )


class MobileNetV1(ClassifierWithFeatures):
    """MobileNetV1 with the feature contract of models/base.py.

    Features: the published model's four taps, each the output of the last stack at its resolution:
      feats = [model.3 (128 ch, stride 4), model.5 (256, stride 8), model.11 (512, stride 16),
               model.13 (1024, stride 32)]
    model.3 is the "stem" entry (stride 4, like the ImageNet ResNets' stem entry); nothing at stride 2 is
    tapped. So MobileNetV1 has three stages after the stem where an ImageNet ResNet has four: AT pairs them
    with the teacher's first three stages, and ReviewKD's five levels are the four entries plus the pooled
    feature, the published pairing of both (distillers/at.py, distillers/reviewkd.py).
    preact_feats: the same stacks' last BN outputs, before their final ReLU (a true pre-activation for the
    stem entry too, since that stack ends in a BN-ReLU of its own).
    pooled_feat: global average of model.13 (1024).
    """

    def __init__(self, num_classes=1000):
        super().__init__()
        stacks, inp = [conv_bn(3, 32, 2)], 32
        for oup, stride in _BLOCKS:
            stacks.append(conv_dw(inp, oup, stride))
            inp = oup
        self.model = nn.Sequential(*stacks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inp, num_classes)
        self._stage_channels = tuple(stacks[i][-2].num_features for i in _TAPS)
        self.feat_dim = inp
        init_conv_bn(self)

    def forward(self, x):
        feats, preacts = [], []
        for i, stack in enumerate(self.model):
            x, preact = stack.forward_with_preact(x)
            if i in _TAPS:
                feats.append(x)
                preacts.append(preact)
        pooled = self.avgpool(x).flatten(1)
        return self.fc(pooled), self.make_features(feats, preacts, pooled)


@MODEL_REGISTRY.register("imagenet/MobileNetV1")
def build_mobilenetv1(num_classes):
    """MobileNetV1 (width 1.0), layout of the published ImageNet student checkpoint."""
    return MobileNetV1(num_classes)
