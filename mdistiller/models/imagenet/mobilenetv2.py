"""MobileNetV2 (width 1.0) with torchvision's exact mobilenet_v2 state-dict layout, so its published ImageNet
weights load with strict=True.

Layout: features.0 = 3x3/2 conv-BN-ReLU6 (3->32); features.1..17 = inverted residual blocks, each with a
`conv` Sequential: [1x1 expand conv-BN-ReLU6 (absent when t == 1)], 3x3 depthwise conv-BN-ReLU6, 1x1 linear
projection conv, BN; features.18 = 1x1 conv-BN-ReLU6 (320->1280); classifier = (Dropout(0.2), Linear).
Blocks add their input back when stride is 1 and channels are unchanged. Init as torchvision (kaiming
fan_out convs, BN 1/0, classifier N(0, 0.01)).
"""

import torch.nn as nn

from ..base import ClassifierWithFeatures
from ..registry import MODEL_REGISTRY

# (expansion t, output channels c, repeats n, first stride s), the paper's Table 2
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
             (6, 320, 1, 1))
_LAST_CHANNELS = 1280
# indices into `features` whose outputs are the features: the last module at strides 2, 4, 8, 16, 32
_TAPS = (1, 3, 6, 13, 18)


class ConvBNReLU6(nn.Sequential):
    """conv-BN-ReLU6 (keys .0 conv, .1 BN); `forward_with_preact` also returns the BN output."""

    def __init__(self, inp, oup, kernel_size=3, stride=1, groups=1):
        super().__init__(
            nn.Conv2d(inp, oup, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(oup),
            nn.ReLU6(),  # not in place: its input may be returned as a pre-activation
        )

    def forward_with_preact(self, x):
        preact = self[1](self[0](x))
        return self[2](preact), preact


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (3x3, carries the stride), linear project (1x1); residual when shapes allow."""

    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        layers = [] if expand_ratio == 1 else [ConvBNReLU6(inp, hidden, kernel_size=1)]
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_res_connect else out

    def forward_with_preact(self, x):
        # Linear bottleneck: no activation follows, so the pre-activation is the output itself.
        out = self(x)
        return out, out


class MobileNetV2(ClassifierWithFeatures):
    """MobileNetV2 with the feature contract of models/base.py.

    Features: one entry per resolution, each the output of the last module at that resolution:
      feats = [features.1 (16 ch, stride 2: the "stem", everything before the first downsampling block),
               features.3 (24, stride 4), features.6 (32, stride 8), features.13 (96, stride 16),
               features.18 (1280, stride 32: the final 1x1 conv-BN-ReLU6)]
    preact_feats: for the linear-bottleneck outputs (features.1/3/6/13), which no activation follows, the
    same tensor as in feats; for features.18, its BN output, before the ReLU6. Caveat: ReLU6 also clips at
    6, so that feat is relu6(preact), equal to relu(preact) only where preact <= 6. At random init eval
    activations are tiny and it holds; with trained weights (or calibrated BN statistics) it does not.
    pooled_feat: global average of features.18 (1280).
    """

    def __init__(self, num_classes=1000):
        super().__init__()
        layers, inp = [ConvBNReLU6(3, 32, stride=2)], 32
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        layers.append(ConvBNReLU6(inp, _LAST_CHANNELS, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=0.2), nn.Linear(_LAST_CHANNELS, num_classes))
        self._stage_channels = tuple(self._out_channels(layers[i]) for i in _TAPS)
        self.feat_dim = _LAST_CHANNELS
        self._init_weights()

    @staticmethod
    def _out_channels(module):
        return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        feats, preacts = [], []
        for i, module in enumerate(self.features):
            x, preact = module.forward_with_preact(x)
            if i in _TAPS:
                feats.append(x)
                preacts.append(preact)
        pooled = self.avgpool(x).flatten(1)
        return self.classifier(pooled), self.make_features(feats, preacts, pooled)


@MODEL_REGISTRY.register("imagenet/MobileNetV2")
def build_mobilenetv2(num_classes):
    """MobileNetV2 (width 1.0), torchvision's mobilenet_v2 layout."""
    return MobileNetV2(num_classes)
