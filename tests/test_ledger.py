"""The reproducibility ledger in summary.json: which teacher checkpoint a run loaded (resolved path, SHA-256 of the
file, its test top-1 when known) and whether the code it ran was committed (git_dirty, untracked files included)."""

import hashlib
import json
import os
import subprocess

import pytest
import torch
import yaml

from mdistiller.config import load_config
from mdistiller.engine.launch import train_from_config
from mdistiller.models.teacher_ckpt import teacher_record
from mdistiller.models import build_model
from mdistiller.utils import env
from mdistiller.utils.checkpoint import checkpoint_top1

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDENT_CFG = os.path.join(ROOT, "configs", "fashion_mnist", "vanilla", "resnet8.yaml")
GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, env=GIT_ENV, capture_output=True, text=True, check=True).stdout


def make_repo(path):
    """A committed checkout with the three source folders, a README and an ignore rule."""
    for name, text in (("mdistiller/a.py", "x = 1\n"), ("configs/c.yaml", "A: 1\n"), ("tools/t.py", "\n"),
                       ("README.md", "readme\n"), (".gitignore", "*.pyc\n/output/\n")):
        os.makedirs(os.path.dirname(os.path.join(path, name)) or path, exist_ok=True)
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    git(path, "init", "-q")
    git(path, "add", ".")
    git(path, "commit", "-q", "-m", "init")
    return path


def tiny_run_cfg(*extra):
    return load_config(STUDENT_CFG, [
        "LOG.PREFIX", "out", "EXPERIMENT.DEVICE", "cpu", "DATASET.TRAIN_SUBSET", "64",
        "DATASET.TEST_SUBSET", "50", "SOLVER.BATCH_SIZE", "32", "SOLVER.EPOCHS", "1",
        "SOLVER.LR_DECAY_STAGES", "[]", "LOG.TENSORBOARD_FREQ", "0", *extra])


def test_summary_records_the_teacher_and_untracked_source_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # LOG.PREFIX "out" is relative: the recorded checkpoint path must not be
    # The default teacher location of a fashion_mnist run: our own vanilla run's student_best.pth, whose run
    # wrote a summary.json next to it. The file holds the weights alone, so the top-1 comes from that summary.
    teacher_dir = tmp_path / "out" / "fashion_mnist_none_resnet20_vanilla_seed0"
    teacher_dir.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save({"model": build_model("resnet20", "fashion_mnist").state_dict()}, teacher_dir / "student_best.pth")
    (teacher_dir / "summary.json").write_text(json.dumps({"best_top1": 61.25, "last_top1": 60.0}))
    # The checkout the run reports on: committed, plus an untracked new tool.
    repo = make_repo(str(tmp_path / "checkout"))
    (tmp_path / "checkout" / "tools" / "new_tool.py").write_text("\n")
    monkeypatch.setattr(env, "REPO_ROOT", repo)

    summary = train_from_config(tiny_run_cfg("EXPERIMENT.NAME", "monitored", "LOG.MONITOR_TEACHER", "True"))
    ckpt = str(teacher_dir / "student_best.pth")
    assert os.path.isabs(summary["teacher"]["checkpoint"]) and summary["teacher"]["checkpoint"] == ckpt
    assert summary["teacher"]["name"] == "resnet20"
    assert summary["teacher"]["sha256"] == sha256_of(ckpt)
    assert summary["teacher"]["top1"] == 61.25 and "summary.json" in summary["teacher"]["top1_source"]
    run = tmp_path / "out" / "monitored"
    assert json.loads((run / "summary.json").read_text()) == summary
    # The stored config keeps the key as given (empty: the default location), so --resume compares equal.
    assert yaml.safe_load((run / "config.yaml").read_text())["DISTILLER"]["TEACHER_CKPT"] == ""
    log = (run / "train.log").read_text()
    assert f"teacher resnet20: checkpoint {ckpt}, sha256 {sha256_of(ckpt)}, test top-1 61.25" in log
    assert summary["git_sha"] == git(repo, "rev-parse", "HEAD").strip() and summary["git_dirty"] is True

    # A run without a teacher records none.
    alone = train_from_config(tiny_run_cfg("EXPERIMENT.NAME", "alone", "LOG.MONITOR_TEACHER", "False"))
    assert alone["teacher"] is None


def published_cfg(tmp_path, *extra):
    return load_config(os.path.join(ROOT, "configs", "cifar100", "kd", "resnet32x4_resnet8x4.yaml"),
                       ["LOG.PREFIX", str(tmp_path / "out"), *extra])


