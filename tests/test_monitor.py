"""The trainer's loss monitor (DOT fig. 3): monitor/ce is the unweighted training cross-entropy and monitor/kl the
unweighted T^2 KL to the teacher, whatever the method's loss weights; the student alone can log monitor/kl against
a teacher it does not learn from (LOG.MONITOR_TEACHER), and doing so leaves its training unchanged."""

import json
import os

import pytest
import torch

from mdistiller.bench.random_teacher import write_random_teacher

from cli_runs import FM_CONFIGS, KD_CFG, SMALL, train_main as _train_main


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory):
    """A randomly initialised resnet20 in the published checkpoint format (what the monitor sees does not matter)."""
    return write_random_teacher(tmp_path_factory.mktemp("teacher") / "resnet20.pth", "resnet20", "fashion_mnist")


def _epoch_record(tmp_path, name, cfg, *opts):
    _train_main()(["--cfg", cfg, "LOG.PREFIX", str(tmp_path), "EXPERIMENT.NAME", name, *SMALL, *opts])
    with open(os.path.join(tmp_path, name, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f][-1]


def test_kd_monitor_is_the_unweighted_losses(tmp_path, random_teacher):
    # KD logs loss/ce = 0.1 * CE and loss/kd = 0.9 * T^2 KL (T 4 = LOG.MONITOR_T): the monitor undoes the weights.
    r = _epoch_record(tmp_path, "kd", KD_CFG, "DISTILLER.TEACHER_CKPT", random_teacher)
    assert r["monitor/ce"] == pytest.approx(r["loss/ce"] / 0.1, rel=1e-5)
    assert r["monitor/kl"] == pytest.approx(r["loss/kd"] / 0.9, rel=1e-5)


def test_student_alone_monitors_a_teacher_without_learning_from_it(tmp_path, random_teacher):
    cfg = os.path.join(FM_CONFIGS, "vanilla", "resnet8.yaml")  # LOG.MONITOR_TEACHER True, teacher resnet20
    plain = _epoch_record(tmp_path, "plain", cfg, "LOG.MONITOR_TEACHER", "False")
    monitored = _epoch_record(tmp_path, "monitored", cfg, "DISTILLER.TEACHER_CKPT", random_teacher)
    assert "monitor/kl" not in plain and monitored["monitor/kl"] > 0
    assert monitored["monitor/ce"] == pytest.approx(monitored["loss/ce"], rel=1e-6)
    # same seed, same data: the monitored run trains exactly as the plain one
    for key in ("loss/ce", "train_top1", "test_top1", "test_loss"):
        assert monitored[key] == plain[key], key
    a = torch.load(os.path.join(tmp_path, "plain", "student_last.pth"))["model"]
    b = torch.load(os.path.join(tmp_path, "monitored", "student_last.pth"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_monitor_teacher_only_warns(tmp_path):
    cfg = os.path.join(FM_CONFIGS, "vanilla", "resnet8.yaml")
    r = _epoch_record(tmp_path, "alone", cfg, "DISTILLER.TEACHER_CKPT", str(tmp_path / "nope.pth"))
    assert "monitor/kl" not in r and "monitor/ce" in r
    with open(os.path.join(tmp_path, "alone", "train.log")) as f:  # the warning is in the run's own log
        assert any("LOG.MONITOR_TEACHER" in line and "nope.pth" in line for line in f)
