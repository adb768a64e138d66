"""The feature contract every model in the zoo follows, so distillers can be written once for all of them.

Feature-based distillers (FitNet, AT, RKD, CRD, ReviewKD, ...) need intermediate activations, and some of
them (OFD) need them *before* the last ReLU, where negative responses are still visible. Rather than each
distiller hooking into each architecture, every model returns them from `forward`:

    logits, features = model(x)

`features` is a dict with
  - "feats": list of tensors, the stem output (after its ReLU) followed by each stage's output after that
    stage's final ReLU. For the CIFAR ResNets this is 4 tensors.
  - "preact_feats": the same list, but each stage's output is taken *before* its last ReLU (for a residual
    stage: the last block's sum of branch and shortcut). The stem has no separate pre-activation tap, so
    its entry is the same post-ReLU stem output as in "feats".
  - "pooled_feat": the penultimate vector fed to the classifier, always shape (N, C) with C == feat_dim.
Exception: the pre-activation Wide ResNets keep the published taps: "feats" are the stem conv and the raw
residual sums (the last one before the final BN-ReLU), "preact_feats" those sums through the next BN
(cifar/wrn.py).

Models also report their shapes, so distillers size connectors (1x1 convs, projection heads) from the model
instead of from hand-written per-architecture tables:
  - `stage_channels()`: channel count of each entry of "feats", in order.
  - `feat_dim`: size of "pooled_feat" (the classifier's input).
  - `bn_before_relu()`: the BatchNorm2d modules whose outputs reach each stage's last ReLU, one per entry of
    "preact_feats" after the stem, in stage order (OFD's margins come from their affine parameters). For a
    residual stage it is the last block's branch BN (the shortcut is added after it), as in the published
    code; models without such BNs (ShuffleNets, whose last ReLU follows a concat) raise NotImplementedError.
"""

import torch.nn as nn


class ClassifierWithFeatures(nn.Module):
    """Base class for zoo models; subclasses set `_stage_channels` and `feat_dim` and implement the contract."""

    _stage_channels = ()
    feat_dim = 0

    def stage_channels(self):
        """Channel counts of the tensors in features["feats"], in order (a new list; safe to modify)."""
        return list(self._stage_channels)

    def bn_before_relu(self):
        """BatchNorm2d modules before each stage's last ReLU, matching "preact_feats"[1:] (see above)."""
        raise NotImplementedError(f"{type(self).__name__} has no BatchNorm before its stages' last ReLU")

    @staticmethod
    def make_features(feats, preact_feats, pooled_feat):
        """Assemble the features dict in the contract's shape; one place so keys never drift between models."""
        return {"feats": list(feats), "preact_feats": list(preact_feats), "pooled_feat": pooled_feat}


def init_conv_bn(module):
    """Kaiming-normal (fan_out, relu) convs and unit/zero BN, the init the published CIFAR teachers used."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
