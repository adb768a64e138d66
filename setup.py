import re

from setuptools import find_packages, setup

# requirements.txt pins the exact torch/torchvision builds the README's set-up installs and the tests ran on.
# A package install (`pip install -e .` into a researcher's own CUDA environment) must not replace their torch,
# so it asks only for the oldest releases with every API the code calls:
# - torch 2.6: torch.nn.utils.get_total_norm (engine/finite_guard.py) is new in 2.6; the rest is older
#   (torch.amp.GradScaler(device) 2.3, torch.utils.flop_counter 2.1, torch.compile 2.0, ao.quantization FX 1.13).
# - torchvision 0.21: the release built for torch 2.6 (only its datasets and download helpers are used).
# The tests run on the pinned versions, which these ranges include (tests/test_tools_ux.py checks that).
# - timm: the tested release or newer (models/external.py uses forward_intermediates and feature_info).
MINIMUM = {"torch": "torch>=2.6", "torchvision": "torchvision>=0.21", "timm": "timm>=1.0.31"}


def _name(requirement):
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


with open("requirements.txt") as f:
    pinned = [line.strip() for line in f if line.strip() and not line.startswith("#")]
requirements = [MINIMUM.get(_name(r), r) for r in pinned]

setup(
    name="mdistiller",
    version="0.1.0",
    description="Config-driven knowledge-distillation benchmark: KD, DKD, CRD, ReviewKD, KD++ and the DOT trainer",
    packages=find_packages(include=["mdistiller", "mdistiller.*"]),
    package_data={"mdistiller": ["reference/*.csv"]},  # the published numbers tools/reproduce.py compares with
    include_package_data=True,
    python_requires=">=3.9",
    install_requires=requirements,
    # wandb: the optional Weights & Biases logger (LOG.WANDB True), beside TensorBoard
    # imagenet: scipy reads the ILSVRC2012 devkit's meta.mat (tools/prepare_imagenet_val.py; not needed with
    # Kaggle's LOC_val_solution.csv or a "filename wnid" file)
    extras_require={"test": ["pytest>=7", "pytest-xdist>=3"], "wandb": ["wandb>=0.16"], "imagenet": ["scipy>=1.7"]},
)
