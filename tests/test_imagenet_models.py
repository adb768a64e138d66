"""ImageNet models checked against torchvision, independently of the published-layout fixture.

Equal state-dict keys and shapes only prove the weights *load*; running torchvision's network and ours on
the same input with the same (loaded) weights proves they are the same function. BN running statistics are
calibrated and its affine parameters randomised first, so a BN applied in the wrong place shows up too.
Forward hooks on torchvision's modules check that our feature taps sit where our docstrings say.
No pretrained weights are needed: torchvision's random init is used as the "published" checkpoint.
"""

import functools

import pytest
import torch
import torch.nn as nn
import torchvision

from mdistiller.models import build_model

# our name -> (torchvision constructor, torchvision modules whose outputs are our "feats", in order)
_RESNET_TAPS = ("maxpool", "layer1", "layer2", "layer3", "layer4")
CASES = {
    "ResNet18": ("resnet18", _RESNET_TAPS),
    "ResNet34": ("resnet34", _RESNET_TAPS),
    "ResNet50": ("resnet50", _RESNET_TAPS),
    "ResNet101": ("resnet101", _RESNET_TAPS),
    "ResNet152": ("resnet152", _RESNET_TAPS),
    "MobileNetV2": ("mobilenet_v2", ("features.1", "features.3", "features.6", "features.13", "features.18")),
}


@functools.lru_cache(maxsize=None)
def _torchvision_state(name):
    """Seeded torchvision model (eval) with realistic, non-trivial BN parameters; built once per model.

    At random init BN's running statistics are (0, 1), so in eval mode deep ResNets blow up (logits ~1e8,
    where a 1e-4 tolerance means nothing) and MobileNetV2's activations vanish. One train-mode pass on random
    data sets the running statistics to that batch's (momentum=None: cumulative average), as a trained net's
    would be, keeping activations O(1); the affine parameters are then jittered away from (1, 0).
    """
    torch.manual_seed(0)
    ref = getattr(torchvision.models, CASES[name][0])(weights=None)
    bns = [m for m in ref.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.momentum = None
    with torch.no_grad():
        ref.train()(torch.randn(2, 3, 112, 112))
        for m in bns:
            m.momentum = 0.1
            m.weight.uniform_(0.8, 1.2)
            m.bias.uniform_(-0.1, 0.1)
    return ref.eval()


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_dict_layout_equals_torchvision(name):
    ref = _torchvision_state(name).state_dict()
    ours = build_model(name, "imagenet").state_dict()
    assert list(ours) == list(ref)  # same keys, and in the same order
    for key, value in ref.items():
        assert ours[key].shape == value.shape, key


@pytest.mark.kernels
@pytest.mark.parametrize("name", sorted(CASES))
def test_same_function_as_torchvision(name):
    ref = _torchvision_state(name)
    model = build_model(name, "imagenet")
    model.load_state_dict(ref.state_dict(), strict=True)
    model.eval()

    taps = CASES[name][1]
    captured = {}
    modules = dict(ref.named_modules())
    handles = [modules[t].register_forward_hook(lambda m, i, o, t=t: captured.__setitem__(t, o)) for t in taps]
    torch.manual_seed(1)
    x = torch.randn(1, 3, 224, 224)
    try:
        with torch.no_grad():
            expected = ref(x)
            logits, features = model(x)
    finally:
        for h in handles:
            h.remove()

    assert logits.shape == (1, 1000)
    assert expected.abs().max() > 1e-3  # guard against a degenerate all-zero comparison
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    for tap, feat in zip(taps, features["feats"], strict=True):
        torch.testing.assert_close(feat, captured[tap], atol=1e-4, rtol=1e-4, msg=lambda m, t=tap: f"{t}: {m}")


def test_mobilenetv2_last_preact_is_the_bn_output_before_relu6():
    """The 1x1 conv-BN-ReLU6 head's pre-activation is its BN output, so the feat is relu6 of it, not relu:
    with realistic BN statistics the BN output exceeds 6 and the two differ (see MobileNetV2's docstring)."""
    model = build_model("MobileNetV2", "imagenet")
    model.load_state_dict(_torchvision_state("MobileNetV2").state_dict(), strict=True)
    torch.manual_seed(1)
    with torch.no_grad():
        _, features = model.eval()(torch.randn(1, 3, 224, 224))
    pre, post = features["preact_feats"][-1], features["feats"][-1]
    assert torch.equal(post, torch.clamp(pre, 0, 6))
    assert pre.max() > 6 and (pre < 0).any()
