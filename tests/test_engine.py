"""The training engine end to end on real Fashion-MNIST subsets: files a run writes, exact resume, evaluation."""

import json
import re
import os
import subprocess
import sys

import pytest
import torch
import yaml

from mdistiller.config import load_config
from mdistiller.engine import HookBase
from mdistiller.engine.launch import train_from_config
from mdistiller.engine.lr_schedule import LRSchedule, StagedLR, learning_rate
from mdistiller.utils.checkpoint import atomic_save, load_weights
from mdistiller.utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDENT_CFG = os.path.join(ROOT, "configs", "fashion_mnist", "vanilla", "resnet8.yaml")


def small_cfg(tmp_path, *extra, name="run"):
    return load_config(STUDENT_CFG, [
        "LOG.PREFIX", str(tmp_path), "EXPERIMENT.NAME", name, "EXPERIMENT.DEVICE", "cpu",
        "DATASET.TRAIN_SUBSET", "640", "DATASET.TEST_SUBSET", "300", "SOLVER.BATCH_SIZE", "64",
        "SOLVER.EPOCHS", "2", "SOLVER.LR_DECAY_STAGES", "[1]", "SOLVER.WARMUP_EPOCHS", "1",
        "LOG.TENSORBOARD_FREQ", "2", "LOG.SAVE_CHECKPOINT_FREQ", "1", *extra])


class CrashAfterEpoch(HookBase):
    """Simulates a run killed right after an epoch's checkpoint was written."""

    def __init__(self, epoch):
        self.epoch = epoch

    def after_epoch(self, record):
        if self.trainer.epoch == self.epoch:
            raise KeyboardInterrupt


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_timing(record):
    return {k: v for k, v in record.items() if "time" not in k and "per_s" not in k}


def predictions_here(cfg, ckpt, summary):
    """(predicted class, label) of every test image for the checkpoint, computed in this test: the run's test
    images, in the memory layout the run evaluated in (so that both see the same logits)."""
    from mdistiller.data.build import build_dataloaders
    from mdistiller.models import build_model

    assert summary["speed"]["amp"] == "off"  # float32, as tests/conftest.py pins it
    _, test_loader, meta = build_dataloaders(cfg, "cpu", only_test=True)
    model = build_model(cfg.DISTILLER.STUDENT, num_classes=meta.num_classes, image_size=meta.image_size)
    load_weights(model, str(ckpt), cfg.DISTILLER.STUDENT).eval()
    layout = torch.channels_last if summary["speed"]["channels_last"] else torch.contiguous_format
    model.to(memory_format=layout)
    out = []
    with torch.no_grad():
        for images, labels, _ in test_loader:
            logits = model(images.contiguous(memory_format=layout))[0]
            out += [(int(p), int(y)) for p, y in zip(logits.argmax(dim=1), labels)]
    assert len(out) == summary["num_test"]
    return out


def top1_counted_here(cfg, ckpt, summary):
    """Top-1 (%) of the checkpoint on the run's test images, counted image by image here."""
    pairs = predictions_here(cfg, ckpt, summary)
    return 100.0 * sum(p == y for p, y in pairs) / len(pairs)


def test_learning_rate_schedule():
    class S:
        LR, LR_DECAY_RATE, LR_DECAY_STAGES, WARMUP_EPOCHS = 0.05, 0.1, [150, 180, 210], 0

    assert learning_rate(S, 150, 0, 10) == pytest.approx(0.05)
    assert learning_rate(S, 151, 0, 10) == pytest.approx(0.005)
    assert learning_rate(S, 181, 5, 10) == pytest.approx(0.0005)
    assert learning_rate(S, 240, 9, 10) == pytest.approx(0.00005)
    S.WARMUP_EPOCHS = 2
    assert learning_rate(S, 1, 0, 10) == pytest.approx(0.05 / 20)
    assert learning_rate(S, 2, 4, 10) == pytest.approx(0.05 * 15 / 20)
    assert learning_rate(S, 3, 0, 10) == pytest.approx(0.05)


def test_a_method_stage_sets_its_own_learning_rate():
    """StagedLR: the method's stage_lr where it gives one (an initialisation stage's constant LR), the run's
    schedule elsewhere."""
    schedule = LRSchedule(lr=0.05, decay_stages=[180, 210], decay_rate=0.1)
    staged = StagedLR(schedule, lambda epoch: 0.01 if epoch <= 30 else None)
    assert [staged(e, 3, 10) for e in (1, 30)] == [0.01, 0.01]
    assert staged(31, 0, 10) == schedule(31, 0, 10) == 0.05
    assert staged(181, 0, 10) == schedule(181, 0, 10)


