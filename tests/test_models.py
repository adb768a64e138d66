"""Model zoo tests: every registered CIFAR model must match the published checkpoint layout exactly (so the
released teacher weights load with strict=True) and must honour the feature contract of models/base.py.

The reference layouts are a copy in tests/fixtures, since CI has no /work/shared.
"""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from mdistiller.models import MODEL_REGISTRY, build_model, model_names, num_classes_for
from mdistiller.utils.errors import ConfigError

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "published_checkpoint_layouts.json")
with open(FIXTURE) as f:
    LAYOUTS = json.load(f)
CIFAR_LAYOUTS = LAYOUTS["cifar100"]
CIFAR_SHAPES = LAYOUTS["cifar100_feature_shapes_batch2_32x32"]
CIFAR_MODELS = model_names("cifar100")
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def test_cifar_family_is_populated():
    expected = {"resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                "resnet8x4", "resnet32x4"}
    assert expected <= set(CIFAR_MODELS)
    assert all(f"cifar/{n}" in MODEL_REGISTRY for n in CIFAR_MODELS)


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_state_dict_matches_published_layout(name):
    assert name in CIFAR_LAYOUTS, f"registered CIFAR model {name} has no published layout in the fixture"
    ref = CIFAR_LAYOUTS[name]
    model = build_model(name, "cifar100")
    sd = model.state_dict()
    assert set(sd) == set(ref["state_dict"]), (
        f"missing {sorted(set(ref['state_dict']) - set(sd))}, unexpected {sorted(set(sd) - set(ref['state_dict']))}"
    )
    for key, shape in ref["state_dict"].items():
        assert list(sd[key].shape) == shape, key
    # num_params counts parameters only (not BN buffers); check the fixture agrees with that reading too.
    assert sum(p.numel() for p in model.parameters()) == ref["num_params"]
    assert ref["num_params"] == sum(
        math.prod(s) for k, s in ref["state_dict"].items() if not k.endswith(BUFFER_SUFFIXES)
    )


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_forward_feature_contract(name):
    torch.manual_seed(0)
    model = build_model(name, "cifar100").eval()
    with torch.no_grad():
        logits, features = model(torch.randn(2, 3, 32, 32))
    ref = CIFAR_SHAPES[name]
    assert list(logits.shape) == ref["logits"]
    assert [list(t.shape) for t in features["feats"]] == ref["feats"]
    assert [list(t.shape) for t in features["preact_feats"]] == ref["preact_feats"]
    assert list(features["pooled_feat"].shape) == ref["pooled_feat"]

    assert model.stage_channels() == [t.shape[1] for t in features["feats"]]
    assert model.feat_dim == features["pooled_feat"].shape[1]
    for pre, post in zip(features["preact_feats"], features["feats"]):
        assert torch.equal(F.relu(pre), post)
    assert (features["preact_feats"][-1] < 0).any(), "preact_feats must be taken before the last ReLU"


@pytest.mark.parametrize("name", ["resnet8", "resnet8x4"])
def test_other_input_sizes_and_class_counts(name):
    model = build_model(name, "fashion_mnist").eval()
    with torch.no_grad():
        logits, features = model(torch.randn(2, 3, 28, 28))
    assert logits.shape == (2, 10)
    assert features["pooled_feat"].shape == (2, model.feat_dim)
    assert build_model(name, "cifar100", num_classes=7).fc.out_features == 7


def test_num_classes_for():
    assert [num_classes_for(d) for d in ("cifar100", "fashion_mnist", "tiny_imagenet", "imagenet")] == [
        100, 10, 200, 1000]


def _published_checkpoint(layout):
    """A checkpoint in the published format built from the fixture alone (random values), not from our model."""
    state = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(240, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape) + 0.5
        else:
            state[key] = torch.randn(shape)
    return {"model": state}


@pytest.mark.parametrize("name", ["resnet8", "resnet110", "resnet32x4"])
def test_published_checkpoint_loads_strict(name, tmp_path):
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save(_published_checkpoint(CIFAR_LAYOUTS[name]["state_dict"]), path)
    state = torch.load(path, map_location="cpu")["model"]
    model = build_model(name, "cifar100")
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.fc.weight, state["fc.weight"])


def test_unknown_model_lists_available():
    with pytest.raises(ConfigError, match=r"unknown model 'nope' for dataset cifar100; available: .*resnet32x4"):
        build_model("nope", "cifar100")


def test_unknown_dataset_lists_available():
    for call in (lambda: build_model("resnet8", "mnist"), lambda: model_names("mnist"),
                 lambda: num_classes_for("mnist")):
        with pytest.raises(ConfigError, match=r"unknown dataset 'mnist'.*cifar100.*fashion_mnist"):
            call()
