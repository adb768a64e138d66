"""--resume with a larger SOLVER.EPOCHS extends a finished run, bit-identically to a run started with those epochs,
and refuses (one line naming the key) whenever the epochs already trained would have been trained differently."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from mdistiller.config import load_config
from mdistiller.engine.extend import first_lr_difference
from mdistiller.engine.launch import train_from_config
from mdistiller.models import build_model
from mdistiller.utils.errors import UserError
from test_engine import CrashAfterEpoch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDENT_CFG = os.path.join(ROOT, "configs", "fashion_mnist", "vanilla", "resnet8.yaml")
LR = 0.05  # the config's SOLVER.LR, used for the hand-computed schedule below


def cfg(prefix, name, *extra):
    """A tiny Fashion-MNIST run: 256 training images in batches of 64 (4 iterations per epoch), 1 warm-up epoch."""
    return load_config(STUDENT_CFG, [
        "LOG.PREFIX", str(prefix), "EXPERIMENT.NAME", name, "EXPERIMENT.DEVICE", "cpu",
        "DATASET.TRAIN_SUBSET", "256", "DATASET.TEST_SUBSET", "100", "SOLVER.BATCH_SIZE", "64",
        "SOLVER.LR", str(LR), "SOLVER.WARMUP_EPOCHS", "1", "LOG.MONITOR_TEACHER", "False",
        "LOG.TENSORBOARD_FREQ", "0", "LOG.SAVE_CHECKPOINT_FREQ", "0", *extra])


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if "time" not in k and "per_s" not in k} for line in f]


def latest(run_dir):
    return torch.load(os.path.join(run_dir, "latest.pth"), weights_only=False)


def assert_same_training(a_dir, b_dir):
    a, b = latest(a_dir), latest(b_dir)
    assert a["epoch"] == b["epoch"] and a["global_step"] == b["global_step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert a["hooks"] == b["hooks"]  # best and last results, finite-guard streak, speed plan
    best_a = torch.load(os.path.join(a_dir, "student_best.pth"))["model"]
    best_b = torch.load(os.path.join(b_dir, "student_best.pth"))["model"]
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    assert metrics(a_dir) == metrics(b_dir)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """3 epochs from the start, LR x0.1 after epoch 2."""
    prefix = tmp_path_factory.mktemp("straight")
    summary = train_from_config(cfg(prefix, "run", "SOLVER.EPOCHS", "3", "SOLVER.LR_DECAY_STAGES", "[2]"))
    return prefix / "run", summary


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A finished 2-epoch run with the same schedule as `straight` over its epochs (stage 2 decays nothing yet)."""
    prefix = tmp_path_factory.mktemp("two")
    train_from_config(cfg(prefix, "run", "SOLVER.EPOCHS", "2", "SOLVER.LR_DECAY_STAGES", "[2]"))
    return prefix


@pytest.mark.kernels
def test_extension_adding_a_decay_stage_past_the_trained_epochs_is_bit_exact(tmp_path, straight):
    straight_dir, straight_summary = straight
    # Trained for 2 epochs without decay stages; extended with the stage after epoch 2: epochs 1-2 keep their LR.
    train_from_config(cfg(tmp_path, "run", "SOLVER.EPOCHS", "2", "SOLVER.LR_DECAY_STAGES", "[]"))
    extended = train_from_config(cfg(tmp_path, "run", "SOLVER.EPOCHS", "3", "SOLVER.LR_DECAY_STAGES", "[2]"),
                                 resume=True)
    run = tmp_path / "run"
    assert_same_training(straight_dir, run)
    records = metrics(run)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    # Warm-up ends at the last iteration of epoch 1; epoch 2 at LR; epoch 3 decayed by the new stage.
    assert [r["lr"] for r in records] == pytest.approx([LR, LR, LR * 0.1])
    for key in ("best_top1", "best_top5", "best_epoch", "last_top1", "last_top5", "epochs"):
        assert extended[key] == straight_summary[key], key
    assert json.loads((run / "summary.json").read_text()) == extended and extended["epochs"] == 3
    best = max(records, key=lambda r: r["test_top1"])  # best over all three epochs, first of equals
    assert extended["best_top1"] == best["test_top1"] and extended["best_epoch"] == best["epoch"]
    saved = yaml.safe_load((run / "config.yaml").read_text())["SOLVER"]
    assert saved["EPOCHS"] == 3 and saved["LR_DECAY_STAGES"] == [2]
    assert (run / "ckpt_epoch_3.pth").is_file()
    log = (run / "train.log").read_text()
    assert "--resume: SOLVER.EPOCHS 2 -> 3" in log
    # Once extended, the run is complete again: --resume with the new config has nothing to do.
    assert train_from_config(cfg(tmp_path, "run", "SOLVER.EPOCHS", "3", "SOLVER.LR_DECAY_STAGES", "[2]"),
                             resume=True) == extended


