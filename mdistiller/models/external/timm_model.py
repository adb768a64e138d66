"""timm models with our feature contract, through timm's own feature API (no per-architecture code).

- "feats": `forward_intermediates(x, indices, output_fmt="NCHW")`. For a CNN (its `feature_info` entries at
  different strides) every feature_info entry, which for timm's ResNets is the stem and the four stages, as ours.
  For a model whose entries all share one stride (ViTs: one entry per block, tokens at one grid) five blocks:
  the first (in the stem's place) and the last block of each quarter of the depth (blocks 0, 2, 5, 8, 11 of 12),
  so feature methods get a CNN-like list of a stem and four stages; timm turns the patch tokens into NCHW maps
  (class / register tokens dropped). Such a model has `feature_pyramid` False.
- "preact_feats": the same tensors; timm exposes no pre-activation taps.
- "pooled_feat": `forward_head(final, pre_logits=True)`, the classifier's input; logits `forward_head(final)`,
  exactly the library's own forward.
Channels come from `feature_info`, feat_dim from `head_hidden_size` (else `num_features`).
"""

import difflib

from ...utils.errors import ConfigError
from .contract import LibraryFeatures, adopt
from .pretrained import timm_pretrained_file


class TimmFeatures(LibraryFeatures):
    _feat_indices = ()

    def forward(self, x):
        final, feats = self.forward_intermediates(x, indices=list(self._feat_indices), output_fmt="NCHW")
        pooled = self.forward_head(final, pre_logits=True)
        return self.forward_head(final), self.make_features(feats, feats, pooled)


def feature_indices(feature_info):
    """(indices of the feature_info entries used as "feats", whether they form a pyramid of strides)."""
    n = len(feature_info)
    if len({f["reduction"] for f in feature_info}) > 1:
        return list(range(n)), True
    return sorted({0} | {round(n * k / 4) - 1 for k in range(1, 5)} - {-1}), False


def _create(timm, model, image_size, **kwargs):
    """timm.create_model with img_size for the models that take one (ViTs), without it for the others."""
    try:
        return timm.create_model(model, img_size=image_size, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
    return timm.create_model(model, **kwargs)


def build_timm(model, name, num_classes, image_size, pretrained, pretrained_key):
    """timm model `model` with our contract; `pretrained`: timm's weights from the local cache (a new classifier
    head when num_classes differs from theirs, as timm does it)."""
    import timm

    if not timm.is_model(model):
        close = difflib.get_close_matches(model, timm.list_models(), n=5)
        raise ConfigError(f"unknown timm model '{model}' in '{name}'"
                          f"{'; close: ' + ', '.join(close) if close else ''} (all: timm.list_models('*{model}*'))")
    kwargs = {"num_classes": num_classes}
    if pretrained:
        path, custom_load = timm_pretrained_file(model, name, pretrained_key)
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": path, "custom_load": custom_load})
    net = _create(timm, model, image_size, **kwargs)
    if not hasattr(net, "forward_intermediates") or not getattr(net, "feature_info", None):
        raise ConfigError(f"timm model '{model}' has no forward_intermediates / feature_info (timm's feature API), "
                          "which its feature taps need; pick another timm model")
    indices, pyramid = feature_indices(net.feature_info)
    feat_dim = getattr(net, "head_hidden_size", None) or net.num_features
    adopt(net, TimmFeatures, name, [net.feature_info[i]["num_chs"] for i in indices], feat_dim, pyramid)
    net._feat_indices = tuple(indices)
    return net
