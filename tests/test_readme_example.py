"""The README's "Add your own distiller" example, run as written: one file, one config section, no other edit."""

import os
import re

import torch

from mdistiller.config import load_config
from mdistiller.data.bundle import DatasetMeta
from mdistiller.distillers import DISTILLER_REGISTRY, total_loss
from mdistiller.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_example():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index("## Add your own distiller"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_distiller_example_trains():
    code = readme_example()
    assert "my_fitnet.py" in code
    if "MYFITNET" not in DISTILLER_REGISTRY:
        exec(compile(code, "README.md:my_fitnet.py", "exec"), {})
    cfg = load_config(None, ["DISTILLER.TYPE", "MYFITNET", "DISTILLER.TEACHER", "resnet20",
                             "DISTILLER.STUDENT", "resnet8", "MYFITNET.HINT_WEIGHT", "50"])
    assert cfg.MYFITNET.HINT_WEIGHT == 50.0
    meta = DatasetMeta("fashion_mnist", 10, 32, 8, 0, (0.5,) * 3, (0.25,) * 3, torch.arange(8) % 10)
    torch.manual_seed(0)
    distiller = DISTILLER_REGISTRY.get("MYFITNET")(build_model("resnet8", "fashion_mnist"),
                                                   build_model("resnet20", "fashion_mnist"), cfg, meta)
    # The connector is learnable and checkpointed without any code outside the example.
    connector = set(map(id, distiller.connector.parameters()))
    assert connector <= set(map(id, distiller.learnable_parameters()))
    assert any(k.startswith("connector.") for k in distiller.learnable_state_dict())
    distiller.train()
    optimizer = torch.optim.SGD(distiller.learnable_parameters(), lr=0.1)
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    before = distiller.connector[0].weight.detach().clone()
    _, terms = distiller.forward_train(images, labels, 1)
    assert {name: t.kind for name, t in terms.items()} == {"ce": "task", "hint": "distill"}
    optimizer.zero_grad()
    total_loss(terms).backward()
    optimizer.step()
    assert not torch.equal(before, distiller.connector[0].weight)
    assert all(p.grad is None for p in distiller.teacher.parameters())
