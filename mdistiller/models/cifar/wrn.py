"""Wide ResNets (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2) of the published CIFAR-100 zoo.

WRN-d-k (Zagoruyko & Komodakis, 2016): a 3x3 stem of 16 channels and three stages of (d - 4) / 6
*pre-activation* blocks (BN-ReLU-conv, BN-ReLU-conv) with 16k, 32k and 64k channels at strides 1/2/2, then a
final BN-ReLU. Module names (conv1, blockK.layer.i.{bn1,conv1,bn2,conv2,convShortcut}, bn1, fc) and shapes are
those of the published checkpoints. When a block changes width or stride, its shortcut is a 1x1 conv applied to
the *activated* input, as in the original design (both branches see BN-ReLU(x)).

Features (models/base.py): the published taps exactly, which AT and ReviewKD read, so a WRN pair optimises the
published loss. A pre-activation stage ends in a residual sum with no ReLU after it, so:
  - feats = [stem conv, block1, block2, block3], every entry a raw residual sum (the stem conv has no BN/ReLU);
    the last is block3's output *before* the final BN-ReLU, unlike every other model's post-ReLU last stage;
  - preact_feats = [stem conv, block2.layer[0].bn1(block1), block3.layer[0].bn1(block2), bn1(block3)]: each
    stage output through the BN that the next block (or the head) applies before its ReLU;
  - pooled_feat = the channel means of relu(bn1(block3)), the classifier's input.
The published model computes the three BN taps by calling those BNs a second time after the forward pass, so
in training mode their running statistics move twice per batch. We do the same in training mode, which keeps a
trained WRN student's BN statistics (hence its eval accuracy) those of the published training. In eval mode
the values are the same either way, and each BN runs once, its output feeding both its ReLU and the tap: a BN
module called at two sites would be fused with the ReLU at both by the int8 teacher's quantization
(SPEED.TEACHER_INT8), and the taps would lose their negative half.
"""

import torch.nn as nn
import torch.nn.functional as F

from ..base import ClassifierWithFeatures, init_conv_bn
from ..registry import MODEL_REGISTRY


class PreActBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride, drop_rate=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes and stride == 1
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x, pre=None):
        """`pre`: bn1(x) when the caller already computed it (the network's pre-activation tap)."""
        act = F.relu(self.bn1(x) if pre is None else pre)
        out = F.relu(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.equal_in_out else self.convShortcut(act))


class WRNStage(nn.Module):
    """`layer` holds the blocks: the published key prefix is blockK.layer.i."""

    def __init__(self, n, in_planes, out_planes, stride, drop_rate):
        super().__init__()
        self.layer = nn.Sequential(*[PreActBlock(in_planes if i == 0 else out_planes, out_planes,
                                                 stride if i == 0 else 1, drop_rate) for i in range(n)])

    def forward(self, x, pre=None):
        """`pre`: the first block's bn1(x), when the caller already computed it."""
        x = self.layer[0](x, pre)
        for block in self.layer[1:]:
            x = block(x)
        return x


class WideResNet(ClassifierWithFeatures):
    def __init__(self, depth, widen_factor, num_classes=100, drop_rate=0.0):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = WRNStage(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = WRNStage(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = WRNStage(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch[3], num_classes)
        self._stage_channels = ch
        self.feat_dim = ch[3]
        init_conv_bn(self)
        nn.init.zeros_(self.fc.bias)

    def bn_before_relu(self):
        """The BNs of the preact_feats taps (module docstring), as the published code lists them."""
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]

    def forward(self, x):
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        pre1 = self.block2.layer[0].bn1(f1)
        f2 = self.block2(f1, pre1)
        pre2 = self.block3.layer[0].bn1(f2)
        f3 = self.block3(f2, pre2)
        pre3 = self.bn1(f3)
        pooled = self.avgpool(F.relu(pre3)).flatten(1)
        logits = self.fc(pooled)
        if self.training:  # the published second calls (module docstring): same values, statistics move again
            pre1, pre2, pre3 = self.block2.layer[0].bn1(f1), self.block3.layer[0].bn1(f2), self.bn1(f3)
        return logits, self.make_features([f0, f1, f2, f3], [f0, pre1, pre2, pre3], pooled)


def _register(depth, k):
    name = f"wrn_{depth}_{k}"

    def build(num_classes):
        return WideResNet(depth, k, num_classes)

    build.__name__ = name
    build.__doc__ = f"{name}: Wide ResNet, depth {depth}, widen factor {k}."
    MODEL_REGISTRY.register(f"cifar/{name}")(build)


for _depth, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register(_depth, _k)
