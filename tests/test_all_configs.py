"""Every config in configs/ loads, validates, builds its distiller and takes one training step on random data.

Teachers are randomly initialised here (their checkpoints are not available in tests); what is checked is that
each config is complete and coherent: keys exist, models fit the dataset, the method runs and its loss terms are
finite and marked task/distill.
"""

import glob
import os

import pytest
import torch

from mdistiller.config import load_config
from mdistiller.data.bundle import DatasetMeta
from mdistiller.data.views import view_recipe
from mdistiller.distillers import DISTILLER_REGISTRY, total_loss
from mdistiller.engine.classification import build_distiller
from mdistiller.models import build_model, num_classes_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/coco (TASK detection) are loaded and checked by tests/test_detection_tables.py and trained by
# tests/test_detection_train.py
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
                 if not os.path.basename(p).startswith("_") and os.sep + "coco" + os.sep not in p)
INPUT = {"cifar100": 32, "fashion_mnist": 32, "tiny_imagenet": 64, "imagenet": 224}


# "X++" configs: the dino term's class means need a pass over real data, which this smoke test does not make (the
# term warns once and is a constant here; tests/test_dino.py tests it with means).
@pytest.mark.filterwarnings("ignore:the dino term's teacher class means were never set")
@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, ROOT) for p in CONFIGS])
def test_config_builds_and_takes_a_step(path):
    cfg = load_config(path)
    dataset, d = cfg.DATASET.TYPE, cfg.DISTILLER
    classes = num_classes_for(dataset)
    torch.manual_seed(0)
    batch = 4
    targets = torch.arange(2 * batch) % classes
    meta = DatasetMeta(name=dataset, num_classes=classes, image_size=INPUT[dataset], num_train=len(targets),
                       num_test=0, mean=(0.5,) * 3, std=(0.25,) * 3, train_targets=targets)
    # built as a run builds it (the dino term of "X++", the loss ramp), with a random teacher
    teacher = build_model(d.TEACHER, dataset).state_dict() if DISTILLER_REGISTRY.loads_teacher(cfg) else None
    distiller, _ = build_distiller(cfg, meta, "cpu", teacher)
    distiller.train()
    optimizer = torch.optim.SGD(distiller.learnable_parameters(), lr=0.01, momentum=0.9)
    size = INPUT[dataset]
    views = view_recipe(distiller.train_views)  # a method fed several views per image: B x V x C x H x W
    shape = (batch,) + ((views.num_views,) if views else ()) + (3, size, size)
    images, labels, index = torch.randn(*shape), targets[:batch], torch.arange(batch)
    # epoch 2, through the trainers' entry point: a LOSS_RAMP is applied (factor 1/20 or 1/5, not 0) and the terms
    # it names must exist
    out = distiller.train_forward(images, labels, 2, index)
    logits, terms = out.logits, out.terms
    assert logits.shape == (batch, classes)
    assert terms and all(t.kind in ("task", "distill") for t in terms.values())
    loss = total_loss(terms)
    assert torch.isfinite(loss)
    # a method's own stage with its own LR (FT's paraphraser, SSKD's teacher head) trains its module, not the student
    watched = list(distiller.learnable_parameters() if distiller.stage_lr(2) is not None
                   else distiller.student.parameters())
    before = [p.detach().clone() for p in watched]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, watched))
