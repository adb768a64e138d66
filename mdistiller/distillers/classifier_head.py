"""A model's classifier as one nn.Linear, for the methods that reuse or read it (SRRL, SimKD, CAT-KD)."""

import torch.nn as nn

from ..utils.errors import ConfigError

HEAD_NAMES = ("fc", "linear", "classifier")


def classifier_linear(model, method, role="TEACHER"):
    """The one nn.Linear under the model's fc / linear / classifier attribute that maps "pooled_feat" to the logits
    (a Dropout in front of it is the identity in eval mode); else a ConfigError naming DISTILLER.<role>."""
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if head is None:
            continue
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        if len(linears) == 1 and linears[0].in_features == model.feat_dim:
            return linears[0]
    raise ConfigError(f"config key DISTILLER.{role}: {method} uses the {role.lower()}'s classifier, but "
                      f"{type(model).__name__} has no single nn.Linear on feat_dim={model.feat_dim} under "
                      f"{'/'.join(HEAD_NAMES)}; use a zoo model")
