"""How a library model is given our feature contract (models/base.py) without changing its weights' names.

The library builds the model; `adopt` then changes the instance's class to a subclass of both the library's class
and a mixin that implements the contract's `forward`. The object stays the library's model: its state_dict keys
are the library's own (a timm / torchvision checkpoint loads directly, and one of our runs' student_best.pth of
the same model loads as any of ours), and every library method (forward_intermediates, forward_head, train, ...)
is still there for the mixin to call. `library_forward` is the library's own forward, for comparisons.
"""

import torch

from ..base import ClassifierWithFeatures

_CLASSES = {}


class LibraryFeatures(ClassifierWithFeatures):
    """What every adopted library model has besides the library's own attributes."""

    library_name = ""  # "timm:<name>" / "torchvision:<name>"
    # False when the stage maps do not shrink stage by stage (a ViT's blocks are all at one token grid): methods
    # that fuse a feature pyramid (ReviewKD) refuse such a model.
    feature_pyramid = True

    def library_forward(self, x):
        """The library model's own forward (its logits only)."""
        return self._library_class.forward(self, x)

    def bn_before_relu(self):
        raise NotImplementedError(f"{self.library_name} is a library model, whose BatchNorms before each stage's "
                                  "last ReLU are not exposed (only our own zoo's models expose them)")


def adopt(model, mixin, library_name, stage_channels, feat_dim, feature_pyramid=True):
    """Give `model` (a library nn.Module) the contract implemented by `mixin` (a LibraryFeatures subclass) in
    place, and return it."""
    base = type(model)
    key = (mixin, base)
    if key not in _CLASSES:
        _CLASSES[key] = type(base.__name__, (mixin, base), {"_library_class": base, "__module__": base.__module__})
    model.__class__ = _CLASSES[key]
    model.library_name = library_name
    model._stage_channels = tuple(int(c) for c in stage_channels)
    model.feat_dim = int(feat_dim)
    model.feature_pyramid = bool(feature_pyramid)
    return model


def is_square_map(t):
    """An NCHW map of a square input (the data's images are square), as opposed to tokens or channels-last."""
    return isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[-1] == t.shape[-2]