def test_teacher_top1_from_the_checkpoint_itself(tmp_path):
    weights = {"w": torch.zeros(2)}
    # RepDistiller's teacher script: ckpt_epoch_N.pth holds that epoch's test accuracy as a tensor.
    repdistiller = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": weights, "accuracy": torch.tensor(71.5), "optimizer": {}}, repdistiller)
    record = teacher_record(published_cfg(tmp_path, "DISTILLER.TEACHER_CKPT", str(repdistiller)))
    assert record == {"name": "resnet32x4", "checkpoint": str(repdistiller), "sha256": sha256_of(repdistiller),
                      "top1": 71.5, "top1_source": record["top1_source"], "run_finished": None}
    assert "accuracy" in record["top1_source"]
    # Our student files record their own test top-1; our training checkpoints the last epoch's.
    assert checkpoint_top1({"model": weights, "epoch": 3, "test_top1": 42.0})[0] == 42.0
    assert checkpoint_top1({"model": weights, "last": {"top1": 40.5, "top5": 90.0},
                            "best": {"top1": 41.0, "top5": 91.0, "epoch": 2}})[0] == 40.5
    assert checkpoint_top1({"model": weights, "best_acc": 73.0})[0] == 73.0
    assert checkpoint_top1({"model": weights}) == (None, None) and checkpoint_top1(weights) == (None, None)


def test_teacher_top1_published_or_unknown(tmp_path, monkeypatch):
    # The published CIFAR-100 teacher at its default location holds its weights only: its published top-1.
    monkeypatch.setenv("MDISTILLER_CKPT_DIR", str(tmp_path / "ckpts"))
    default = tmp_path / "ckpts" / "cifar_teachers" / "resnet32x4_vanilla" / "ckpt_epoch_240.pth"
    default.parent.mkdir(parents=True)
    torch.save({"model": {"w": torch.ones(3)}}, default)
    record = teacher_record(published_cfg(tmp_path))
    assert record["checkpoint"] == str(default) and record["sha256"] == sha256_of(default)
    assert record["top1"] == 79.42 and "published" in record["top1_source"]
    # The same weights anywhere else: nothing says how good they are.
    other = tmp_path / "mine.pth"
    other.write_bytes(default.read_bytes())
    record = teacher_record(published_cfg(tmp_path, "DISTILLER.TEACHER_CKPT", str(other)))
    assert record["sha256"] == sha256_of(default) and record["top1"] is None and record["top1_source"] is None


@pytest.fixture
def repo(tmp_path):
    return make_repo(str(tmp_path / "repo"))


def test_git_dirty_counts_untracked_source_files(repo):
    head = git(repo, "rev-parse", "HEAD").strip()
    assert env.git_info(repo) == (head, False)
    for untracked in ("mdistiller/new.py", "configs/sub/dir/new.yaml", "tools/new.sh"):
        path = os.path.join(repo, untracked)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("\n")
        assert env.git_info(repo) == (head, True), untracked
        os.remove(path)
    assert env.git_info(repo) == (head, False)
    # Untracked files elsewhere, and ignored files anywhere, change no code that runs.
    for other in ("notes.txt", "mdistiller/a.pyc", "output/run/summary.json"):
        path = os.path.join(repo, other)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("\n")
    assert env.git_info(repo) == (head, False)
    # A modified tracked file, wherever it is, makes the checkout dirty.
    with open(os.path.join(repo, "README.md"), "a") as f:
        f.write("edited\n")
    assert env.git_info(repo) == (head, True)


def test_git_info_without_a_checkout(tmp_path, repo, monkeypatch):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert env.git_info(str(plain)) == ("unknown", None)
    # A folder inside some other repository (an installed copy of the package) is not that repository's state.
    os.makedirs(os.path.join(repo, "mdistiller", "inner"))
    assert env.git_info(os.path.join(repo, "mdistiller")) == ("unknown", None)
    monkeypatch.setenv("PATH", str(plain))  # no git executable at all
    assert env.git_info(repo) == ("unknown", None)


def test_a_teacher_from_an_unfinished_run_is_warned_about_and_recorded(tmp_path):
    """A student_best.pth exists after the teacher's first epoch; distilling from it before the teacher's run has
    written summary.json (after its last epoch) says so, and the ledger records whether that run had finished."""
    import warnings

    from mdistiller.models.teacher_ckpt import build_teacher, teacher_run_finished
    from mdistiller.models import build_model

    run = tmp_path / "teacher_run"
    run.mkdir()
    (run / "config.yaml").write_text("DISTILLER:\n  TYPE: NONE\n")
    ckpt = run / "student_best.pth"
    torch.save({"model": build_model("resnet32x4", "cifar100").state_dict()}, ckpt)
    cfg = published_cfg(tmp_path, "DISTILLER.TEACHER_CKPT", str(ckpt))
    with pytest.warns(UserWarning, match="has not finished"):
        build_teacher(cfg, 100)
    assert teacher_record(cfg)["run_finished"] is False
    (run / "summary.json").write_text("{}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_teacher(cfg, 100)
    assert teacher_record(cfg)["run_finished"] is True
    assert teacher_run_finished(str(tmp_path / "ckpt_epoch_240.pth")) is None  # not one of our run files