@pytest.mark.kernels
def test_an_interrupted_extension_is_not_complete_and_resumes_exactly(two_epochs, straight):
    straight_dir, straight_summary = straight
    extend = cfg(two_epochs, "run", "SOLVER.EPOCHS", "3", "SOLVER.LR_DECAY_STAGES", "[2]")
    with pytest.raises(KeyboardInterrupt):  # killed after epoch 3's checkpoint, before the summary
        train_from_config(extend, extra_hooks=[CrashAfterEpoch(3)], resume=True)
    run = two_epochs / "run"
    assert not (run / "summary.json").exists()  # the 2-epoch summary no longer claims the run is complete
    resumed = train_from_config(extend, resume=True)
    assert_same_training(straight_dir, run)
    for key in ("best_top1", "best_top5", "best_epoch", "last_top1", "last_top5", "epochs"):
        assert resumed[key] == straight_summary[key], key


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("finished")
    summary = train_from_config(cfg(prefix, "run", "SOLVER.EPOCHS", "2", "SOLVER.LR_DECAY_STAGES", "[2]",
                                    "DATASET.TRAIN_SUBSET", "128", "DATASET.TEST_SUBSET", "50"))
    return prefix, summary


@pytest.mark.parametrize("extra,fragments", [
    # A decay stage inside the trained epochs: epoch 2 (its first iteration) would have had LR/10.
    (["SOLVER.LR_DECAY_STAGES", "[1]"], ["SOLVER.LR_DECAY_STAGES [2] -> [1]", "epoch 2 (iteration 0)",
                                         f"({LR:g} -> {LR * 0.1:g})"]),
    (["SOLVER.LR", "0.1"], ["SOLVER.LR 0.05 -> 0.1", "epoch 1 (iteration 0)"]),
    # Without warm-up, the first iteration runs at the full LR instead of LR / (1 epoch x 2 iterations).
    (["SOLVER.WARMUP_EPOCHS", "0"], ["SOLVER.WARMUP_EPOCHS 1 -> 0", "epoch 1 (iteration 0)",
                                     f"({LR / 2:g} -> {LR:g})"]),
    (["SOLVER.WEIGHT_DECAY", "0.001"], ["SOLVER.WEIGHT_DECAY 0.0005 -> 0.001"]),
])
def test_extension_refuses_a_changed_schedule_or_key(finished, extra, fragments):
    prefix, summary = finished
    small = ["DATASET.TRAIN_SUBSET", "128", "DATASET.TEST_SUBSET", "50"]
    with pytest.raises(UserError) as info:
        train_from_config(cfg(prefix, "run", "SOLVER.EPOCHS", "3", "SOLVER.LR_DECAY_STAGES", "[2]", *small, *extra),
                          resume=True)
    message = str(info.value)
    assert "\n" not in message and "SOLVER.EPOCHS 2 -> 3" in message
    for fragment in fragments:
        assert fragment in message, message
    # Nothing was touched: the run is still the finished 2-epoch one.
    run = prefix / "run"
    assert json.loads((run / "summary.json").read_text()) == summary
    assert yaml.safe_load((run / "config.yaml").read_text())["SOLVER"]["EPOCHS"] == 2


