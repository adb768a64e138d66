"""The README's "Add your own distiller" and "Add your own update rule" examples, run as written: one file each
(and one config section), no other edit."""

import os
import re

import pytest
import torch

from mdistiller.bench.random_teacher import random_teacher_state
from mdistiller.bench.synthetic import SyntheticDataset
from mdistiller.config import load_config
from mdistiller.data.bundle import DatasetMeta
from mdistiller.distillers import DISTILLER_REGISTRY, total_loss
from mdistiller.engine import UPDATE_RULE_REGISTRY, build_run
from mdistiller.engine.classification import build_distiller
from mdistiller.models import build_model
from mdistiller.utils.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META = DatasetMeta("fashion_mnist", 10, 32, 8, 0, (0.5,) * 3, (0.25,) * 3, torch.arange(8) % 10)


def readme_example(section):
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    part = text[text.index(f"## {section}"):]
    return re.search(r"```python\n(.*?)```", part, re.S).group(1)


@pytest.fixture(scope="module")
def fitnet():
    code = readme_example("Add your own distiller")
    assert "my_fitnet.py" in code
    exec(compile(code, "README.md:my_fitnet.py", "exec"), {})
    yield DISTILLER_REGISTRY.get("MYFITNET")
    DISTILLER_REGISTRY.unregister("MYFITNET")  # its config section goes with it: later tests see the package's tree


@pytest.fixture(scope="module")
def clipped_sgd():
    code = readme_example("Add your own update rule")
    assert "my_clipped_sgd.py" in code
    exec(compile(code, "README.md:my_clipped_sgd.py", "exec"), {})
    yield UPDATE_RULE_REGISTRY.get("clipped_sgd")
    UPDATE_RULE_REGISTRY.unregister("clipped_sgd")


def fitnet_config(*extra):
    return load_config(None, ["DISTILLER.TYPE", "MYFITNET", "DISTILLER.TEACHER", "resnet20",
                              "DISTILLER.STUDENT", "resnet8", "MYFITNET.HINT_WEIGHT", "50", *extra])


def test_readme_distiller_example_trains(fitnet):
    cfg = fitnet_config()
    assert cfg.MYFITNET.HINT_WEIGHT == 50.0
    torch.manual_seed(0)
    distiller = fitnet.build(cfg, build_model("resnet8", "fashion_mnist"), build_model("resnet20", "fashion_mnist"),
                                   META)
    assert distiller.hint_weight == 50.0
    # The connector is learnable and checkpointed without any code outside the example.
    connector = set(map(id, distiller.connector.parameters()))
    assert connector <= set(map(id, distiller.learnable_parameters()))
    assert any(k.startswith("connector.") for k in distiller.learnable_state_dict())
    distiller.train()
    optimizer = torch.optim.SGD(distiller.learnable_parameters(), lr=0.1)
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    before = distiller.connector[0].weight.detach().clone()
    terms = distiller.forward_train(images, labels, 1).terms
    assert {name: t.kind for name, t in terms.items()} == {"ce": "task", "hint": "distill"}
    optimizer.zero_grad()
    total_loss(terms).backward()
    optimizer.step()
    assert not torch.equal(before, distiller.connector[0].weight)
    assert all(p.grad is None for p in distiller.teacher.parameters())
    assert not distiller.teacher.training  # frozen in eval mode, though the distiller trains


def test_readme_distiller_gets_a_plus_plus_variant_without_edits(fitnet):
    """MYFITNET++ is MYFITNET plus exactly one term, dino, computed from the features the example returns."""
    cfg = fitnet_config("DISTILLER.TYPE", "MYFITNET++")
    assert DISTILLER_REGISTRY.resolve("MYFITNET++") == (fitnet, True)
    torch.manual_seed(0)
    distiller, _ = build_distiller(cfg, META, "cpu", random_teacher_state("resnet20", "fashion_mnist"))
    distiller.train()
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    with pytest.warns(UserWarning, match="class means were never set"):
        out = distiller.train_forward(images, labels, 1)
    assert list(out.terms) == ["ce", "hint", "dino"] and out.terms["dino"].kind == "distill"
    # never prepared: zero class means make the term 1 - 0 = 1 for every sample (and weight DINO.WEIGHT 2)
    assert out.terms["dino"].value.item() == pytest.approx(2.0)


def _kd_run(trainer_name, *extra):
    cfg = load_config(None, ["DISTILLER.TYPE", "KD", "DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT", "resnet8",
                             "EXPERIMENT.DEVICE", "cpu", "SOLVER.BATCH_SIZE", "16", "SOLVER.UPDATE_RULE", trainer_name,
                             "SOLVER.LR", "0.1", *extra])
    return build_run(cfg, bundle=SyntheticDataset("fashion_mnist", 64, 16)(cfg),
                     teacher_state=random_teacher_state("resnet20", "fashion_mnist"))


def _one_step(run):
    trainer = run.trainer
    trainer.distiller.train()
    trainer.train_loader.set_epoch(0)
    images, labels, index = next(iter(trainer.train_loader))
    trainer.set_lr(0.1)
    before = [p.detach().clone() for p in run.distiller.learnable_parameters()]
    trainer.run_step(images, labels, index, 1)
    return before, [p.detach().clone() for p in run.distiller.learnable_parameters()]


