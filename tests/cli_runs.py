"""What the tests that train through tools/train.py share: the Fashion-MNIST config paths, the small-run overrides,
and train.py's own main() loaded in-process (the CLI code path without a new interpreter's start-up)."""

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FM_CONFIGS = os.path.join(ROOT, "configs", "fashion_mnist")
KD_CFG = os.path.join(FM_CONFIGS, "kd", "resnet20_resnet8.yaml")
SMALL = ["EXPERIMENT.DEVICE", "cpu", "SOLVER.EPOCHS", "1", "SOLVER.LR_DECAY_STAGES", "[1]",
         "DATASET.TRAIN_SUBSET", "320", "DATASET.TEST_SUBSET", "160", "SOLVER.BATCH_SIZE", "32",
         "LOG.TENSORBOARD_FREQ", "0"]


def train_main():
    """tools/train.py's main(), loaded from the file."""
    tools = os.path.join(ROOT, "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)  # train.py imports its sibling _path.py, as when run as a script
    spec = importlib.util.spec_from_file_location("train_tool", os.path.join(ROOT, "tools", "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def train_small_teacher(prefix):
    """A resnet20 teacher trained for one epoch on SMALL's subset; returns its checkpoint's path."""
    train_main()(["--cfg", os.path.join(FM_CONFIGS, "vanilla", "resnet20.yaml"), "LOG.PREFIX", str(prefix),
                  "EXPERIMENT.NAME", "teacher", *SMALL])
    return os.path.join(str(prefix), "teacher", "student_best.pth")
