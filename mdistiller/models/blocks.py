"""Residual building blocks shared by the CIFAR and ImageNet ResNets.

Module names (conv1/bn1/conv2/bn2[/conv3/bn3]/downsample.0/.1) are those of the published checkpoints and of
torchvision, so every ResNet built from these loads them with strict=True. The CIFAR ResNet18/50 of the
published zoo call the projection "shortcut" instead; `shortcut_attr` is the only thing that differs, so those
blocks are subclasses that rename it rather than copies. Each block returns (out, preact),
preact being the residual sum before the final ReLU, and `Stage` passes the last block's preact up: that is
where the models' "preact_feats" come from.
"""

import torch.nn as nn
import torch.nn.functional as F


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def downsample(inplanes, outplanes, stride):
    """Projection shortcut, or None for identity; a Sequential (0=conv, 1=bn) to match the published keys."""
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(conv1x1(inplanes, outplanes, stride), nn.BatchNorm2d(outplanes))


class _ResidualBlock(nn.Module):
    """Holds the projection shortcut under the attribute name the checkpoints use."""

    shortcut_attr = "downsample"

    def _set_projection(self, inplanes, outplanes, stride):
        setattr(self, self.shortcut_attr, downsample(inplanes, outplanes, stride))

    def _shortcut(self, x):
        proj = getattr(self, self.shortcut_attr)
        return x if proj is None else proj(x)


class BasicBlock(_ResidualBlock):
    """Two 3x3 convs plus shortcut, then ReLU; returns (out, preact) so the stage can expose both."""

    expansion = 1
    last_bn = "bn2"  # the branch's last BN, before the shortcut sum and the ReLU (models' bn_before_relu)

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self._set_projection(inplanes, planes, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        shortcut = self._shortcut(x)
        preact = out + shortcut
        return F.relu(preact), preact


class Bottleneck(_ResidualBlock):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision v1.5), 1x1 expand x4, plus shortcut, then ReLU."""

    expansion = 4
    last_bn = "bn3"

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        outplanes = planes * self.expansion
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, outplanes)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self._set_projection(inplanes, outplanes, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        shortcut = self._shortcut(x)
        preact = out + shortcut
        return F.relu(preact), preact


class Stage(nn.Sequential):
    """A sequence of blocks that also returns the last block's pre-activation (for preact_feats)."""

    def forward(self, x):
        preact = None
        for block in self:
            x, preact = block(x)
        return x, preact


def stage_last_bns(stages):
    """Each stage's last block's branch BN: the BN before the stage's last ReLU (models' bn_before_relu)."""
    return [getattr(stage[-1], stage[-1].last_bn) for stage in stages]


def channel_shuffle(x, groups):
    """Interleave the channels of `groups` groups, so the next grouped conv (ShuffleNet V1) or the next unit's
    split (ShuffleNet V2) mixes information across them."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def add_resnet_stages(module, block, layers, inplanes=64):
    """Give `module` the four ResNet stages layer1..layer4 (64-128-256-512 planes, strides 1/2/2/2, `layers`
    blocks each) under the names the checkpoints use; returns the channels [inplanes, out1, ..., out4]."""
    channels = [inplanes]
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
        stage = [block(inplanes, planes, 1 if i == 0 else 2)]
        inplanes = planes * block.expansion
        stage += [block(inplanes, planes) for _ in range(blocks - 1)]
        setattr(module, f"layer{i + 1}", Stage(*stage))
        channels.append(inplanes)
    return channels


def run_resnet_stages(module, stem):
    """Run layer1..layer4 after `stem`: (last output, feats, preact_feats), both lists starting with the stem
    (which has no separate pre-activation tap)."""
    feats, preacts, out = [stem], [stem], stem
    for stage in (module.layer1, module.layer2, module.layer3, module.layer4):
        out, preact = stage(out)
        feats.append(out)
        preacts.append(preact)
    return out, feats, preacts