def test_fewer_epochs_than_trained_are_refused_on_the_command_line(finished):
    prefix, summary = finished
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "train.py"), "--cfg", STUDENT_CFG, "--resume",
         "LOG.PREFIX", str(prefix), "EXPERIMENT.NAME", "run", "EXPERIMENT.DEVICE", "cpu",
         "DATASET.TRAIN_SUBSET", "128", "DATASET.TEST_SUBSET", "50", "SOLVER.BATCH_SIZE", "64",
         "SOLVER.LR", str(LR), "SOLVER.WARMUP_EPOCHS", "0", "LOG.MONITOR_TEACHER", "False",
         "LOG.TENSORBOARD_FREQ", "0", "LOG.SAVE_CHECKPOINT_FREQ", "0",
         "SOLVER.EPOCHS", "1", "SOLVER.LR_DECAY_STAGES", "[1]"],
        capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert "SOLVER.EPOCHS 1 is not more than the 2 epochs" in proc.stderr
    assert json.loads((prefix / "run" / "summary.json").read_text()) == summary


def test_first_lr_difference_by_hand():
    base = {"SOLVER.LR": 0.1, "SOLVER.LR_DECAY_STAGES": [3], "SOLVER.LR_DECAY_RATE": 0.1,
            "SOLVER.WARMUP_EPOCHS": 0}
    # A stage added at epoch 5, past 4 trained epochs: the same rates.
    assert first_lr_difference(base, {**base, "SOLVER.LR_DECAY_STAGES": [3, 5]}, 4, 10) is None
    # Stage 3 moved to 2: epoch 3 (the first past stage 2, the last before stage 3's decay) differs.
    assert first_lr_difference(base, {**base, "SOLVER.LR_DECAY_STAGES": [2]}, 4, 10) == (3, 0, 0.1, 0.1 * 0.1)
    # The same stage moved to 2 with only 2 epochs trained leaves them as they were.
    assert first_lr_difference(base, {**base, "SOLVER.LR_DECAY_STAGES": [2]}, 2, 10) is None
    # Two warm-up epochs instead of none: iteration 0 of epoch 1 runs at 0.1 / 20.
    epoch, it, old, new = first_lr_difference(base, {**base, "SOLVER.WARMUP_EPOCHS": 2}, 1, 10)
    assert (epoch, it, old) == (1, 0, 0.1) and new == pytest.approx(0.1 / 20)


def test_extension_refuses_a_teacher_checkpoint_that_changed(tmp_path):
    # The student alone, monitoring a teacher: its checkpoint is part of what the trained epochs computed.
    teacher = tmp_path / "teacher.pth"
    torch.manual_seed(0)
    torch.save({"model": build_model("resnet20", "fashion_mnist").state_dict()}, teacher)
    small = ["DATASET.TRAIN_SUBSET", "64", "DATASET.TEST_SUBSET", "50", "SOLVER.WARMUP_EPOCHS", "0",
             "LOG.MONITOR_TEACHER", "True", "DISTILLER.TEACHER_CKPT", str(teacher), "SOLVER.LR_DECAY_STAGES", "[]"]
    summary = train_from_config(cfg(tmp_path, "run", "SOLVER.EPOCHS", "1", *small))
    recorded = summary["teacher"]["sha256"]
    torch.manual_seed(1)  # the teacher re-trained into the same file
    torch.save({"model": build_model("resnet20", "fashion_mnist").state_dict()}, teacher)
    with pytest.raises(UserError) as info:
        train_from_config(cfg(tmp_path, "run", "SOLVER.EPOCHS", "2", *small), resume=True)
    message = str(info.value)
    assert "\n" not in message and f"teacher checkpoint {teacher}" in message and recorded[:16] in message
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
