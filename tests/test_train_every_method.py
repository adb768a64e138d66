"""`tools/train.py` trains one epoch on a Fashion-MNIST subset for every DISTILLER.TYPE the registry knows, with the
vanilla trainer and with DOT.

Each method runs from its own Fashion-MNIST config where there is one (so the shipped configs are exercised end
to end), else from the KD config with DISTILLER.TYPE overridden (which is how a "++" variant of any method is
selected). The teacher is a resnet20 trained here for one epoch. What is checked is the contract a user relies
on: the run completes, its metrics.jsonl has one finite `loss/<term>` per loss term (a distillation method has
at least one term beside the cross-entropy; a "++" method has `loss/dino`), and summary.json is written.
"""

import glob
import importlib.util
import json
import math
import os
import sys

import pytest
import yaml

from mdistiller.distillers import DISTILLER_REGISTRY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FM_CONFIGS = os.path.join(ROOT, "configs", "fashion_mnist")
KD_CFG = os.path.join(FM_CONFIGS, "kd", "resnet20_resnet8.yaml")
SMALL = ["EXPERIMENT.DEVICE", "cpu", "SOLVER.EPOCHS", "1", "SOLVER.LR_DECAY_STAGES", "[1]",
         "DATASET.TRAIN_SUBSET", "320", "DATASET.TEST_SUBSET", "160", "SOLVER.BATCH_SIZE", "32",
         "LOG.TENSORBOARD_FREQ", "0"]


def _train_main():
    """tools/train.py's own main(), loaded from the file (in-process: the CLI code path without a 5 s start)."""
    tools = os.path.join(ROOT, "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)  # train.py imports its sibling _path.py, as when run as a script
    spec = importlib.util.spec_from_file_location("train_tool", os.path.join(ROOT, "tools", "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _config_for(method):
    """The Fashion-MNIST config whose DISTILLER.TYPE is `method` (None if there is none)."""
    for path in sorted(glob.glob(os.path.join(FM_CONFIGS, "*", "*.yaml"))):
        if os.path.basename(path).startswith("_"):
            continue
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if (data.get("DISTILLER") or {}).get("TYPE") == method:
            return path
    return None


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("teacher")
    _train_main()(["--cfg", os.path.join(FM_CONFIGS, "vanilla", "resnet20.yaml"), "LOG.PREFIX", str(prefix),
                   "EXPERIMENT.NAME", "teacher", *SMALL])
    return os.path.join(prefix, "teacher", "student_best.pth")


@pytest.mark.parametrize("trainer", ["vanilla", "dot"])
@pytest.mark.parametrize("method", DISTILLER_REGISTRY.names())
def test_train_tool_runs_one_epoch(method, trainer, teacher_ckpt, tmp_path):
    cfg_path = _config_for(method)
    overrides = ([] if cfg_path else ["DISTILLER.TYPE", method]) + ["SOLVER.TRAINER", trainer]
    cfg_path = cfg_path or KD_CFG
    _train_main()(["--cfg", cfg_path, "LOG.PREFIX", str(tmp_path), "EXPERIMENT.NAME", "run",
                   "DISTILLER.TEACHER_CKPT", teacher_ckpt, *SMALL, *overrides])
    run = tmp_path / "run"
    with open(run / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 1 and records[0]["epoch"] == 1
    terms = {k: v for k, v in records[0].items() if k.startswith("loss/")}
    assert terms and all(math.isfinite(v) for v in terms.values()), terms
    if DISTILLER_REGISTRY.get(method).needs_teacher:
        assert len(terms) >= 2, f"{method} logged only {sorted(terms)}"
    if method.endswith("++"):
        assert "loss/dino" in terms
    summary = json.loads((run / "summary.json").read_text())
    assert summary["distiller"] == method and summary["trainer"] == trainer and summary["epochs"] == 1