def test_readme_update_rule_clips_the_global_gradient_norm(clipped_sgd):
    run = _kd_run("clipped_sgd", "CLIP.MAX_NORM", "0.05")
    assert isinstance(run.update_rule, clipped_sgd) and run.update_rule.max_norm == 0.05
    before, after = _one_step(run)
    # First SGD step: the momentum buffer is the gradient plus weight decay, so the applied gradient is
    # (p0 - p1) / lr - wd * p0; after clipping its global norm is MAX_NORM (a random KD step's is far larger).
    wd = run.update_rule.optimizer.param_groups[0]["weight_decay"]
    applied = torch.cat([((a - b) / 0.1 - wd * a).flatten() for a, b in zip(before, after)]).double()
    assert applied.norm().item() == pytest.approx(0.05, rel=1e-3)


def test_readme_update_rule_without_clipping_is_plain_sgd_bit_for_bit(clipped_sgd):
    runs = [_kd_run("clipped_sgd", "CLIP.MAX_NORM", "1e9"), _kd_run("vanilla")]
    steps = [_one_step(run)[1] for run in runs]
    assert all(torch.equal(a, b) for a, b in zip(*steps))


def test_readme_update_rule_refuses_fp16(clipped_sgd):
    with pytest.raises(ConfigError, match="clipped_sgd"):
        load_config(None, ["SOLVER.UPDATE_RULE", "clipped_sgd", "SPEED.AMP", "fp16", "EXPERIMENT.DEVICE", "cuda"])


# ---- "Add your own detection method" ----

@pytest.fixture(scope="module")
def box_mimic(tmp_path_factory):
    """The README's file, written out as a user would save it; imported here as tools/train.py --import does."""
    from mdistiller.detection.terms import DETECTION_METHOD_REGISTRY, DETECTION_TERM_REGISTRY
    from mdistiller.utils.cli import import_components

    code = readme_example("Add your own detection method")
    assert "my_box_mimic.py" in code
    path = tmp_path_factory.mktemp("plugin") / "my_box_mimic.py"
    path.write_text(code)
    import_components([str(path)])
    yield str(path), DETECTION_TERM_REGISTRY.get("box_mimic")
    DETECTION_TERM_REGISTRY.unregister("box_mimic")
    DETECTION_METHOD_REGISTRY.unregister("MIMIC")


def test_readme_detection_method_is_the_mse_of_the_box_features(box_mimic, tmp_path):
    """MIMIC's term on a real training forward equals weight x mean((f_s - f_t)^2) computed here from the same
    step; MIMIC++ is MIMIC plus exactly the dino term."""
    from test_detection_train import SAMPLE, tiny
    from mdistiller.detection.sample import write_sample_coco
    from mdistiller.detection.terms import method_terms
    from mdistiller.detection.models import build_faster_rcnn

    coco = write_sample_coco(str(tmp_path / "coco"), num_train=2, num_val=1, width=64, height=48)
    torch.manual_seed(3)
    teacher = str(tmp_path / "teacher.pth")
    torch.save({"model": build_faster_rcnn("resnet18").state_dict()}, teacher)
    cfg = load_config(SAMPLE, tiny(coco, tmp_path, "mimic", "DISTILLER.TYPE", "MIMIC", "DISTILLER.TEACHER",
                                   "resnet18", "DISTILLER.TEACHER_CKPT", teacher, "BOX_MIMIC.WEIGHT", "0.5"))
    assert method_terms("MIMIC") == ("box_mimic",) and method_terms("MIMIC++") == ("box_mimic", "dino")
    run = build_run(cfg)
    term = run.distiller.terms["box_mimic"]
    assert isinstance(term, box_mimic[1]) and term.weight == 0.5
    images, targets, _ = next(iter(run.train_loader))
    run.distiller.train()
    step = run.distiller(list(images), list(targets))
    by_hand = 0.5 * ((step.student_features.double() - step.teacher_features.double()) ** 2).mean()
    assert term(step).value.double().item() == pytest.approx(by_hand.item(), rel=1e-5)
    out = run.distiller.train_forward(images, targets)
    assert sorted(k for k in out.terms if not k.startswith("loss_")) == ["box_mimic"]


def test_readme_detection_method_trains_through_train_py_import(box_mimic, tmp_path):
    """tools/train.py --import my_box_mimic.py: the file alone makes MIMIC++ a method of the command line."""
    import json
    import subprocess
    import sys

    from test_detection_train import SAMPLE, tiny
    from mdistiller.detection.sample import write_sample_coco
    from mdistiller.detection.models import build_faster_rcnn

    coco = write_sample_coco(str(tmp_path / "coco"), num_train=2, num_val=1, width=64, height=48)
    torch.manual_seed(3)
    teacher = str(tmp_path / "teacher.pth")
    torch.save({"model": build_faster_rcnn("resnet18").state_dict()}, teacher)
    opts = tiny(coco, tmp_path, "mimicpp", "DISTILLER.TYPE", "MIMIC++", "DISTILLER.TEACHER", "resnet18",
                "DISTILLER.TEACHER_CKPT", teacher, "SOLVER.EPOCHS", "1", "DETECTION.ITERS_PER_EPOCH", "1",
                "DETECTION.DINO.CLASS_MEANS_ITERS", "1", "LOG.TENSORBOARD_FREQ", "0")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), "--import", box_mimic[0],
                           "--cfg", SAMPLE, *opts], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(tmp_path / "mimicpp" / "metrics.jsonl") as f:
        (record,) = [json.loads(line) for line in f]
    assert "loss/box_mimic" in record and "loss/dino" in record
    missing = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), "--import",
                              str(tmp_path / "nowhere.py"), "--cfg", SAMPLE], capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 2 and "--import" in missing.stderr and "no such file" in missing.stderr
    assert "Traceback" not in missing.stderr