def test_atomic_save_never_leaves_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    atomic_save({"a": torch.ones(2)}, str(path))

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_save({"a": torch.zeros(2)}, str(path))
    assert torch.equal(torch.load(path)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["ckpt.pth"]


def test_run_writes_every_documented_file(tmp_path):
    summary = train_from_config(small_cfg(tmp_path))
    run = tmp_path / "run"
    for name in ("config.yaml", "train.log", "metrics.jsonl", "summary.json", "latest.pth", "best.pth",
                 "student_best.pth", "student_last.pth", "ckpt_epoch_1.pth", "ckpt_epoch_2.pth"):
        assert (run / name).is_file(), name
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(run / "tensorboard"))
    records = read_metrics(run)
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("epoch", "lr", "train_loss", "loss/ce", "test_top1", "test_top5", "epoch_time_s"):
        assert key in records[0], key
    # LR: warm-up reaches 0.05 at the end of epoch 1, then the stage at epoch 1 decays it for epoch 2.
    assert records[0]["lr"] == pytest.approx(0.05) and records[1]["lr"] == pytest.approx(0.005)
    assert records[0]["train_loss"] == pytest.approx(records[0]["loss/ce"])
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == summary
    for key in ("best_top1", "best_top5", "best_epoch", "last_top1", "last_top5", "epochs", "images_per_s",
                "seed", "git_sha", "torch_version", "device"):
        assert key in summary, key
    best = max(records, key=lambda r: r["test_top1"])
    assert summary["best_top1"] == best["test_top1"] and summary["best_epoch"] == best["epoch"]
    assert summary["last_top1"] == records[-1]["test_top1"] and summary["epochs"] == 2
    # The reported accuracy is what the best checkpoint scores, counted here image by image.
    assert top1_counted_here(small_cfg(tmp_path), run / "student_best.pth", summary) == summary["best_top1"]
    # The student files are in the published format and hold the student alone.
    student = torch.load(run / "student_last.pth")
    assert set(student) >= {"model"} and "fc.weight" in student["model"]
    # A second start of the same run without --resume is refused instead of overwriting it.
    with pytest.raises(UserError, match="--resume"):
        train_from_config(small_cfg(tmp_path))
    # --resume of a finished run just returns its summary.
    assert train_from_config(small_cfg(tmp_path), resume=True) == summary


@pytest.mark.kernels
def test_resume_is_bit_exact(tmp_path):
    straight = train_from_config(small_cfg(tmp_path, name="straight"))
    with pytest.raises(KeyboardInterrupt):
        train_from_config(small_cfg(tmp_path, name="crashed"), extra_hooks=[CrashAfterEpoch(1)])
    assert not (tmp_path / "crashed" / "summary.json").exists()
    # A crash between writing metrics and the checkpoint must not duplicate lines: fake one.
    with open(tmp_path / "crashed" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "test_top1": -1}) + "\n")
    resumed = train_from_config(small_cfg(tmp_path, name="crashed"), resume=True)

    a = torch.load(tmp_path / "straight" / "latest.pth", weights_only=False)
    b = torch.load(tmp_path / "crashed" / "latest.pth", weights_only=False)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert a["hooks"] == b["hooks"] and a["global_step"] == b["global_step"]
    ma, mb = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "crashed")
    assert [without_timing(r) for r in ma] == [without_timing(r) for r in mb]
    for key in ("best_top1", "best_top5", "best_epoch", "last_top1", "last_top5", "epochs"):
        assert straight[key] == resumed[key], key


def test_resume_with_another_config_is_refused(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train_from_config(small_cfg(tmp_path), extra_hooks=[CrashAfterEpoch(1)])
    with pytest.raises(UserError, match="SOLVER.LR"):
        train_from_config(small_cfg(tmp_path, "SOLVER.LR", "0.1"), resume=True)


def test_eval_tool_reproduces_best_top1(tmp_path):
    summary = train_from_config(small_cfg(tmp_path))
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "eval.py"), "-m", "resnet8", "-c",
         str(run / "student_best.pth"), "--run-config", str(run / "config.yaml"), "--json"],
        capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["top1"] == pytest.approx(summary["best_top1"], abs=1e-9)
    assert result["top5"] == pytest.approx(summary["best_top5"], abs=1e-9)
    assert result["num"] == 300


def test_eval_tool_evaluates_an_fp16_run_in_float32_on_the_cpu(tmp_path):
    # A run trained on a GPU with SPEED.AMP fp16, evaluated here: float32 with a note, not a config error.
    summary = train_from_config(small_cfg(tmp_path))
    run = tmp_path / "run"
    config = (run / "config.yaml").read_text()
    assert len(re.findall(r"(?m)^  AMP: ", config)) == 1  # SPEED.AMP, float32 in the Fashion-MNIST recipe
    (run / "config.yaml").write_text(re.sub(r"(?m)^  AMP: .*$", "  AMP: fp16", config))
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "eval.py"), "-m", "resnet8", "-c",
         str(run / "student_best.pth"), "--run-config", str(run / "config.yaml"), "--device", "cpu", "--json"],
        capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "trained with SPEED.AMP fp16" in proc.stderr and "evaluating in float32" in proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["top1"] == pytest.approx(summary["best_top1"], abs=1e-9)  # this run itself trained in float32


def test_eval_tool_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(1)}}, bad)
    for args, fragment in ((["-c", str(tmp_path / "none.pth")], "does not exist"),
                           (["-c", str(bad)], "does not fit model resnet8")):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "eval.py"), "-m", "resnet8",
                               "-d", "fashion_mnist", "--test-subset", "20", *args],
                              capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def run_train_cli(tmp_path, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), "--cfg", STUDENT_CFG,
                           "LOG.PREFIX", str(tmp_path), *args], capture_output=True, text=True, cwd=ROOT)


def test_train_cli_runs_and_resumes(tmp_path):
    args = ("EXPERIMENT.NAME", "cli", "DATASET.TRAIN_SUBSET", "200", "DATASET.TEST_SUBSET", "100",
            "SOLVER.EPOCHS", "1", "SOLVER.LR_DECAY_STAGES", "[]")
    proc = run_train_cli(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    assert "best top-1" in proc.stdout and (tmp_path / "cli" / "summary.json").is_file()
    again = run_train_cli(tmp_path, *args)
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), "--cfg", STUDENT_CFG,
                           "--resume", "LOG.PREFIX", str(tmp_path), *args], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "already complete" in proc.stderr + proc.stdout


def test_missing_dataset_is_one_line(tmp_path):
    proc = run_train_cli(tmp_path, "DATASET.TYPE", "cifar100", "DATASET.ROOT", str(tmp_path / "nodata"),
                         "DATASET.DOWNLOAD", "False", "DISTILLER.STUDENT", "resnet8")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and str(tmp_path / "nodata" / "cifar-100-python") in proc.stderr


def test_a_run_that_cannot_start_leaves_no_directory(tmp_path):
    cfg = small_cfg(tmp_path, "DISTILLER.TYPE", "KD", "DISTILLER.TEACHER", "resnet56")
    with pytest.raises(UserError, match="teacher checkpoint for resnet56"):
        train_from_config(cfg)
    assert not (tmp_path / "run").exists()


def test_resume_accepts_a_config_saved_before_new_keys_existed():
    from mdistiller.engine.launch import _config_differences

    cfg = load_config(STUDENT_CFG)
    saved = yaml.safe_load(cfg.dump())
    del saved["DISTRIBUTED"]  # as written by a version without this section
    assert _config_differences(yaml.safe_dump(saved), cfg) == []
    changed = load_config(STUDENT_CFG, ["DISTRIBUTED.TIMEOUT_MIN", "5"])
    assert _config_differences(yaml.safe_dump(saved), changed) == ["DISTRIBUTED.TIMEOUT_MIN"]


def test_summary_is_a_reproducibility_ledger(tmp_path):
    import hashlib

    summary = train_from_config(small_cfg(tmp_path, "SOLVER.EPOCHS", "1", "SOLVER.LR_DECAY_STAGES", "[]",
                                          "SOLVER.WARMUP_EPOCHS", "0",
                                          "DATASET.TRAIN_SUBSET", "128", "DATASET.TEST_SUBSET", "64"))
    run = tmp_path / "run"
    assert summary["config_sha256"] == hashlib.sha256((run / "config.yaml").read_bytes()).hexdigest()
    assert summary["versions"]["torch"] == torch.__version__.split("+")[0]
    assert set(summary["versions"]) >= {"python", "torch", "torchvision", "numpy", "yacs"}
    # The fingerprint, recomputed by hand from the four Fashion-MNIST files the run read.
    sources = summary["dataset_sources"]
    assert len(sources) == 4 and all(os.path.isfile(p) for p in sources)
    h = hashlib.sha256()
    for p in sources:
        with open(p, "rb") as f:
            h.update(f"{os.path.basename(p)}:{hashlib.sha256(f.read()).hexdigest()}\n".encode())
    assert summary["dataset_fingerprint"] == h.hexdigest()
    assert summary["world_size"] == 1 and summary["seed"] == 0 and summary["git_sha"]
